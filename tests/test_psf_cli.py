"""`zoo sample` / `zoo evaluate`, point cloud files, and loading PSF checkpoints by layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.cli import main
from zoo.models.psf import PVCNN2, psf_config
from zoo.data.pointcloud_io import ply_bytes, render_grid


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A stage checkpoint as the engine writes it (bare PVCNN2 keys under state_dict), DDP-prefixed."""
    torch.manual_seed(0)
    card = zoo.model_card("psf_tiny")
    net = PVCNN2(psf_config(**card.config))
    path = tmp_path_factory.mktemp("ckpt") / "model_best.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path, net


def test_checkpoints_of_the_bare_network_load_into_the_card_model(tiny_ckpt, tmp_path):
    path, net = tiny_ckpt
    model = zoo.create_model("psf_tiny", pretrained=str(path))
    torch.testing.assert_close(model.velocity.state_dict()["classifier.2.weight"], net.state_dict()["classifier.2.weight"])
    # PSF's own layout: {"model_state": {"model.module.<key>": ...}}
    psf_file = tmp_path / "epoch_99.pth"
    torch.save({"model_state": {f"model.module.{k}": v for k, v in net.state_dict().items()}}, psf_file)
    other = zoo.create_model("psf_tiny", pretrained=str(psf_file))
    noise = torch.randn(1, 512, 3)
    torch.testing.assert_close(other(noise), model(noise))


def test_sample_writes_npy_ply_and_a_grid(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    out = tmp_path / "s"
    assert main(["sample", "psf_tiny", "--pretrained", str(path), "--num", "3", "--steps", "2", "--out", str(out),
                 "--seed", "5"]) == 0
    assert "3 clouds of 512 points, 2-step Euler" in capsys.readouterr().out
    clouds = np.load(out / "samples.npy")
    assert clouds.shape == (3, 512, 3)
    np.testing.assert_array_equal(np.load(out / "sample_001.npy"), clouds[1])
    head, body = (out / "sample_002.ply").read_text().split("end_header\n")
    assert "element vertex 512" in head
    np.testing.assert_allclose(np.loadtxt(body.splitlines()), clouds[2], rtol=1e-5, atol=1e-5)
    png = np.asarray(Image.open(out / "samples.png"))
    assert png.shape[2] == 3 and (png < 250).any()
    # the same seed gives the same clouds; the model's sampler agrees with the files
    model = zoo.create_model("psf_tiny", pretrained=str(path))
    torch.testing.assert_close(model.sample(3, steps=2, seed=5), torch.from_numpy(clouds))


def test_evaluate_prints_and_saves_the_metrics(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    refs = tmp_path / "refs"
    refs.mkdir()
    g = np.random.default_rng(0)
    for i in range(4):
        np.save(refs / f"r{i}.npy", g.normal(size=(512, 3)).astype(np.float32) * 0.2)
    out = tmp_path / "m.json"
    assert main(["evaluate", "psf_tiny", "--pretrained", str(path), "--ref", str(refs), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["num"] == 4 and set(report["metrics"]) == {"MMD-CD", "MMD-EMD", "COV-CD", "COV-EMD", "1-NNA-CD",
                                                            "1-NNA-EMD", "JSD"}
    assert f"{report['metrics']['MMD-CD']:.4g}" in printed


def test_sample_and_evaluate_refuse_bad_requests(tmp_path, capsys):
    assert main(["sample", "efficientvit_m0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a generator" in err and "psf_tiny" in err and "lsv_mannequin" in err
    assert main(["sample", "psf_car", "--out", str(tmp_path)]) == 2
    assert "--random" in capsys.readouterr().err
    assert main(["sample", "psf_tiny", "--random", "--steps", "0", "--out", str(tmp_path)]) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "r.npy", np.zeros((100, 3), np.float32))
    assert main(["evaluate", "psf_tiny", "--random", "--ref", str(bad)]) == 2
    assert "(512, 3)" in capsys.readouterr().err
    assert not list(tmp_path.glob("sample*"))


def test_ply_and_grid_helpers():
    pts = np.array([[0.0, 1.0, 2.0], [3.5, -1.0, 0.25]])
    text = ply_bytes(pts).decode()
    assert text.startswith("ply\nformat ascii 1.0\nelement vertex 2\n") and text.endswith("3.5 -1 0.25\n")
    img = render_grid(np.random.default_rng(1).normal(size=(5, 200, 3)), cell=64)
    assert img.size == (3 * 64, 2 * 64)


def test_shipped_psf_tiny_weights_generate_shapes_not_noise(tmp_path, capsys):
    """The demo path: psf_tiny's packaged weights load offline and make data-like clouds in one step."""
    from zoo.cli.demo import demo_psf
    from zoo.metrics import chamfer_distance
    from zoo.data.pointclouds import procedural_references

    card = zoo.model_card("psf_tiny")
    if card.default_tag is None:
        pytest.skip("no shipped psf_tiny weights in this checkout")
    demo_psf(tmp_path)
    clouds = torch.from_numpy(np.load(tmp_path / "psf_samples" / "samples.npy"))
    assert clouds.shape == (16, 512, 3) and (tmp_path / "psf_samples" / "samples.png").is_file()
    refs = procedural_references(16, 512, seed=99)
    # nearest reference per sample, against Gaussian clouds of the data's own spread
    std = float(refs.std())
    blobs = torch.randn(16, 512, 3, generator=torch.Generator().manual_seed(0)) * std

    def nearest(x):
        return torch.stack([chamfer_distance(x[i:i + 1].expand(16, -1, -1), refs).min() for i in range(16)]).mean()

    assert nearest(clouds) < 0.5 * nearest(blobs)


@pytest.mark.slow  # the dynamic-batch export runs by default (test_psf_export)
def test_export_psf_with_a_fixed_batch(tiny_ckpt, tmp_path):
    """`--batch-size` on a point model means ``(B, N, 3)``, not an image's ``(C, H, W)``."""
    path, _ = tiny_ckpt
    out = tmp_path / "x"
    assert main(["export", "psf_tiny", "--pretrained", str(path), "--format", "onnx", "--batch-size", "2",
                 "--out", str(out)]) == 0
    onnx_report = json.loads((out / "export-report.json").read_text())["exports"][0]
    assert onnx_report["inputs"][0]["shape"] == [2, 512, 3] and onnx_report["outputs"][0]["shape"] == [2, 512, 3]
    assert onnx_report["details"]["exporter"] == "torchscript" and onnx_report["comparisons"][0]["passed"]


def test_evaluate_refuses_fewer_than_two_samples(capsys):
    assert main(["evaluate", "psf_tiny", "--num", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
