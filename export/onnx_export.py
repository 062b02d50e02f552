"""`to_onnx`: export to ONNX with either torch exporter, then check it and compare it in onnxruntime.

Decisions, and the traps they avoid (measured with torch 2.14, onnx 1.23, onnxruntime 1.31):

- **One file.** The dynamo exporter writes weights to a side ``.onnx.data`` file by default,
  which breaks as soon as someone copies the ``.onnx`` alone. Models whose weights fit well
  under protobuf's 2 GiB limit (every image model here: the largest is 330 MB) are saved as
  one self-contained file; only a model above `EXTERNAL_DATA_BYTES` gets the side file, and
  the report then lists both files, which must stay together.
- **Opsets.** The dynamo exporter cannot write below opset 18 (asked for 17 it silently
  writes 18 and tries a version converter that fails on our graphs), so an opset it cannot
  produce is refused up front; the TorchScript exporter covers 7–20.
- **Opset 20 by default**: from opset 20 GELU is one ``Gelu`` op, which onnxruntime runs as
  one fused kernel; below 20 the exporters decompose it into Erf, Div, Mul and Add, which
  onnxruntime's fusion does not match in the dynamo exporter's form (EfficientFormer's MLPs
  then cost several passes over their widest tensors). Runtimes older than opset 20 take
  ``opset=18`` (dynamo) or lower (TorchScript exporter).
- **Dynamic batch.** Traced with a batch-1 example, the dynamo exporter specialises the
  batch to 1 even when the axis is marked dynamic, so a dynamic export is traced at batch 2,
  and the written file is checked to have a symbolic batch dimension.
- **fp16** exports the model in half precision: the file takes and returns float16 and is
  compared against the fp32 torch model (tolerance 1e-2 instead of 1e-4).
"""
from __future__ import annotations

import contextlib
import io
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from zoo.errors import ConfigError, ExportError, require
from zoo.export.files import file_record, make_stage, publish_verified
from zoo.export.report import ExportReport, compare
from zoo.export.target import ExportTarget, prepare_target

__all__ = ["to_onnx", "EXTERNAL_DATA_BYTES", "opset_range"]

EXTERNAL_DATA_BYTES = 1_500_000_000  # leave room under protobuf's 2 GiB for the graph itself
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def opset_range(exporter: str) -> tuple[int, int]:
    """The opsets `exporter` (``dynamo`` or ``torchscript``) can write, inclusive."""
    try:
        from torch.onnx import _constants as c

        top, ts_top = c.ONNX_MAX_OPSET, c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except (ImportError, AttributeError):  # private module: fall back to torch 2.14's values
        top, ts_top = 23, 20
    return (18, top) if exporter == "dynamo" else (7, ts_top)


def to_onnx(
    model: nn.Module | str,
    path: str | Path,
    *,
    pretrained=None,
    input_shape=None,
    opset: int = 20,
    dynamic_batch: bool = True,
    exporter: str = "auto",
    fp16: bool = False,
    verify: bool = True,
    reparam: bool = True,
    verbose: bool = True,
) -> ExportReport:
    """Export `model` (a module or a registered name) to ONNX at `path`, check it, compare it.

    input_shape: ``(C, H, W)`` or ``(B, C, H, W)``; default the model's input size at batch
        1. With ``dynamic_batch`` the batch dimension is symbolic (``"batch"``) and B only
        matters for models with an `export_wrapper`.
    exporter: ``dynamo``, ``torchscript``, or ``auto``: the exporter the model's export
        target names (`ExportTarget.onnx_exporter`, e.g. PSF's generator, whose ~340-step
        farthest-point-sampling loop the dynamo exporter's optimizer does not get through),
        else dynamo.
    verify: after ``onnx.checker`` (full check, always), run the file in onnxruntime and torch
        on the same random inputs at batch 1 and 3 (dynamic) or B (fixed), and raise
        `ExportError` when the relative difference exceeds 1e-4 (fp32) or 1e-2 (fp16). The
        figures are printed either way when `verbose`.

    Files appear at `path` only after every check passed; on any error nothing is left
    behind and an existing file at `path` is untouched. Returns an `ExportReport`.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ConfigError(f"exporter must be 'auto', 'dynamo' or 'torchscript', not {exporter!r}.")
    if exporter != "auto":
        _check_opset(exporter, opset)
    path = Path(path)
    if path.suffix != ".onnx":
        raise ConfigError(f"ONNX files end in .onnx; got {path}.")
    start = time.perf_counter()
    stage = make_stage(path.parent)
    try:
        target = prepare_target(model, pretrained=pretrained, input_shape=input_shape, reparam=reparam)
        if exporter == "auto":
            exporter = target.onnx_exporter or "dynamo"
            _check_opset(exporter, opset)
        report = _export(target, stage / path.name, opset, dynamic_batch, exporter, fp16, verify)
        publish_verified(report, stage, path.parent, "ONNX", verbose)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


def _check_opset(exporter: str, opset: int) -> None:
    lo, hi = opset_range(exporter)
    if not lo <= int(opset) <= hi:
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        olo, ohi = opset_range(other)
        hint = f" The {other} exporter writes opsets {olo}-{ohi}." if olo <= opset <= ohi else ""
        raise ExportError(f"the {exporter} exporter writes opsets {lo}-{hi}, not {opset}.{hint}")


def _export(target: ExportTarget, path: Path, opset: int, dynamic: bool, exporter: str, fp16: bool,
            verify: bool) -> ExportReport:
    onnx = require("onnx", "export", "ONNX export")

    module, precision = target.module, "fp16" if fp16 else "fp32"
    batch = 2 if dynamic else target.inputs[0].shape[0]
    example = target.example(batch)
    if fp16:
        import copy

        module = copy.deepcopy(module).half()
        example = tuple(t.half() if t.is_floating_point() else t for t in example)
    n_bytes = sum(p.numel() * p.element_size() for p in module.state_dict().values())
    external = n_bytes > EXTERNAL_DATA_BYTES

    log = io.StringIO()
    try:
        # The exporters narrate to stdout and TracerWarnings flag shape checks that are
        # constant at a fixed input size: keep them for the error message only.
        with contextlib.redirect_stdout(log), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dims = [{0: torch.export.Dim("batch", min=1)} for _ in example] if dynamic else None
                torch.onnx.export(module, example, str(path), dynamo=True, opset_version=opset,
                                  input_names=target.input_names, output_names=target.output_names,
                                  dynamic_shapes=tuple(dims) if dims else None, external_data=external,
                                  verbose=False)
            else:
                axes = {n: {0: "batch"} for n in target.input_names + target.output_names} if dynamic else None
                torch.onnx.export(module, example, str(path), dynamo=False, opset_version=opset,
                                  input_names=target.input_names, output_names=target.output_names,
                                  dynamic_axes=axes, do_constant_folding=True)
    except Exception as e:  # noqa: BLE001 - surface the exporter's reason as one ExportError
        tail = "\n".join(log.getvalue().strip().splitlines()[-5:])
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise ExportError(
            f"the {exporter} exporter failed on {target.name}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
            + (f"\n{tail}" if tail else "") + f"\nTry exporter='{other}'."
        ) from None
    if not path.is_file():
        raise ExportError(f"the {exporter} exporter wrote no file for {target.name}.")

    proto = onnx.load(str(path), load_external_data=False)
    if not external and _pin_output_dims(proto, target.output_shapes):
        onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnx.checker rejects the export of {target.name}: {e}") from None
    written = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    if written != opset:
        raise ExportError(f"asked for opset {opset}, the exporter wrote {written}.")
    inputs, outputs = _value_infos(proto.graph.input), _value_infos(proto.graph.output)
    if dynamic and any(isinstance(i["shape"][0], int) for i in inputs):
        raise ExportError(f"the export of {target.name} has a fixed batch size although a dynamic one was asked for.")

    report = ExportReport(
        format="onnx", model=target.name, path=str(path), files=[file_record(p) for p in sorted(path.parent.iterdir())],
        inputs=inputs, outputs=outputs, precision=precision, reparameterized=target.reparameterized,
        details={"opset": written, "exporter": exporter, "dynamic_batch": dynamic, "external_data": external,
                 "producer": f"{proto.producer_name} {proto.producer_version}".strip(), **_clean(target.metadata)},
        checks=["onnx.checker.check_model(full_check=True)", "batch dimension symbolic" if dynamic else "batch fixed"],
    )
    if verify:
        _compare_in_onnxruntime(target, path, report, [1, 3] if dynamic else [batch], fp16)
    else:
        report.skipped.append("numeric comparison skipped (verify=False)")
    return report


def _pin_output_dims(proto, shapes: list[tuple[int, ...]]) -> bool:
    """Write the traced sizes into output dimensions the exporter left symbolic, except the batch.

    Only the batch is dynamic in these exports; the TorchScript exporter's shape inference
    still loses sizes after some ops (PSF's scatter/gather leave the point count as
    ``Addpoints_dim_1``), which downstream converters then treat as unknown. ``shapes`` are
    the outputs' shapes from `prepare_target`'s run (any batch). Returns whether it changed
    `proto`.
    """
    changed = False
    for out, shape in zip(proto.graph.output, shapes):
        dims = out.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for i, d in enumerate(dims):
            if i > 0 and not d.HasField("dim_value"):
                d.dim_value = int(shape[i])
                changed = True
    return changed


def _compare_in_onnxruntime(target: ExportTarget, path: Path, report: ExportReport, batches, fp16: bool) -> None:
    ort = require("onnxruntime", "export", "checking an ONNX export")

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnxruntime cannot load the export of {target.name}: {e}") from None
    names = [i.name for i in sess.get_inputs()]
    for b in batches:
        x = target.example(b, seed=b)
        with torch.no_grad():
            ref = target.module(*x)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        feed = {n: (t.half() if fp16 and t.is_floating_point() else t).numpy() for n, t in zip(names, x)}
        got = sess.run(None, feed)
        report.comparisons.append(compare(got, [r.float().numpy() for r in ref], b, TOLERANCE[report.precision]))


def _value_infos(values) -> list[dict]:
    onnx = require("onnx", "export", "ONNX export")

    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})
    return out


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}
