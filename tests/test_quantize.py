"""int8 ONNX (static QDQ through onnxruntime.quantization, verified against fp32) and compressed
CoreML weights (coremltools.optimize), through zoo.export and `zoo export`.

Nothing here asserts on a measured time: benchmarks/readme_latency.py measures the speed."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import zoo
from zoo.cli import main
from zoo.errors import ConfigError, DataError, ExportError
from zoo.export import QuantRule, quantize_onnx, to_coreml, to_onnx
from zoo.export.quantize import int8_weight_nodes
from zoo.testing import randomize_

pytest.importorskip("onnxruntime")


def images(n: int, seed: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, size, size)).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    model = randomize_(zoo.create_model("efficientformer_l1", img_size=64, num_classes=5), scale=0.1, seed=3)
    to_onnx(model, folder / "l1.onnx", dynamic_batch=False, exporter="torchscript", opset=17, verbose=False)
    return folder, model


def test_int8_onnx_is_quantized_verified_and_reported(fp32_onnx):
    import onnx

    folder, model = fp32_onnx
    # a random-weight model gives nearly the same logits for every image, so its top-1 agreement is
    # arbitrary: checked below against what the two files give, not against a bar
    rep = quantize_onnx(folder / "l1.onnx", folder / "l1.int8.onnx", images(16, 0), images(12, 1), min_agreement=0,
                        labels=[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    graph = onnx.load(str(folder / "l1.int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert weights, "conv weights are stored as int8"
    scales = {n.input[1] for n in graph.node if n.op_type == "DequantizeLinear"}
    per_channel = [i for i in graph.initializer if i.name in scales and len(i.dims) == 1 and i.dims[0] > 1]
    assert per_channel, "weights have one scale per output channel"
    kinds = set(int8_weight_nodes(folder / "l1.int8.onnx").values())
    assert "Conv" in kinds and kinds & {"MatMul", "Gemm"}  # the default rule: convolutions and products
    assert rep.int8_weight_nodes > 10 and rep.calib_images == 16 and rep.val_images == 12
    assert 0 <= rep.top1_agreement <= 1 and 0 < rep.mean_abs_logit_diff < 0.1
    assert rep.top1_fp32 is not None and rep.top1_int8 is not None
    # the reported agreement is what the two files give
    import onnxruntime as ort

    def run(p, xs):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {s.get_inputs()[0].name: x})[0] for x in xs])

    val = images(12, 1)
    a, b = run(folder / "l1.onnx", val), run(folder / "l1.int8.onnx", val)
    assert rep.top1_agreement == pytest.approx(float(np.mean(a.argmax(1) == b.argmax(1))))
    assert rep.mean_abs_logit_diff == pytest.approx(float(np.abs(a - b).mean()), rel=1e-5)


def test_a_rule_keeps_named_layers_float_and_a_low_agreement_leaves_nothing(fp32_onnx, tmp_path):
    import onnx

    folder, _ = fp32_onnx
    rule = QuantRule(("Conv",), keep_float=(r"stem",))
    rep = quantize_onnx(folder / "l1.onnx", tmp_path / "conv.int8.onnx", images(8, 0), images(4, 1), rule=rule,
                        min_agreement=0)
    assert rep.keep_float and all("stem" in n for n in rep.keep_float)
    weights = int8_weight_nodes(tmp_path / "conv.int8.onnx")
    assert set(weights.values()) == {"Conv"} and len(weights) == rep.int8_weight_nodes
    assert not set(rep.keep_float) & set(weights)  # the stem kept float
    with pytest.raises(ExportError, match="nothing was written"):
        _never(folder, tmp_path)
    assert not (tmp_path / "never.int8.onnx").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["conv.int8.onnx"]
    with pytest.raises(ConfigError, match="calibration images"):
        quantize_onnx(folder / "l1.onnx", tmp_path / "x.onnx", [], images(2, 1))


def _activation_matmuls_in_int8(path) -> int:
    """MatMuls whose two operands are both dequantized activations (no int8 constant)."""
    import onnx

    graph = onnx.load(str(path)).graph
    inits = {i.name for i in graph.initializer}
    dq_of_act = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits}
    return sum(1 for n in graph.node if n.op_type == "MatMul" and all(i in dq_of_act for i in n.input[:2]))


def test_a_rule_can_keep_attention_products_float(fp32_onnx, tmp_path):
    folder, _ = fp32_onnx
    base = QuantRule(("Conv", "MatMul", "Gemm"))
    rule = QuantRule(("Conv", "MatMul", "Gemm"), float_activation_matmul=True)
    a = quantize_onnx(folder / "l1.onnx", tmp_path / "a.int8.onnx", images(8, 0), images(4, 1), rule=base, min_agreement=0)
    b = quantize_onnx(folder / "l1.onnx", tmp_path / "b.int8.onnx", images(8, 0), images(4, 1), rule=rule, min_agreement=0)
    assert _activation_matmuls_in_int8(tmp_path / "a.int8.onnx") >= 2  # q @ k and softmax @ v of the Meta3D block
    assert _activation_matmuls_in_int8(tmp_path / "b.int8.onnx") == 0 and len(b.keep_float) >= 2
    # the products with weights stay int8
    assert a.int8_weight_nodes == b.int8_weight_nodes > 10


def _never(folder, tmp_path):
    """A model calibrated on tiny-range images and checked on huge ones disagrees: refused."""
    calib = [x * 1e-3 for x in images(4, 0)]
    val = [x * 50 for x in images(16, 1)]
    return quantize_onnx(folder / "l1.onnx", tmp_path / "never.int8.onnx", calib, val, min_agreement=0.999)


def test_zoo_export_int8_from_an_image_folder(tmp_path, capsys):
    from zoo.data.patterns import make_pattern_folder

    data = make_pattern_folder(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=4, size=64)
    out = tmp_path / "exp"
    assert main(["export", "efficientvit_m0", "--img-size", "64", "--format", "onnx", "--quantize", "int8",
                 "--calib-data", str(data / "train"), "--val-data", str(data / "val"), "--calib-size", "12",
                 "--min-agreement", "0", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["efficientvit_m0.int8.onnx", "efficientvit_m0.onnx",
                                                     "export-report.json"]
    report = json.loads((out / "export-report.json").read_text())
    q = report["int8_onnx"]
    assert q["path"] == "efficientvit_m0.int8.onnx" and q["calib_images"] == 12 and q["val_images"] == 12
    assert q["top1_fp32"] is not None  # class folders give labels
    assert "top-1 agrees" in capsys.readouterr().out


def test_zoo_export_refuses_bad_quantization_requests_before_building(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    (junk / "b.jpg").write_bytes(b"nor a jpeg")
    base = ["export", "efficientvit_m0", "--img-size", "64", "--out", str(tmp_path / "out")]
    cases = [
        (["--format", "onnx", "--quantize", "int8"], "--calib-data"),
        (["--format", "onnx", "--quantize", "int8", "--calib-data", str(empty)], "holds no images"),
        (["--format", "onnx", "--quantize", "int8", "--calib-data", str(junk)], "could be read"),
        (["--format", "coreml", "--palettize", "3"], "4, 6, 8"),
        (["--format", "onnx", "--palettize", "4"], "--format coreml"),
        (["--format", "onnx", "--calib-data", str(junk)], "--quantize int8"),
    ]
    for flags, message in cases:
        assert main(base + flags) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def compressed_packages(tmp_path_factory):
    pytest.importorskip("coremltools")
    folder = tmp_path_factory.mktemp("coreml_int8")
    model = randomize_(zoo.create_model("efficientformer_l1", img_size=64, num_classes=10), scale=0.1)
    plain = to_coreml(model, folder / "fp16.mlpackage", verbose=False)
    int8 = to_coreml(model, folder / "int8.mlpackage", quantize="int8", verbose=False)
    pal = to_coreml(model, folder / "pal4.mlpackage", palettize=4, verbose=False)
    return plain, int8, pal


def test_coreml_int8_and_palette_weights_are_stored_compressed_and_smaller(compressed_packages):
    plain, int8, pal = compressed_packages
    size = lambda r: r.files[0]["bytes"]  # noqa: E731
    assert size(int8) <= 0.6 * size(plain) and size(pal) < size(int8)
    for r, kind in ((int8, "int8"), (pal, "palette4")):
        assert r.details["weights"] == kind and r.details["compressed_weight_ops"] > 10
        assert r.details["size_ratio"] == pytest.approx(size(r) / r.details["uncompressed_package_bytes"], rel=1e-3)
        assert r.details["compute_op_dtypes"].keys() == {"FLOAT16"}  # compute stays fp16
    ops = int8.details["op_histogram"]
    assert ops.get("constexpr_affine_dequantize", 0) + ops.get("constexpr_blockwise_shift_scale", 0) > 10
    assert pal.details["op_histogram"].get("constexpr_lut_to_dense", 0) > 10
    assert "weights" not in plain.details


def test_coreml_compression_bad_requests(tmp_path):
    pytest.importorskip("coremltools")
    with pytest.raises(ConfigError, match="4, 6, 8"):
        to_coreml("efficientvit_m0", tmp_path / "a.mlpackage", palettize=3)
    with pytest.raises(ConfigError, match="int8"):
        to_coreml("efficientvit_m0", tmp_path / "a.mlpackage", quantize="int4")
    with pytest.raises(ConfigError, match="not both"):
        to_coreml("efficientvit_m0", tmp_path / "a.mlpackage", quantize="int8", palettize=8)
    with pytest.raises(ConfigError, match="iOS16"):
        to_coreml("efficientvit_m0", tmp_path / "a.mlpackage", quantize="int8", minimum_target="iOS15")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform != "darwin", reason="CoreML runs models only on macOS")
def test_coreml_int8_weights_agree_with_torch_on_macos(tmp_path):  # pragma: no cover - macOS only
    model = randomize_(zoo.create_model("efficientvit_m0"), scale=0.1)
    report = to_coreml(model, tmp_path / "m0_int8.mlpackage", quantize="int8", image_input=False)
    assert report.comparisons and report.comparisons[0].rel_diff < 5e-2
