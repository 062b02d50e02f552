"""zoo.export: reparameterization, to_onnx / to_coreml reports, verification, bad input, the
export_wrapper hook."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import zoo
from zoo.export import ExportTarget, to_coreml, to_onnx
from zoo.io import sha256_file
from zoo.testing import randomize_, rel_err


def test_generic_fallback_folds_adjacent_conv_bn_only():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)),
        nn.BatchNorm2d(8),  # follows a BN, not a conv: must stay
    )
    randomize_(model).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
        deployed = zoo.export.reparameterize(model)
        out = deployed(x)
    assert rel_err(out, ref) < 1e-5
    bns = [m for m in deployed.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 and bns[0] is deployed[4]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3, "the input model must be left as it was"


def test_model_method_is_used_and_inplace_option():
    model = zoo.create_model("efficientvit_m0", img_size=64)
    same = zoo.export.reparameterize(model, inplace=True)
    assert same is model and model.deployed


def visible(folder) -> list[str]:
    """Everything in `folder`, hidden stage folders included."""
    return sorted(p.name for p in folder.iterdir())


# --- ONNX -----------------------------------------------------------------------------------


def test_to_onnx_report_describes_the_written_file(tmp_path):
    import onnx

    model = randomize_(zoo.create_model("efficientvit_m0", img_size=64), scale=0.1)
    path = tmp_path / "m0.onnx"
    report = to_onnx(model, path, verbose=False)
    assert visible(tmp_path) == ["m0.onnx"], "one self-contained file, no side data, no stage left"
    assert report.path == str(path) and report.files == [{"path": str(path), "bytes": path.stat().st_size,
                                                           "sha256": sha256_file(path)}]
    assert report.inputs == [{"name": "image", "shape": ["batch", 3, 64, 64], "dtype": "float32"}]
    assert report.outputs == [{"name": "logits", "shape": ["batch", 1000], "dtype": "float32"}]
    assert report.details["opset"] == 20 and report.details["exporter"] == "dynamo"
    assert report.reparameterized and report.verified
    assert [(c.batch_size, c.tolerance) for c in report.comparisons] == [(1, 1e-4), (3, 1e-4)]
    proto = onnx.load(str(path))
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the caller's model is left as it was"
    d = report.to_dict()
    assert d["verified"] and d["comparisons"][0]["passed"]


def test_to_onnx_torchscript_fixed_batch_fp16(tmp_path):
    model = randomize_(zoo.create_model("efficientformerv2_s0", img_size=64, num_classes=10), scale=0.1)
    report = to_onnx(model, tmp_path / "s0.onnx", exporter="torchscript", opset=17, dynamic_batch=False,
                     input_shape=(2, 3, 64, 64), fp16=True, verbose=False)
    assert report.inputs[0]["shape"] == [2, 3, 64, 64] and report.inputs[0]["dtype"] == "float16"
    assert report.outputs[0]["dtype"] == "float16" and report.precision == "fp16"
    assert [(c.batch_size, c.tolerance) for c in report.comparisons] == [(2, 1e-2)]
    assert report.details["opset"] == 17 and report.details["exporter"] == "torchscript"


class DiffersWhenExported(nn.Module):
    """A model whose traced graph computes something else than its eager forward."""

    pretrained_cfg = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3}

    def forward(self, x):
        y = x.mean((2, 3))
        return y + 1 if torch.compiler.is_compiling() or torch.jit.is_tracing() else y


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_mismatch_fails_and_leaves_nothing(exporter, tmp_path, capsys):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(zoo.ExportError, match="differs from torch") as e:
        to_onnx(DiffersWhenExported(), path, exporter=exporter, opset=18 if exporter == "dynamo" else 17)
    assert "FAILED" in str(e.value) and "batch 1" in str(e.value)
    assert "FAILED" in capsys.readouterr().out, "figures are printed either way"
    assert visible(tmp_path) == ["bad.onnx"] and path.read_bytes() == b"previous export"


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(zoo.ExportError, match="opsets 18-.*torchscript exporter writes opsets 7-20"):
        to_onnx("efficientvit_m0", out / "m0.onnx", opset=17)
    with pytest.raises(zoo.ExportError, match="torchscript exporter writes opsets 7-20, not 21"):
        to_onnx("efficientvit_m0", out / "m0.onnx", opset=21, exporter="torchscript")
    with pytest.raises(zoo.UnknownModelError, match="Did you mean efficientvit_m5"):
        to_onnx("efficientvit_m9", out / "m9.onnx")
    with pytest.raises(zoo.ConfigError, match="multiple of 16"):
        to_onnx("efficientvit_m0", out / "m0.onnx", input_shape=(3, 100, 100))
    with pytest.raises(zoo.ConfigError, match="built for 64x64"):  # a built model given the wrong size
        to_onnx(zoo.create_model("efficientvit_m0", img_size=64), out / "m0.onnx", input_shape=(3, 96, 96))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 7 * 7, 2))
    plain.pretrained_cfg = {"input_size": (3, 16, 16)}
    to_onnx(plain, out / "plain.onnx", verbose=False)  # its own size works
    (out / "plain.onnx").unlink()
    with pytest.raises(zoo.ConfigError, match=r"Sequential cannot take inputs of shape \(1, 3, 32, 32\): mat1"):
        to_onnx(plain, out / "plain.onnx", input_shape=(3, 32, 32))
    with pytest.raises(zoo.ConfigError, match="square"):
        to_onnx("efficientformer_l1", out / "l1.onnx", input_shape=(3, 224, 160))
    with pytest.raises(zoo.ConfigError, match=r"\.onnx"):
        to_onnx("efficientvit_m0", out / "m0.pb")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(zoo.ExportError, match="cannot write to"):
        to_onnx("efficientvit_m0", blocker / "m0.onnx")
    assert not out.exists() or visible(out) == []
    assert visible(tmp_path) == ["a-file"] + (["out"] if out.exists() else [])


def test_pretrained_by_path_goes_into_the_export(tmp_path):
    """The exported graph carries the given weights: its output equals the loaded model's."""
    import onnxruntime as ort
    from safetensors.torch import save_file

    src = randomize_(zoo.create_model("efficientvit_m0", img_size=64), seed=3)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    to_onnx("efficientvit_m0", tmp_path / "m0.onnx", pretrained=tmp_path / "w.safetensors",
            input_shape=(3, 64, 64), exporter="torchscript", verbose=False)  # the faster exporter: weights are the point
    x = torch.randn(2, 3, 64, 64)
    sess = ort.InferenceSession(str(tmp_path / "m0.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert rel_err(torch.from_numpy(sess.run(None, {"image": x.numpy()})[0]), src(x)) < 1e-4


# --- the export_wrapper hook ----------------------------------------------------------------


class OneStepSampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 3))

    def forward(self, noise):  # [B, N, 3] -> [B, N, 3]
        return noise + self.net(noise)


class PointGenerator(nn.Module):
    """Stands in for a point-cloud generator: exports its one-step sampler on a noise input."""

    def __init__(self):
        super().__init__()
        self.sampler = OneStepSampler()

    def export_wrapper(self, input_shape=None):
        n = 64 if input_shape is None else input_shape[-2]
        return ExportTarget(module=self.sampler, inputs=(torch.randn(1, n, 3),), name="toy_points",
                            input_names=["noise"], output_names=["points"])


def test_export_wrapper_drives_both_formats(tmp_path):
    model = randomize_(PointGenerator())
    report = to_onnx(model, tmp_path / "gen.onnx", verbose=False)
    assert report.model == "toy_points" and report.verified
    assert report.inputs == [{"name": "noise", "shape": ["batch", 64, 3], "dtype": "float32"}]
    assert report.outputs[0]["name"] == "points" and report.outputs[0]["shape"] == ["batch", 64, 3]
    pytest.importorskip("coremltools")
    with pytest.raises(zoo.ConfigError, match="image_input=False"):
        to_coreml(model, tmp_path / "gen.mlpackage")
    report = to_coreml(model, tmp_path / "gen.mlpackage", image_input=False, precision="fp32", verbose=False)
    assert report.inputs == [{"name": "noise", "kind": "tensor", "shape": [1, 64, 3], "dtype": "FLOAT32"}]
    assert report.outputs[0]["name"] == "points" and report.outputs[0]["shape"] == [1, 64, 3]
    assert report.details["compute_op_dtypes"] == {"FLOAT32": 2}


# --- CoreML ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def m0_classifier(tmp_path_factory):
    pytest.importorskip("coremltools")
    folder = tmp_path_factory.mktemp("coreml")
    labels = folder / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(10)))
    model = randomize_(zoo.create_model("efficientvit_m0", img_size=64, num_classes=10), scale=0.1)
    report = to_coreml(model, folder / "m0.mlpackage", class_labels=labels, verbose=False)
    return folder, report


def test_coreml_classifier_package(m0_classifier):
    from zoo.export.coreml_export import import_coremltools

    ct = import_coremltools()
    folder, report = m0_classifier
    assert sorted(p.name for p in folder.iterdir()) == ["labels.txt", "m0.mlpackage"]
    assert report.files[0]["path"] == str(folder / "m0.mlpackage") and report.files[0]["bytes"] > 1e6
    assert report.inputs == [{"name": "image", "kind": "image", "shape": [64, 64], "dtype": "RGB"}]
    assert [o["name"] for o in report.outputs] == ["classLabel", "classLabel_probs"]
    assert report.details["class_labels"] == 10 and report.details["minimum_target"] == "iOS16"
    assert report.comparisons == [] and report.skipped if sys.platform != "darwin" else report.verified
    spec = ct.utils.load_spec(str(folder / "m0.mlpackage"))
    meta = dict(spec.description.metadata.userDefined)
    assert meta["zoo.model"] == "efficientvit_m0" and meta["zoo.version"] == zoo.__version__
    assert meta["zoo.arxiv"].endswith("2305.07027") and meta["zoo.input_shape"] == "1x3x64x64"
    assert spec.description.metadata.license == zoo.model_card("efficientvit_m0").license
    assert "classify" in report.details["op_histogram"] and report.details["op_histogram"]["softmax"] >= 1


def test_coreml_image_preprocessing_is_the_model_normalisation(m0_classifier):
    """Read the preprocessing the saved package applies to pixels and check it is
    (pixel/255 - mean) / std with the model's mean and std, per channel."""
    from zoo.export.coreml_export import _preprocessing_affine, block_of, import_coremltools

    ct = import_coremltools()
    folder, _ = m0_classifier
    spec = ct.utils.load_spec(str(folder / "m0.mlpackage"))
    scale, bias = _preprocessing_affine(block_of(spec), "image")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    pixels = np.array([0.0, 17.0, 128.0, 255.0])[:, None]
    np.testing.assert_allclose(scale * pixels + bias, (pixels / 255 - mean) / std, rtol=2e-3, atol=2e-3)


def test_coreml_bad_input(tmp_path):
    pytest.importorskip("coremltools")
    with pytest.raises(zoo.ConfigError, match="3 class labels given, but efficientvit_m0 outputs"):
        to_coreml("efficientvit_m0", tmp_path / "m0.mlpackage", class_labels=["a", "b", "c"], input_shape=(3, 64, 64))
    with pytest.raises(zoo.ConfigError, match="iOS15 or newer"):
        to_coreml("efficientvit_m0", tmp_path / "m0.mlpackage", minimum_target="iOS14")
    with pytest.raises(zoo.ConfigError, match="precision"):
        to_coreml("efficientvit_m0", tmp_path / "m0.mlpackage", precision="int8")
    with pytest.raises(zoo.ConfigError, match="distinct"):
        to_coreml("efficientvit_m0", tmp_path / "m0.mlpackage", class_labels=["a", "a"])
    assert visible(tmp_path) == []


@pytest.mark.skipif(sys.platform != "darwin", reason="CoreML runs models only on macOS")
def test_coreml_numeric_on_macos(tmp_path):  # pragma: no cover - macOS only
    for precision, tol in (("fp32", 1e-4), ("fp16", 1e-2)):
        model = randomize_(zoo.create_model("efficientvit_m0"), scale=0.1)
        report = to_coreml(model, tmp_path / f"m0_{precision}.mlpackage", precision=precision)
        assert report.comparisons and report.verified and report.comparisons[0].tolerance == tol
