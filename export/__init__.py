"""Deployment (installed as ``zoo.export``): reparameterization, ONNX and CoreML export, verification.

    >>> from zoo.export import to_onnx, to_coreml
    >>> to_onnx("efficientvit_m0", "out/efficientvit_m0.onnx")          # checked in onnxruntime
    >>> to_coreml("efficientvit_m0", "out/efficientvit_m0.mlpackage")   # image input, fp16
    >>> quantize_onnx("out/efficientvit_m0.onnx", "out/efficientvit_m0.int8.onnx", calib, val)  # checked vs fp32

Export code never special-cases a model by name: a model that needs help provides it
(a ``reparameterize()`` method, an ``export_wrapper()``; see `zoo.export.target`).
"""
if __name__ != "zoo.export":  # the folder is importable from the repo root; one copy only
    raise ImportError(f"{__name__!r} is zoo's export/ folder imported under its bare name, which would make a "
                      "second copy of every module in it; import zoo.export instead.")

from zoo.export.coreml_export import to_coreml
from zoo.export.onnx_export import opset_range, to_onnx
from zoo.export.quantize import QuantReport, QuantRule, quantize_onnx
from zoo.export.reparam import reparameterize
from zoo.export.report import Comparison, ExportReport
from zoo.export.target import ExportTarget, prepare_target

__all__ = ["reparameterize", "to_onnx", "to_coreml", "quantize_onnx", "QuantRule", "QuantReport", "opset_range",
           "ExportReport", "Comparison", "ExportTarget", "prepare_target"]
