"""PSF's one-step generator through `zoo.export`: the point ops trace batch-free and exactly."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

import zoo
from zoo.export import to_onnx
from zoo.models.psf import PSF
from zoo.models.psf import point_ops as P
from tests.helpers import tiny_config

ort = pytest.importorskip("onnxruntime")


class VoxelRoundTrip(torch.nn.Module):
    """Voxelize onto a coarse grid (many points per voxel) and read the grid back at FPS centres."""

    def forward(self, coords, feats):
        vc = P.normalize_voxel_coords(coords, 4)
        grid = P.avg_voxelize(feats, vc, 4)
        centers = P.furthest_point_sample(coords, 9)
        idx = P.ball_query(centers, coords, 0.8, 5)
        return P.trilinear_devoxelize(grid, vc, 4), P.grouping(feats, idx)


def test_point_ops_export_at_any_batch_and_sum_shared_voxels():
    g = torch.Generator().manual_seed(0)
    coords, feats = torch.randn(2, 3, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(VoxelRoundTrip(), (coords, feats), buf, dynamo=False, opset_version=17,
                          input_names=["coords", "feats"], output_names=["devox", "grouped"],
                          dynamic_axes={n: {0: "b"} for n in ("coords", "feats", "devox", "grouped")})
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    coords3, feats3 = torch.randn(3, 3, 64, generator=g), torch.randn(3, 5, 64, generator=g)
    vc = P.normalize_voxel_coords(coords3, 4)
    assert torch.round(vc).long().unique(dim=1).shape[1] < 64  # voxels are shared: the sums matter
    got = sess.run(None, {"coords": coords3.numpy(), "feats": feats3.numpy()})
    want = VoxelRoundTrip()(coords3, feats3)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)


def test_psf_one_step_generator_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    model = PSF(tiny_config())  # dropout 0.1 and left in training mode: export must not care
    model.data_mean.fill_(0.25)
    model.data_std.fill_(2.0)
    report = to_onnx(model, tmp_path / "psf.onnx", verbose=False)
    assert report.verified and report.details["exporter"] == "torchscript"  # the target's choice under auto
    assert [c.batch_size for c in report.comparisons] == [1, 3]
    assert report.inputs == [{"name": "noise", "shape": ["batch", 128, 3], "dtype": "float32"}]
    assert report.outputs[0]["shape"] == ["batch", 128, 3]
    assert model.training  # the caller's module is left as it was
    # the data statistics are inside the graph
    sess = ort.InferenceSession(str(tmp_path / "psf.onnx"), providers=["CPUExecutionProvider"])
    noise = model.noise(2, seed=5)
    model.eval()
    np.testing.assert_allclose(sess.run(None, {"noise": noise.numpy()})[0], model.sample(noise=noise, steps=1).numpy(),
                               rtol=1e-4, atol=1e-5)


def test_psf_export_shapes(tmp_path):
    model = PSF(tiny_config()).eval()
    report = to_onnx(model, tmp_path / "fixed.onnx", input_shape=(2, 128, 3), dynamic_batch=False, verbose=False)
    assert report.inputs[0]["shape"] == [2, 128, 3] and [c.batch_size for c in report.comparisons] == [2]
    with pytest.raises(zoo.ConfigError, match=r"\(N, 3\) or \(B, N, 3\)"):
        to_onnx(model, tmp_path / "bad.onnx", input_shape=(2, 3, 128), verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]


@pytest.mark.slow  # about 40 s of conversion; the ONNX export above runs by default
def test_psf_converts_to_coreml(tmp_path):
    """Guards the three fixes CoreML needed: no ``alias`` op (detach), GroupNorm on voxel grids
    at rank <= 5, and integer FPS indices. CoreML cannot run off macOS: structure only."""
    pytest.importorskip("coremltools")
    from zoo.export import to_coreml

    model = PSF(tiny_config())
    report = to_coreml(model, tmp_path / "psf.mlpackage", image_input=False, precision="fp32", verbose=False)
    assert report.inputs == [{"name": "noise", "kind": "tensor", "shape": [1, 128, 3], "dtype": "FLOAT32"}]
    assert report.outputs[0]["name"] == "points" and report.outputs[0]["shape"] == [1, 128, 3]
    assert (tmp_path / "psf.mlpackage").is_dir()


def test_the_shipped_psf_tiny_weights_are_checked_by_sha256(tmp_path, monkeypatch):
    from zoo import hub
    from zoo.io import sha256_file

    card = zoo.model_card("psf_tiny")
    entry = card.weights["procedural"]
    path = hub.fetch("psf_tiny", entry)
    assert entry.sha256 and sha256_file(path) == entry.sha256
    damaged = tmp_path / "weights" / path.name  # the same file in a package folder, one byte flipped
    damaged.parent.mkdir()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(hub.resources, "files", lambda package: tmp_path)
    with pytest.raises(zoo.WeightsError, match="sha256 of .* expected " + entry.sha256):
        zoo.create_model("psf_tiny", pretrained=True)
