"""Point cloud datasets: the PC15k loader on a fake tree, and the procedural shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.errors import DataError
from zoo.data.pointclouds import PROCEDURAL_CLASSES, SYNSET_IDS, ProceduralShapes, ShapeNetPC15k


def fake_pc15k(root, shapes_per_cat=3):
    rng = np.random.default_rng(0)
    raw = {}
    for cat in ("airplane", "chair"):
        for split in ("train", "test"):
            folder = root / SYNSET_IDS[cat] / split
            folder.mkdir(parents=True)
            for k in range(shapes_per_cat):
                pts = (rng.normal(size=(15000, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 0.0]).astype(np.float32)
                np.save(folder / f"{cat}{k}.npy", pts)
                raw[(cat, split, k)] = pts
    return raw


def test_pc15k_split_points_and_global_normalization(tmp_path):
    raw = fake_pc15k(tmp_path)
    ds = ShapeNetPC15k(tmp_path, categories=("airplane", "chair"), split="train",
                       tr_sample_size=2048, te_sample_size=5000, random_subsample=False)
    assert len(ds) == 6
    stack = np.stack([raw[(c, "train", k)] for c in ("airplane", "chair") for k in range(3)]).astype(np.float64)
    mean = stack.reshape(-1, 3).mean(0)
    std = stack.reshape(-1).std()  # one std over all axes
    item = ds[0]
    sid, mid = item["sid"], item["mid"]
    cat = "airplane" if sid == SYNSET_IDS["airplane"] else "chair"
    src = raw[(cat, "train", int(mid[-1]))]
    np.testing.assert_allclose(item["train_points"].numpy(), (src[:2048] - mean) / std, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(item["test_points"].numpy(), (src[10000:15000] - mean) / std, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(item["mean"].numpy()[0], mean, rtol=1e-5)
    assert item["cate_idx"] == ("airplane", "chair").index(cat)
    # the order is PointFlow's fixed shuffle, not file order, and it is stable
    again = ShapeNetPC15k(tmp_path, categories=("airplane", "chair"), random_subsample=False)
    assert [again[i]["mid"] for i in range(6)] == [ds[i]["mid"] for i in range(6)]
    # the test split normalizes with the training statistics when given
    te = ShapeNetPC15k(tmp_path, ("airplane", "chair"), split="test", mean=ds.mean, std=ds.std)
    np.testing.assert_allclose(te.mean, ds.mean)
    # random subsampling draws from the first 10,000 points only
    sub = ShapeNetPC15k(tmp_path, ("airplane",), tr_sample_size=512)
    pts = sub[0]["train_points"]
    assert pts.shape == (512, 3)
    full = torch.from_numpy(sub.points[0, :10000])
    assert torch.cdist(pts, full, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() == 0


def test_pc15k_bad_input(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ShapeNetPC15k(tmp_path, ("airplane",))
    with pytest.raises(DataError, match="unknown categories"):
        ShapeNetPC15k(tmp_path, ("spaceship",))
    folder = tmp_path / SYNSET_IDS["car"] / "train"
    folder.mkdir(parents=True)
    np.save(folder / "bad.npy", np.zeros((100, 3)))
    with pytest.raises(DataError, match="15000"):
        ShapeNetPC15k(tmp_path, ("car",))


def box_face_residual(points: np.ndarray) -> float:
    """The largest distance of a point from the nearest face of the best-fitting box that is
    rotated about the vertical (y) axis only, over rotations in 0.0005-rad steps."""
    y = np.abs(points[:, 1])
    theta = np.arange(0, np.pi / 2, 5e-4)[:, None]
    xr = np.abs(points[None, :, 0] * np.cos(theta) + points[None, :, 2] * np.sin(theta))
    zr = np.abs(-points[None, :, 0] * np.sin(theta) + points[None, :, 2] * np.cos(theta))
    off = np.minimum(np.abs(xr - xr.max(1, keepdims=True)), np.abs(zr - zr.max(1, keepdims=True)))
    off = np.minimum(off, np.abs(y - y.max())[None])  # a point on the top or bottom face is on a face
    return float(off.max(1).min())


def test_procedural_shapes_are_deterministic_bounded_and_distinct():
    a = ProceduralShapes(num_shapes=8, tr_sample_size=256, te_sample_size=128, seed=3)
    b = ProceduralShapes(num_shapes=8, tr_sample_size=256, te_sample_size=128, seed=3)
    assert np.array_equal(a.points, b.points)
    assert not np.array_equal(a.points, ProceduralShapes(8, tr_sample_size=256, te_sample_size=128, seed=4).points)
    assert np.linalg.norm(a.points, axis=-1).max() <= 0.5
    item = a[5]
    assert item["train_points"].shape == (256, 3) and item["test_points"].shape == (128, 3)
    assert item["sid"] == PROCEDURAL_CLASSES[5 % 4]
    # a box's points lie on its faces: in the box's frame (a rotation about the vertical axis,
    # found by search) every point has one coordinate at +-half; a solid box, a sphere or any
    # other cloud leaves points off every face
    box = ProceduralShapes(num_shapes=1, classes=("box",), tr_sample_size=64, te_sample_size=64).points[0]
    assert box_face_residual(box) < 2e-3
    solid = np.random.default_rng(0).uniform(-1, 1, size=box.shape) * np.abs(box).max(0)
    assert box_face_residual(solid) > 2e-2
    # a torus has a hole: no points near its axis
    torus = ProceduralShapes(num_shapes=1, classes=("torus",)).points[0]
    assert np.linalg.norm(torus[:, [0, 2]], axis=1).min() > 0.05
    with pytest.raises(DataError):
        ProceduralShapes(classes=("pyramid",))
