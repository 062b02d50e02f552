"""Completion with a conditional PSF: the conditioning, the data, the three stages, the weights' widening."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import zoo
from tests.helpers import tiny_config
from zoo.data.pointclouds import ProceduralCompletion, crop_half
from zoo.errors import ConfigError, DataError
from zoo.models.psf.completion import ConditionedField, PSFCompletion, widen_state_dict
from zoo.models.psf.flow import sample_euler
from zoo.models.psf.pvcnn import PVCNN2
from zoo.train.engine import TrainConfig, setup_distributed
from zoo.train.psf import PSFConfig, PSFTask, PairsDataset, load_velocity, run_pipeline


def _cond_config():
    return tiny_config().replace(dropout=0.0, extra_feature_channels=1)


def test_crop_half_keeps_the_side_the_direction_points_to():
    pts = np.random.default_rng(0).normal(size=(500, 3))
    kept = crop_half(pts, [0, 0, 2.0])
    assert 0 < len(kept) < len(pts)
    assert ((kept - pts.mean(0))[:, 2] >= 0).all()
    rest = pts[~np.isin(pts[:, 0], kept[:, 0])]
    assert ((rest - pts.mean(0))[:, 2] < 0).all()


def test_completion_data_gives_a_half_and_the_whole():
    ds = ProceduralCompletion(8, num_points=128, num_given=32, seed=3, random_view=False)
    a, b = ds[2], ds[2]
    assert a["given"].shape == (32, 3) and a["train_points"].shape == (96, 3) and a["complete"].shape == (128, 3)
    torch.testing.assert_close(a["given"], b["given"])  # fixed per index without random_view
    # the given points lie on one side of the shape's centre, across the cut's normal
    centre = torch.from_numpy(ds.shapes.points[2, :ds.shapes.half].mean(0)).float()
    assert ((a["given"] - centre) @ a["direction"] >= -1e-6).all()
    assert ((a["train_points"] - centre) @ a["direction"] < 0).any()  # the whole shape, both sides
    rnd = ProceduralCompletion(8, num_points=128, num_given=32, seed=3, random_view=True)
    assert not torch.equal(rnd[2]["given"], rnd[2]["given"])
    with pytest.raises(DataError):
        ProceduralCompletion(4, num_points=64, num_given=64)


def test_the_field_sees_the_given_points_with_their_flag():
    torch.manual_seed(0)
    net = PVCNN2(_cond_config()).eval()
    given = torch.randn(2, 32, 3)
    x = torch.randn(2, 96, 3)
    t = torch.rand(2)
    v = ConditionedField(net, given)(x, t)
    assert v.shape == (2, 96, 3)
    flag = torch.cat([torch.ones(2, 32, 1), torch.zeros(2, 96, 1)], 1)
    torch.testing.assert_close(v, net(torch.cat([given, x], 1), t, flag)[:, 32:])
    moved = ConditionedField(net, given + 0.3)(x, t)
    assert (moved - v).abs().max() > 1e-4  # the generated points' velocity depends on the given ones
    with pytest.raises(ValueError, match="feature channel"):
        net(torch.cat([given, x], 1), t)


def test_widening_a_generator_keeps_its_field_where_the_flag_is_zero():
    torch.manual_seed(0)
    gen = PVCNN2(tiny_config().replace(dropout=0.0)).eval()
    cond = PVCNN2(_cond_config()).eval()
    cond.load_state_dict(widen_state_dict(gen.state_dict(), cond))
    x, t = torch.randn(2, 128, 3), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(cond(x, t, torch.zeros(2, 128, 1)), gen(x, t), rtol=1e-5, atol=1e-5)
        # the flag's weights start at zero: it changes nothing until training uses it
        torch.testing.assert_close(cond(x, t, torch.ones(2, 128, 1)), gen(x, t), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="does not fit"):
        widen_state_dict({"nothing": torch.zeros(1)}, cond)


def test_model_keeps_the_given_points_and_accepts_any_partial_size():
    m = zoo.create_model("psf_tiny_completion")
    assert (m.num_given, m.num_generated) == (128, 384)
    partial = torch.rand(300, 3) - 0.5
    given = m.prepare_given(partial)
    assert given.shape == (1, 128, 3)
    # farthest-point sampling keeps input points (no new ones)
    assert (given[0][:, None] - partial[None]).norm(dim=-1).min(1).values.max() < 1e-7
    few = m.prepare_given(partial[:20])
    assert few.shape == (1, 128, 3) and set(map(tuple, few[0].tolist())) == set(map(tuple, partial[:20].tolist()))
    out = m.complete(partial, steps=1, seed=0, num=2)
    assert out.shape == (2, 512, 3)
    torch.testing.assert_close(out[:, :128], given.expand(2, -1, -1))
    noise = torch.randn(2, 384, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(out, m(given.expand(2, -1, -1), noise))
    for bad, match in ((torch.rand(15, 3), "at least 16"), (torch.rand(30, 2), r"\[M, 3\]"),
                       (torch.full((30, 3), float("nan")), "NaN")):
        with pytest.raises(ConfigError, match=match):
            m.prepare_given(bad)


def test_completion_through_the_three_stages(tmp_path):
    torch.manual_seed(0)
    gen_cfg = tiny_config().replace(dropout=0.0)
    cfg = _cond_config()
    tc = lambda e, lr: TrainConfig(epochs=e, opt="adam", lr=lr, weight_decay=0.0, batch_size=4,  # noqa: E731
                                   log_interval=0)
    # a generator checkpoint to start the conditional flow from
    start = tmp_path / "generator.safetensors"
    from safetensors.torch import save_file

    save_file(PVCNN2(gen_cfg).state_dict(), str(start))
    paths = run_pipeline(tmp_path / "run", cfg, {"flow": tc(3, 2e-3), "reflow": tc(2, 5e-4), "distill": tc(2, 5e-4)},
                         num_shapes=12, num_pairs=8, reflow_steps=3, distill_steps=3, batch_size=4, distill_pairs=8,
                         num_given=32, flow_init=start)
    rows = list(csv.DictReader(open(tmp_path / "run" / "flow" / "summary.csv")))
    assert float(rows[-1]["eval_loss"]) < float(rows[0]["eval_loss"])
    pairs = load_file(str(paths["pairs_reflow"]))
    assert pairs["given"].shape == (8, 32, 3) and pairs["x0"].shape == (8, 96, 3)
    flow_model = load_velocity(paths["flow"], cfg).eval()
    torch.testing.assert_close(sample_euler(ConditionedField(flow_model, pairs["given"]), pairs["x0"], 3),
                               pairs["x1"], atol=1e-5, rtol=1e-4)
    env = setup_distributed("cpu")
    check = PSFTask(PSFConfig(stage="distill", model=cfg, pairs=str(paths["pairs_distill"]), val_fraction=0,
                              batch_size=4, num_given=32), env)
    before = check.evaluate(load_velocity(paths["reflow"], cfg))["loss"]
    after = check.evaluate(load_velocity(paths["distill"], cfg))["loss"]
    assert after < before
    # generator pairs do not train the completion model, nor the other way round
    with pytest.raises(ConfigError, match="completion pairs"):
        PSFTask(PSFConfig(stage="distill", model=gen_cfg.replace(extra_feature_channels=0),
                          pairs=str(paths["pairs_distill"])), env)
    assert len(PairsDataset(paths["pairs_distill"])[0]) == 3
    # the trained weights load into the card's model class through the official-key layout
    m = PSFCompletion(cfg, 32)
    from zoo.hub import read_state_dict

    sd = read_state_dict(paths["distill"], prefer_ema=True)
    m.velocity.load_state_dict(sd)
    out = m.complete(torch.rand(40, 3), seed=1)
    assert out.shape == (1, 128, 3) and torch.isfinite(out).all()


def _binary_ply(points: np.ndarray, faces: bool = False) -> bytes:
    head = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(points)}\nproperty float x\n"
            "property float y\nproperty float z\nproperty uchar red\n"
            + ("element face 1\nproperty list uchar int vertex_indices\n" if faces else "") + "end_header\n")
    rec = np.zeros(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1")])
    rec["x"], rec["y"], rec["z"] = points.T
    body = rec.tobytes() + (np.array([3], "u1").tobytes() + np.arange(3, dtype="<i4").tobytes() if faces else b"")
    return head.encode() + body


def test_read_cloud_reads_npy_and_ply_and_refuses_what_is_not_a_cloud(tmp_path):
    from zoo.data.pointcloud_io import ply_bytes, read_cloud

    pts = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", pts)
    np.save(tmp_path / "b.npy", pts[None])
    (tmp_path / "c.ply").write_bytes(ply_bytes(pts))
    (tmp_path / "d.ply").write_bytes(_binary_ply(pts))
    for name in ("a.npy", "b.npy", "d.ply"):
        np.testing.assert_array_equal(read_cloud(tmp_path / name), pts)
    np.testing.assert_allclose(read_cloud(tmp_path / "c.ply"), pts, rtol=1e-5, atol=1e-6)  # 6 digits in ASCII
    bad = {"mesh.ply": (_binary_ply(pts, faces=True), "mesh"), "text.ply": (b"hello world\n", "not a PLY"),
           "noz.ply": (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nend_header\n"
                       b"1 2\n", "x, y and z"),
           "short.ply": (b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                         b"property float z\nend_header\n1 2 3\n", "header"),
           "cloud.txt": (b"1 2 3\n", ".npy or .ply")}
    for name, (data, match) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=match):
            read_cloud(tmp_path / name)
    np.save(tmp_path / "flat.npy", pts[:, :2])
    with pytest.raises(DataError, match=r"\[M, 3\]"):
        read_cloud(tmp_path / "flat.npy")


def test_complete_command_writes_clouds_and_a_picture(tmp_path, capsys):
    import json

    from PIL import Image

    from zoo.cli import main

    partial = ProceduralCompletion(4, 512, 200, seed=9, random_view=False)[0]["given"].numpy()
    (tmp_path / "partial.ply").write_bytes(_binary_ply(partial))
    out = tmp_path / "out"
    assert main(["complete", "psf_tiny_completion", "--random", "--input", str(tmp_path / "partial.ply"),
                 "--num", "2", "--out", str(out)]) == 0
    clouds = np.load(out / "completions.npy")
    assert clouds.shape == (2, 512, 3)
    # the first 128 points of each output are input points
    d = np.sqrt(((clouds[:, :128, None] - partial[None, None]) ** 2).sum(-1)).min(-1)
    assert d.max() < 1e-6
    assert (out / "completion_001.ply").is_file()
    assert Image.open(out / "completion.png").size[0] == 3 * 160  # partial + two completions
    report = json.loads((out / "completion.json").read_text())
    assert report["input_points"] == 200 and report["given_points"] == 128
    assert "200 given points" in capsys.readouterr().out
    # refused before anything is written: too few points, a mesh, a generator's name
    np.save(tmp_path / "few.npy", partial[:15])
    (tmp_path / "mesh.ply").write_bytes(_binary_ply(partial, faces=True))
    for argv, match in ((["psf_tiny_completion", "--random", "--input", str(tmp_path / "few.npy")], "at least 16"),
                        (["psf_tiny_completion", "--random", "--input", str(tmp_path / "mesh.ply")], "mesh"),
                        (["psf_tiny", "--input", str(tmp_path / "partial.ply")], "point-cloud-generation")):
        dest = tmp_path / "refused"
        assert main(["complete", *argv, "--out", str(dest)]) == 2
        assert match in capsys.readouterr().err
        assert not dest.exists()


def test_completion_exports_to_onnx_with_both_inputs(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from zoo.export import to_onnx

    torch.manual_seed(0)
    model = PSFCompletion(_cond_config(), 32).eval()
    report = to_onnx(model, tmp_path / "c.onnx", verbose=False)
    assert [i["name"] for i in report.inputs] == ["given", "noise"]
    assert [c.batch_size for c in report.comparisons] == [1, 3] and max(c.rel_diff for c in report.comparisons) < 1e-4
    given, noise = torch.rand(2, 32, 3) - 0.5, torch.randn(2, 96, 3)
    (out,) = ort.InferenceSession(str(tmp_path / "c.onnx")).run(None, {"given": given.numpy(), "noise": noise.numpy()})
    np.testing.assert_allclose(out[:, :32], given.numpy(), atol=1e-6)  # the given points pass through
    with torch.no_grad():
        np.testing.assert_allclose(out, model(given, noise).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # about a minute of conversion
def test_completion_converts_to_coreml(tmp_path):
    pytest.importorskip("coremltools")
    from zoo.export import to_coreml

    report = to_coreml(PSFCompletion(_cond_config(), 32), tmp_path / "c.mlpackage", image_input=False,
                       precision="fp32", verbose=False)
    assert [i["name"] for i in report.inputs] == ["given", "noise"]
    assert report.outputs[0]["shape"] == [1, 128, 3]


def test_shipped_completion_weights_complete_held_out_halves():
    """On shapes no training run drew, one step lands far closer to the whole shape than the half it was given."""
    from zoo.data.pointclouds import ProceduralShapes
    from zoo.metrics.pointcloud import chamfer_distance

    model = zoo.create_model("psf_tiny_completion", pretrained=True)
    shapes = ProceduralShapes(8, tr_sample_size=512, te_sample_size=512, seed=777, random_subsample=False)
    rng = np.random.default_rng(0)
    partials = [crop_half(shapes.points[i, :shapes.half], rng.normal(size=3)) for i in range(8)]
    truth = torch.from_numpy(shapes.points[:, shapes.half:shapes.half + 512]).float()
    done = model.complete(partials, seed=0)
    cd_done = chamfer_distance(done, truth)
    cd_part = torch.cat([chamfer_distance(torch.from_numpy(p)[None].float(), truth[i:i + 1])
                         for i, p in enumerate(partials)])
    assert float(cd_done.mean()) < 0.5 * float(cd_part.mean())
    assert float(done.abs().max()) < 0.75