"""`to_coreml`: export to a CoreML ML program (``.mlpackage``) and check it.

Image input. CoreML preprocesses an image input with one scale and a per-channel bias,
``x = scale * pixel + bias``, which cannot express ImageNet's per-channel std. We use
``scale = 1/255`` and ``bias = -mean`` (giving ``pixel/255 - mean``) and put the per-channel
``1/std`` in the graph as one explicit multiply before the model: exact for any model, where
folding it into "the first conv" would need to know which layer that is. The multiply costs
3·H·W operations.

Classifier. With `class_labels` the package is a CoreML classifier: a softmax is appended to
the logits and the outputs are ``classLabel`` (the top label) and ``classLabel_probs`` (a
label -> probability dictionary). Without labels the output is the raw ``logits`` tensor.

Verification. CoreML runs only on macOS. Everywhere, the saved package is re-read and checked
structurally: input and output names, kinds and shapes; compute precision of every conv,
matmul and linear; every op is a core MIL op available at the deployment target; the op
histogram is reported. On macOS the package is also run (CPU only) and compared with torch
on the same images, with the ONNX tolerances (1e-4 fp32, 1e-2 fp16).
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from zoo.errors import ConfigError, ExportError, require
from zoo.export.files import file_record, make_stage, publish_verified
from zoo.export.report import ExportReport, compare
from zoo.export.target import ExportTarget, prepare_target

__all__ = ["to_coreml", "import_coremltools"]

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
COMPRESSED_TOLERANCE = 5e-2  # int8 or palettized weights, relative to torch's fp32 outputs
COMPUTE_OPS = ("conv", "matmul", "linear", "conv_transpose", "einsum")


def import_coremltools():
    """Import coremltools quietly (it warns about untested torch versions and, off macOS,
    about its missing runtime); `ExportError` with the install line when it is absent."""
    try:
        with warnings.catch_warnings(), _quiet_logging():
            warnings.simplefilter("ignore")
            import coremltools as ct
    except ImportError:
        require("coremltools", "export", "CoreML export")  # raises, naming the extra
        raise
    return ct


@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class ImageNormalize(nn.Module):
    """``model(x * inv_std)``, optionally followed by a softmax: what the CoreML graph computes
    after CoreML's own ``pixel/255 - mean`` preprocessing. Input ``[B, C, H, W]``."""

    def __init__(self, model: nn.Module, std: Sequence[float] | None, softmax: bool):
        super().__init__()
        self.model = model
        self.softmax = softmax
        inv = None if std is None else 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("inv_std", inv)

    def forward(self, *x):
        if self.inv_std is not None:
            x = (x[0] * self.inv_std,) + x[1:]
        y = self.model(*x)
        return torch.softmax(y, dim=-1) if self.softmax else y


def to_coreml(
    model: nn.Module | str,
    path: str | Path,
    *,
    pretrained=None,
    input_shape=None,
    precision: str = "fp16",
    image_input: bool = True,
    class_labels: Sequence[str] | str | Path | None = None,
    minimum_target: str = "iOS16",
    quantize: str | None = None,
    palettize: int | None = None,
    verify: bool = True,
    reparam: bool = True,
    verbose: bool = True,
) -> ExportReport:
    """Export `model` (a module or a registered name) to an ``.mlpackage`` at `path` and check it.

    input_shape: ``(C, H, W)`` or ``(B, C, H, W)``; default the model's input size, batch 1.
        CoreML shapes are fixed.
    precision: ``fp16`` or ``fp32`` compute precision. Image inputs are 8-bit RGB either way;
        with fp16 (iOS16 and newer) tensor inputs and outputs are float16, as coremltools
        leaves them, and the report lists each feature's dtype.
    image_input: take an RGB image (``ct.ImageType``) with the model's mean/std applied
        inside (see the module docstring); ``False`` takes the normalised float tensor.
    class_labels: a list of labels, or a text file with one per line; makes a classifier.
    minimum_target: ``iOS15`` or newer (ML programs need it).
    quantize: ``"int8"``: weights stored as per-channel symmetric int8
        (``coremltools.optimize.coreml.linear_quantize_weights``; no data needed).
    palettize: 4, 6 or 8: weights stored as a per-tensor k-means palette of that many bits
        (``palettize_weights``). Either compresses the stored weights only: compute stays at
        `precision`, and the report gives the compressed and the uncompressed package sizes.
        Both need iOS16 or newer.

    The package appears at `path` only after every check passed. Returns an `ExportReport`.
    """
    ct = import_coremltools()
    if precision not in TOLERANCE:
        raise ConfigError(f"precision must be 'fp16' or 'fp32', not {precision!r}.")
    target_enum = getattr(ct.target, str(minimum_target), None)
    if target_enum is None or target_enum.value < ct.target.iOS15.value:
        known = [t for t in dir(ct.target) if t.startswith(("iOS", "macOS"))]
        raise ConfigError(f"minimum_target must name an ML program target (iOS15 or newer): {sorted(known)}; "
                          f"got {minimum_target!r}.")
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ConfigError(f"CoreML ML programs are saved as .mlpackage folders; got {path}.")
    labels = _read_labels(class_labels)
    compression = check_compression(quantize, palettize)
    if compression and target_enum.value < ct.target.iOS16.value:
        raise ConfigError(f"compressed CoreML weights need iOS16 or newer (got {minimum_target}).")
    start = time.perf_counter()
    stage = make_stage(path.parent)
    try:
        target = prepare_target(model, pretrained=pretrained, input_shape=input_shape, reparam=reparam)
        report = _export(ct, target, stage / path.name, precision, image_input, labels, target_enum, minimum_target,
                         compression)
        if verify and sys.platform == "darwin":
            _compare_on_macos(ct, target, stage / path.name, report, image_input, labels)
        else:
            report.skipped.append("numeric comparison skipped: " + (
                "verify=False" if not verify else "CoreML runs only on macOS; structural checks done"))
        publish_verified(report, stage, path.parent, "CoreML", verbose)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


COMPRESSED_WEIGHT_OPS = ("constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_blockwise_shift_scale")
PALETTE_BITS = (4, 6, 8)


def check_compression(quantize: str | None, palettize: int | None) -> str | None:
    """``"int8"``, ``"palette<N>"`` or ``None``; a `ConfigError` for anything else, before any work."""
    if quantize not in (None, "int8"):
        raise ConfigError(f"CoreML weight quantization is int8 (--quantize int8), not {quantize!r}.")
    if palettize is not None and palettize not in PALETTE_BITS:
        raise ConfigError(f"--palettize takes {', '.join(map(str, PALETTE_BITS))} bits, not {palettize!r}.")
    if quantize and palettize:
        raise ConfigError("give --quantize int8 or --palettize N, not both.")
    return "int8" if quantize else f"palette{palettize}" if palettize else None


def _compress(ct, ml, compression: str):
    """`ml` with its weights stored compressed (`to_coreml`'s quantize / palettize)."""
    from coremltools.optimize import coreml as opt

    if compression != "int8":
        require("sklearn", "export", "k-means palettization of CoreML weights")
    if compression == "int8":
        config = opt.OptimizationConfig(global_config=opt.OpLinearQuantizerConfig(mode="linear_symmetric",
                                                                                 dtype="int8"))
        return opt.linear_quantize_weights(ml, config=config)
    config = opt.OptimizationConfig(global_config=opt.OpPalettizerConfig(mode="kmeans",
                                                                        nbits=int(compression[len("palette"):])))
    return opt.palettize_weights(ml, config=config)


def _package_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _read_labels(class_labels) -> list[str] | None:
    if class_labels is None:
        return None
    if isinstance(class_labels, (str, Path)):
        p = Path(class_labels)
        if not p.is_file():
            raise ConfigError(f"class label file {p} does not exist (one label per line).")
        labels = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    else:
        labels = [str(x) for x in class_labels]
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError("class_labels must be a non-empty list of distinct labels.")
    return labels


def _export(ct, target: ExportTarget, path: Path, precision: str, image_input: bool, labels, target_enum,
            target_name: str, compression: str | None = None) -> ExportReport:
    if image_input and not target.is_image:
        raise ConfigError(f"{target.name} does not take a normalised image; export it with image_input=False.")
    x = target.inputs
    with torch.no_grad():
        ref = target.module(*x)
    if labels is not None:
        if not isinstance(ref, torch.Tensor) or ref.dim() != 2 or ref.shape[1] != len(labels):
            shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else "several outputs"
            raise ConfigError(f"{len(labels)} class labels given, but {target.name} outputs {shape}.")
    wrapper = ImageNormalize(target.module, target.std if image_input else None, softmax=labels is not None).eval()
    if image_input:
        inputs = [ct.ImageType(name=target.input_names[0], shape=tuple(x[0].shape), scale=1 / 255.0,
                               bias=[-m for m in target.mean], color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name=n, shape=tuple(t.shape)) for n, t in zip(target.input_names, x)]
    outputs = None if labels is not None else [ct.TensorType(name=n) for n in target.output_names]
    try:
        # coremltools draws a tqdm bar per pass pipeline on stderr: keep it out of our logs.
        with torch.no_grad(), warnings.catch_warnings(), _quiet_logging(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            graph = _drop_aliases(torch.export.export(wrapper, x).run_decompositions({}))
            ml = ct.convert(
                graph, convert_to="mlprogram", inputs=inputs, outputs=outputs,
                classifier_config=ct.ClassifierConfig(labels) if labels is not None else None,
                minimum_deployment_target=target_enum,
                compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
            )
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - one ExportError with the converter's reason
        msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ExportError(f"coremltools could not convert {target.name}: {msg}") from None
    _set_metadata(ml, target, precision, image_input)
    plain_bytes = None
    with warnings.catch_warnings(), _quiet_logging(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if compression:
            plain = path.with_name(path.stem + ".uncompressed.mlpackage")
            ml.save(str(plain))
            plain_bytes = _package_bytes(plain)
            shutil.rmtree(plain)
            try:
                ml = _compress(ct, ml, compression)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"coremltools could not compress {target.name}'s weights ({compression}): {e}") from None
            ml.user_defined_metadata["com.zoo.weights"] = compression
        ml.save(str(path))
        spec = ct.utils.load_spec(str(path))  # what was written, not what is in memory
    report = _structural_report(ct, spec, target, path, ref, precision, image_input, labels, target_enum, target_name)
    if compression:
        _check_compressed(spec, report, compression, plain_bytes, _package_bytes(path))
    return report


def _check_compressed(spec, report: ExportReport, compression: str, plain_bytes: int, packed_bytes: int) -> None:
    """Every conv / linear / matmul weight constant is stored compressed, and the package shrank."""
    block = block_of(spec)
    produced = {o.name: op.type for op in block.operations for o in op.outputs}
    weights_from = collections.Counter()
    for op in block.operations:
        if op.type in ("conv", "linear", "conv_transpose"):
            arg = op.inputs.get("weight")
            src = arg.arguments[0].name if arg is not None and arg.arguments and arg.arguments[0].name else None
            weights_from[produced.get(src, "const")] += 1
    compressed = sum(n for t, n in weights_from.items() if t in COMPRESSED_WEIGHT_OPS)
    problems = []
    if not compressed:
        problems.append(f"no conv/linear weight is stored compressed (weights come from {dict(weights_from)})")
    if packed_bytes >= plain_bytes:
        problems.append(f"the package did not shrink ({packed_bytes} bytes, {plain_bytes} uncompressed)")
    if problems:
        raise ExportError(f"the {compression} CoreML package for {report.model} fails its checks: " + "; ".join(problems))
    report.details.update(weights=compression, weight_sources=dict(weights_from),
                          compressed_weight_ops=compressed, package_bytes=packed_bytes,
                          uncompressed_package_bytes=plain_bytes, size_ratio=round(packed_bytes / plain_bytes, 4))
    report.checks.append(f"{compression} weights: {compressed} of {sum(weights_from.values())} conv/linear weights "
                         f"stored compressed; package {packed_bytes / plain_bytes:.2f}x the uncompressed one")


def _drop_aliases(program):
    """Bypass ``aten.alias`` nodes (what ``Tensor.detach`` becomes in an exported graph).

    coremltools 9 has no converter for ``alias``; in an inference graph it is the identity.
    An alias that is itself a graph output is kept (the output signature names it).
    """
    graph = program.graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.alias.default \
                and not any(u.op == "output" for u in node.users):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed = True
    if changed:
        graph.lint()
        program.graph_module.recompile()
    return program


def _set_metadata(ml, target: ExportTarget, precision: str, image_input: bool) -> None:
    from zoo._version import __version__

    meta = {"zoo.model": target.name, "zoo.version": __version__, "zoo.precision": precision,
            "zoo.input_shape": "x".join(map(str, target.inputs[0].shape)),
            "zoo.reparameterized": str(target.reparameterized).lower()}
    if target.mean is not None:
        meta["zoo.mean"] = ",".join(f"{v:g}" for v in target.mean)
        meta["zoo.std"] = ",".join(f"{v:g}" for v in target.std)
    meta.update({f"zoo.{k}": str(v) for k, v in target.metadata.items() if v is not None})
    description = f"{target.name} exported by zoo {__version__}"
    try:
        from zoo.registry import model_card

        card = model_card(target.name)
    except Exception:  # noqa: BLE001 - not a registered model: no paper or license to add
        card = None
    if card is not None:
        ml.license = card.license
        meta.update({"zoo.paper": card.paper.title, "zoo.arxiv": card.paper.url, "zoo.code": card.paper.code})
        description = f"{target.name}: {card.paper.title} ({card.paper.url}). Exported by zoo {__version__}."
    ml.author = "zoo"
    ml.version = __version__
    ml.short_description = description
    if image_input:
        ml.input_description[target.input_names[0]] = (
            "RGB image; the model applies (pixel/255 - mean) / std itself")
    ml.user_defined_metadata.update(meta)


def _feature_info(ct, feature) -> dict:
    kind = feature.type.WhichOneof("Type")
    if kind == "imageType":
        t = feature.type.imageType
        color = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(t.colorSpace)
        return {"name": feature.name, "kind": "image", "shape": [t.height, t.width], "dtype": color}
    if kind == "multiArrayType":
        t = feature.type.multiArrayType
        dtype = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(t.dataType)
        return {"name": feature.name, "kind": "tensor", "shape": list(t.shape), "dtype": dtype}
    return {"name": feature.name, "kind": kind.replace("Type", ""), "shape": [], "dtype": kind}


def _structural_report(ct, spec, target, path, ref, precision, image_input, labels, target_enum, target_name):
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry
    from coremltools.proto import MIL_pb2

    ins = [_feature_info(ct, f) for f in spec.description.input]
    outs = [_feature_info(ct, f) for f in spec.description.output]
    problems = []
    if spec.WhichOneof("Type") != "mlProgram":
        problems.append(f"not an ML program ({spec.WhichOneof('Type')})")
    # inputs
    want = [tuple(t.shape) for t in target.inputs]
    if [i["name"] for i in ins] != target.input_names[: len(ins)] or len(ins) != len(want):
        problems.append(f"inputs {[i['name'] for i in ins]}, expected {target.input_names}")
    elif image_input:
        if ins[0]["kind"] != "image" or ins[0]["shape"] != list(want[0][2:]) or ins[0]["dtype"] != "RGB":
            problems.append(f"image input is {ins[0]}, expected RGB {want[0][2:]}")
    elif any(i["kind"] != "tensor" or tuple(i["shape"]) != w for i, w in zip(ins, want)):
        problems.append(f"tensor inputs are {ins}, expected shapes {want}")
    if image_input and not problems:
        scale, bias = _preprocessing_affine(block_of(spec), target.input_names[0])
        want_scale = 1 / (255.0 * np.asarray(target.std))
        want_bias = -np.asarray(target.mean) / np.asarray(target.std)
        # fp16 constants round to ~1e-3 relative
        if not (np.allclose(scale, want_scale, rtol=2e-3) and np.allclose(bias, want_bias, rtol=2e-3, atol=1e-3)):
            problems.append(f"image preprocessing computes {scale.tolist()} * pixel + {bias.tolist()}, expected "
                            f"{want_scale.tolist()} * pixel + {want_bias.tolist()}")
    # outputs
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    if labels is not None:
        if [o["name"] for o in outs] != ["classLabel", "classLabel_probs"] or spec.description.predictedFeatureName != "classLabel":
            problems.append(f"classifier outputs are {[o['name'] for o in outs]}")
        n_labels = sum(len(op.attributes["classes"].immediateValue.tensor.strings.values)
                       for op in block_of(spec).operations if op.type == "classify" and "classes" in op.attributes)
        if n_labels and n_labels != len(labels):
            problems.append(f"{n_labels} labels stored, {len(labels)} given")
    else:
        got = [(o["name"], tuple(o["shape"])) for o in outs]
        exp = list(zip(target.output_names, (tuple(r.shape) for r in refs)))
        if got != exp:
            problems.append(f"outputs {got}, expected {exp}")
    # ops: histogram, availability at the target, compute precision
    fn = spec.mlProgram.functions["main"]
    block = block_of(spec)
    hist = collections.Counter(op.type for op in block.operations)
    unsupported = sorted(t for t in hist if t not in SSAOpRegistry.core_ops
                         or not any(v.value <= target_enum.value for v in SSAOpRegistry.core_ops[t]))
    if unsupported:
        problems.append(f"ops outside core MIL at {target_name}: {unsupported}")
    compute = collections.Counter()
    for op in block.operations:
        if op.type in COMPUTE_OPS:
            for o in op.outputs:
                compute[MIL_pb2.DataType.Name(o.type.tensorType.dataType)] += 1
    expected_dtype = "FLOAT16" if precision == "fp16" else "FLOAT32"
    if set(compute) - {expected_dtype}:  # a pure layout change (a reshape block) has no compute op at all
        problems.append(f"compute ops produce {dict(compute)}, expected all {expected_dtype}")
    if problems:
        raise ExportError(f"the CoreML package for {target.name} fails its structural checks: " + "; ".join(problems))
    return ExportReport(
        format="coreml", model=target.name, path=str(path), files=[file_record(path)], inputs=ins, outputs=outs,
        precision=precision, reparameterized=target.reparameterized,
        details={"minimum_target": target_name, "specification_version": spec.specificationVersion,
                 "opset": fn.opset, "image_input": image_input, "class_labels": len(labels) if labels else 0,
                 "op_histogram": dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
                 "compute_op_dtypes": dict(compute), **{k: v for k, v in target.metadata.items() if v is not None}},
        checks=["ML program", "input names, kinds and shapes", "output names and shapes",
                f"every op is core MIL available at {target_name}", f"conv/matmul/linear compute in {expected_dtype}"]
        + (["image preprocessing computes (pixel/255 - mean) / std"] if image_input else []),
    )


def block_of(spec):
    """The main function's operations block of an ML program spec."""
    fn = spec.mlProgram.functions["main"]
    return fn.block_specializations[fn.opset]


def _preprocessing_affine(block, input_name: str):
    """Follow the elementwise ops applied to the image input and return their per-channel
    composition ``scale * pixel + bias`` (CoreML's own preprocessing plus our ``1/std``)."""
    from coremltools.proto import MIL_pb2

    consts = {}
    for op in block.operations:
        if op.type == "const" and "val" in op.attributes:
            val = op.attributes["val"]
            t = val.immediateValue.tensor
            kind = t.WhichOneof("value")
            if kind == "floats":
                consts[op.outputs[0].name] = np.asarray(t.floats.values, dtype=np.float64)
            elif kind == "bytes" and val.type.tensorType.dataType == MIL_pb2.DataType.Value("FLOAT16"):
                consts[op.outputs[0].name] = np.frombuffer(t.bytes.values, dtype=np.float16).astype(np.float64)
    scale, bias, current = np.ones(1), np.zeros(1), input_name
    for op in block.operations:
        args = {k: [a.name for a in v.arguments] for k, v in op.inputs.items()}
        if args.get("x") != [current]:
            continue
        if op.type == "cast":
            pass
        elif op.type in ("mul", "add", "sub", "real_div") and args.get("y", [None])[0] in consts:
            y = consts[args["y"][0]].reshape(-1)
            if op.type == "mul":
                scale, bias = scale * y, bias * y
            elif op.type == "real_div":
                scale, bias = scale / y, bias / y
            else:
                bias = bias + (y if op.type == "add" else -y)
        else:
            break
        current = op.outputs[0].name
    return scale * np.ones_like(bias), bias * np.ones_like(scale)


def _compare_on_macos(ct, target, path, report, image_input, labels) -> None:  # pragma: no cover - macOS only
    """Run the saved package with CoreML (CPU only) and compare with torch on the same input."""

    ml = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    g = torch.Generator().manual_seed(1)
    shape = tuple(target.inputs[0].shape)
    if image_input:
        from PIL import Image

        pixels = torch.randint(0, 256, (shape[2], shape[3], 3), generator=g, dtype=torch.uint8)
        feed = {target.input_names[0]: Image.fromarray(pixels.numpy(), "RGB")}
        mean = torch.tensor(target.mean).view(1, -1, 1, 1)
        std = torch.tensor(target.std).view(1, -1, 1, 1)
        x = ((pixels.permute(2, 0, 1)[None].float() / 255 - mean) / std,)
    else:
        x = target.example(shape[0], seed=1)
        feed = {n: t.numpy() for n, t in zip(target.input_names, x)}
    with torch.no_grad():
        ref = target.module(*x)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    out = ml.predict(feed)
    if labels is not None:
        probs = out["classLabel_probs"]
        got = [np.array([[probs[k] for k in labels]])]
        refs = [torch.softmax(refs[0], -1)]
    else:
        got = [out[n] for n in target.output_names]
    # compressed weights move every output a little more than fp16 compute alone
    tol = COMPRESSED_TOLERANCE if report.details.get("weights") else TOLERANCE[report.precision]
    report.comparisons.append(compare(got, [r.numpy() for r in refs], shape[0], tol))
