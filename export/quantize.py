"""`quantize_onnx`: static int8 quantization of an fp32 ONNX export, verified before it is kept.

QDQ format with per-channel int8 weights and uint8 activations (onnxruntime's recommended
form on x86, run by its VNNI / AVX2 int8 kernels), MinMax calibration on the user's images,
through `onnxruntime.quantization` (pre-processed by its `quant_pre_process`: shape
inference and onnxruntime's basic graph optimisation first, as its documentation asks).

Which operators are quantized is the model's choice (`QuantRule`; a model class names its
family's in an ``int8_rule`` attribute, plain data, and `DEFAULT_RULE` serves the rest): a
quantize/dequantize pair costs a pass over the tensor, so an operator pays off only where its
int8 arithmetic saves more than that; the rest stays float. Each rule's note says what was
measured.

Verification: the int8 model and the fp32 model it came from run on held-out images; the
share of images whose top-1 class agrees and the mean absolute logit difference go into the
report, and an agreement below `min_agreement` is an `ExportError` (nothing is kept).
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from zoo.errors import ConfigError, ExportError, require
from zoo.export.files import file_record, make_stage

__all__ = ["QuantRule", "DEFAULT_RULE", "quantize_onnx", "QuantReport", "int8_weight_nodes"]


@dataclass(frozen=True)
class QuantRule:
    """What one family quantizes: ONNX operator types, and node-name patterns kept float."""

    op_types: tuple[str, ...]
    keep_float: tuple[str, ...] = ()
    float_depthwise: bool = False  # keep depthwise convolutions float (little arithmetic to save)
    min_weights: int = 0  # keep float a Conv / Gemm / MatMul whose weight has fewer elements
    # keep float a MatMul of two activations (attention's q @ k and softmax @ v): softmax
    # probabilities in uint8 steps of 1/255 lose the small weights, for little arithmetic
    float_activation_matmul: bool = False
    note: str = ""


    @classmethod
    def from_model(cls, rule) -> "QuantRule":
        """A model's ``int8_rule`` (a dict of these fields, or a `QuantRule`; None: the default)."""
        if rule is None:
            return DEFAULT_RULE
        if isinstance(rule, QuantRule):
            return rule
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(rule).items()})


DEFAULT_RULE = QuantRule(("Conv", "MatMul", "Gemm"), note="convolutions and matrix products, per-channel weights")


@dataclass
class QuantReport:
    """What `quantize_onnx` made and measured."""

    path: str
    source: str
    rule: dict
    op_types: list[str]
    keep_float: list[str]
    int8_weight_nodes: int
    float_nodes_kept: int
    calib_images: int
    val_images: int
    top1_agreement: float
    mean_abs_logit_diff: float
    max_abs_logit_diff: float
    top1_fp32: float | None = None
    top1_int8: float | None = None
    seconds: float = 0.0
    files: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, calib: Sequence[np.ndarray], val: Sequence[np.ndarray],
                  rule: QuantRule | None = None, labels: Sequence[int] | None = None, min_agreement: float = 0.99,
                  threads: int = 1) -> QuantReport:
    """Quantize the classifier `fp32_path` (input ``[B, 3, H, W]`` float32, output logits) to
    `out_path` (module docstring).

    calib, val: preprocessed images, each ``[1, 3, H, W]`` float32 (the model's eval
        transform); `labels`: `val`'s classes, when known (then both top-1s are reported).
    Files appear at `out_path` only when the agreement is at least `min_agreement`.
    """
    ort = require("onnxruntime", "export", "int8 quantization")
    from onnxruntime import quantization as q

    if not calib:
        raise ConfigError("int8 quantization needs calibration images (--calib-data DIR).")
    if not val:
        raise ConfigError("int8 quantization needs held-out images to verify against fp32 (--val-data DIR, or more "
                          "calibration images: a fifth are held out).")
    if labels is not None and len(labels) != len(val):
        raise ConfigError(f"{len(labels)} labels for {len(val)} held-out images.")
    if not 0 <= min_agreement <= 1:
        raise ConfigError(f"min_agreement is a fraction in [0, 1], not {min_agreement}.")
    rule = QuantRule.from_model(rule)
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    start = time.perf_counter()
    stage = make_stage(out_path.parent)
    try:
        pre = stage / "pre.onnx"
        q.quant_pre_process(str(fp32_path), str(pre))
        keep = _kept_float(pre, rule)
        input_name = _input_name(pre)
        reader = _Reader(input_name, calib)
        target = stage / out_path.name
        q.quantize_static(str(pre), str(target), reader, quant_format=q.QuantFormat.QDQ,
                          op_types_to_quantize=list(rule.op_types), per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          nodes_to_exclude=keep, calibrate_method=q.CalibrationMethod.MinMax,
                          extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        ref, got = _run(ort, fp32_path, val, threads), _run(ort, target, val, threads)
        agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
        diff = np.abs(ref - got)
        report = QuantReport(
            path=str(out_path), source=str(fp32_path), rule={k: v for k, v in rule.__dict__.items()},
            op_types=list(rule.op_types), keep_float=keep,
            int8_weight_nodes=len(int8_weight_nodes(target)), float_nodes_kept=len(keep), calib_images=len(calib),
            val_images=len(val), top1_agreement=agree, mean_abs_logit_diff=float(diff.mean()),
            max_abs_logit_diff=float(diff.max()))
        if labels is not None:
            y = np.asarray(labels)
            report.top1_fp32 = float(np.mean(ref.argmax(1) == y) * 100)
            report.top1_int8 = float(np.mean(got.argmax(1) == y) * 100)
        if agree < min_agreement:
            raise ExportError(f"int8 {out_path.name} agrees with fp32 on {agree:.1%} of {len(val)} held-out images' "
                              f"top-1, under the {min_agreement:.0%} required (mean |logit diff| "
                              f"{report.mean_abs_logit_diff:.3g}); nothing was written. Calibrate on more images like "
                              "the deployment's (--calib-size), or lower --min-agreement knowingly.")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(target), str(out_path))
        report.files = [file_record(out_path)]
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


class _Reader:
    """`onnxruntime.quantization.CalibrationDataReader` over preprocessed images."""

    def __init__(self, name: str, images: Sequence[np.ndarray]):
        self.name, self.items = name, iter(images)

    def get_next(self):
        x = next(self.items, None)
        return None if x is None else {self.name: np.ascontiguousarray(x, dtype=np.float32)}


def _run(ort, path: Path, images: Sequence[np.ndarray], threads: int) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0] for x in images])


def _kept_float(path: Path, rule: QuantRule) -> list[str]:
    """Names of the nodes `rule` keeps float: matching a `keep_float` pattern, depthwise
    convolutions (``group`` equal to the channels, one input channel per group) and matrix
    products of two activations (no operand a constant) when asked."""
    onnx = require("onnx", "export", "int8 quantization")
    graph = onnx.load(str(path)).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    constants = set(shapes) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    keep = set()
    for n in graph.node:
        if any(re.search(p, n.name) for p in rule.keep_float):
            keep.add(n.name)
        elif (rule.float_activation_matmul and n.op_type == "MatMul"
              and not any(i in constants for i in n.input[:2])):
            keep.add(n.name)
        elif n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1:
            w = shapes.get(n.input[1])
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            if rule.float_depthwise and n.op_type == "Conv" and group > 1 and w is not None and len(w) == 4 and w[1] == 1:
                keep.add(n.name)
            elif rule.min_weights and w is not None and int(np.prod(w)) < rule.min_weights:
                keep.add(n.name)
    return sorted(keep)


def _input_name(path: Path) -> str:
    onnx = require("onnx", "export", "int8 quantization")
    graph = onnx.load(str(path)).graph
    inits = {i.name for i in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


def int8_weight_nodes(path: str | Path) -> dict[str, str]:
    """Node name -> op type of every node whose weight (second input) is an int8 initializer
    read through a DequantizeLinear: the operators that run on int8 weights."""
    onnx = require("onnx", "export", "int8 quantization")
    graph = onnx.load(str(path)).graph
    int8 = {i.name for i in graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    from_int8 = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8}
    return {n.name: n.op_type for n in graph.node if len(n.input) > 1 and n.input[1] in from_int8}
