"""Point cloud datasets: ShapeNetCore.v2.PC15k (PointFlow's layout) and a built-in procedural set.

Both return the same item, a dict:
``train_points [tr_sample_size, 3]``, ``test_points [te_sample_size, 3]`` (float32),
``idx``, ``cate_idx``, ``mean [1,3]``, ``std [1,1]``, ``sid`` (category), ``mid`` (shape id),
so the generation tasks and the metrics do not care which one they read.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.errors import DataError

__all__ = ["SYNSET_IDS", "ShapeNetPC15k", "ProceduralShapes", "PROCEDURAL_CLASSES", "global_normalize",
           "procedural_references", "crop_half", "ProceduralCompletion"]

# The categories the PSF paper reports on; PointFlow's list has all 55.
SYNSET_IDS = {"airplane": "02691156", "chair": "03001627", "car": "02958343", "table": "04379243",
              "lamp": "03636649", "sofa": "04256520", "rifle": "04090263", "vessel": "04530566"}


def global_normalize(points: np.ndarray, stats_from: np.ndarray, mean=None, std=None):
    """PointFlow's normalization: ``(points - mean) / std`` with one mean per axis and one std.

    The statistics come from ``stats_from`` unless both ``mean`` and
    ``std`` are given. Returns ``(normalized float32 points, mean [1,3], std [1,1])``.
    """
    if (mean is None) != (std is None):
        raise DataError("pass both mean and std (the training split's), or neither")
    if mean is None:
        # Statistics in float64: float32 sums over millions of points drift in the 5th digit.
        flat = stats_from.reshape(-1, 3).astype(np.float64)
        mean, std = flat.mean(0), flat.reshape(-1).std()
    mean = np.asarray(mean, np.float64).reshape(1, 3)
    std = np.asarray(std, np.float64).reshape(1, 1)
    return ((points - mean[None]) / std[None]).astype(np.float32), mean, std


def procedural_references(num: int, num_points: int, seed: int = 1234) -> torch.Tensor:
    """``[num, num_points, 3]`` held-out procedural clouds (test points, no subsampling) to evaluate against."""
    ds = ProceduralShapes(num, tr_sample_size=num_points, te_sample_size=num_points, seed=seed,
                          random_subsample=False)
    return torch.stack([ds[i]["test_points"] for i in range(len(ds))])


class ShapeNetPC15k(Dataset):
    """ShapeNetCore.v2.PC15k as PointFlow and PVD read it.

    Layout: ``<root>/<synset id>/<split>/<shape id>.npy``, each ``[15000, 3]``. Points
    0-9,999 are the training points, 10,000-14,999 the test points. The whole split is
    normalized with **one global mean per axis and one global std** over every point of every
    shape (``normalize_per_shape=False, normalize_std_per_axis=False`` in PointFlow); pass
    the training set's ``mean``/``std`` to a test split, as PointFlow does. Shapes are put in
    PointFlow's deterministic order (shuffled with ``random.Random(38383)``). With
    ``random_subsample`` each item draws ``tr_sample_size`` of the 10,000 training points
    **with replacement** (``np.random.choice``'s default, as the original code), else it
    takes the first ones.
    """

    def __init__(self, root: str | Path, categories=("airplane",), split: str = "train",
                 tr_sample_size: int = 2048, te_sample_size: int = 2048,
                 random_subsample: bool = True, mean: np.ndarray | None = None,
                 std: np.ndarray | None = None):
        if split not in ("train", "val", "test"):
            raise DataError(f"split must be train, val or test, not {split!r}")
        unknown = [c for c in categories if c not in SYNSET_IDS and not str(c).isdigit()]
        if unknown:
            raise DataError(f"unknown categories {unknown}; known: {sorted(SYNSET_IDS)} "
                            "(or pass synset ids)")
        root = Path(root)
        shapes, cate, mids = [], [], []
        for ci, cat in enumerate(categories):
            sid = SYNSET_IDS.get(cat, cat)
            folder = root / sid / split
            if not folder.is_dir():
                raise DataError(f"{folder} does not exist: download ShapeNetCore.v2.PC15k (PointFlow's "
                                f"release) and pass its folder as root, with <synset>/{split}/*.npy inside")
            for f in sorted(folder.glob("*.npy")):
                pts = np.load(f)
                if pts.shape != (15000, 3):
                    raise DataError(f"{f} holds {pts.shape}; PC15k files are [15000, 3]")
                shapes.append(pts.astype(np.float32))
                cate.append(ci)
                mids.append((sid, f.stem))
        if not shapes:
            raise DataError(f"no .npy shapes under {root} for {list(categories)} / {split}")
        order = list(range(len(shapes)))
        random.Random(38383).shuffle(order)
        self.points = np.stack([shapes[i] for i in order])  # [S,15000,3]
        self.cate_idx = [cate[i] for i in order]
        self.mids = [mids[i] for i in order]
        self.points, self.mean, self.std = global_normalize(self.points, self.points, mean, std)  # all 15,000, as PointFlow
        self.tr_sample_size = min(10000, tr_sample_size)
        self.te_sample_size = min(5000, te_sample_size)
        self.random_subsample = random_subsample

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, idx: int) -> dict:
        train, test = self.points[idx, :10000], self.points[idx, 10000:]
        if self.random_subsample:
            tr = np.random.choice(train.shape[0], self.tr_sample_size)
            te = np.random.choice(test.shape[0], self.te_sample_size)
        else:
            tr, te = np.arange(self.tr_sample_size), np.arange(self.te_sample_size)
        sid, mid = self.mids[idx]
        return {"idx": idx, "train_points": torch.from_numpy(train[tr]).float(),
                "test_points": torch.from_numpy(test[te]).float(), "cate_idx": self.cate_idx[idx],
                "mean": torch.from_numpy(self.mean).float(), "std": torch.from_numpy(self.std).float(),
                "sid": sid, "mid": mid}


def _sample_surface(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` points uniformly on one random shape of ``kind``, roughly inside radius 0.45."""
    if kind == "ellipsoid":
        radii = rng.uniform(0.15, 0.4, size=3)
        d = rng.normal(size=(n, 3))
        return d / np.linalg.norm(d, axis=1, keepdims=True) * radii  # near-uniform for mild axes
    if kind == "box":
        half = rng.uniform(0.1, 0.3, size=3)
        areas = np.array([half[1] * half[2], half[0] * half[2], half[0] * half[1]]).repeat(2)
        face = rng.choice(6, size=n, p=areas / areas.sum())
        pts = rng.uniform(-1, 1, size=(n, 3)) * half
        axis = face // 2
        pts[np.arange(n), axis] = np.where(face % 2 == 0, -1, 1) * half[axis]
        return pts
    if kind == "torus":
        big, small = rng.uniform(0.2, 0.3), rng.uniform(0.05, 0.12)
        # rejection sampling makes the area density uniform: weight 1 + (r/R) cos(v)
        u = rng.uniform(0, 2 * math.pi, size=4 * n)
        v = rng.uniform(0, 2 * math.pi, size=4 * n)
        keep = rng.uniform(0, 1 + small / big, size=4 * n) < 1 + small / big * np.cos(v)
        u, v = u[keep][:n], v[keep][:n]
        ring = big + small * np.cos(v)
        return np.stack([ring * np.cos(u), small * np.sin(v), ring * np.sin(u)], 1)
    if kind == "cylinder":
        r, h = rng.uniform(0.1, 0.25), rng.uniform(0.2, 0.4)
        side, cap = 2 * math.pi * r * 2 * h, math.pi * r * r
        part = rng.choice(3, size=n, p=np.array([side, cap, cap]) / (side + 2 * cap))
        t = rng.uniform(0, 2 * math.pi, size=n)
        rad = np.where(part == 0, r, r * np.sqrt(rng.uniform(0, 1, size=n)))
        y = np.where(part == 0, rng.uniform(-h, h, size=n), np.where(part == 1, h, -h))
        return np.stack([rad * np.cos(t), y, rad * np.sin(t)], 1)
    raise DataError(f"unknown procedural shape {kind!r}")


PROCEDURAL_CLASSES = ("ellipsoid", "box", "torus", "cylinder")


class ProceduralShapes(Dataset):
    """Built-in shapes with random parameters: no download, deterministic per (seed, index).

    ``classes`` picks among ellipsoids, boxes, tori and capped cylinders (area-uniform
    surface samples), shape ``i`` is of class ``classes[i % len(classes)]`` with its own
    random size and a random rotation about the vertical axis. Points lie inside the
    radius-0.5 ball, the unit cube the JSD grid covers. By default the points are given as
    they are (``mean`` 0, ``std`` 1). ``normalize=True`` applies PC15k's global
    normalization (one mean per axis, one std over everything, computed on this set unless
    ``mean``/``std`` are given): generative flows start from ``N(0, I)`` noise and learn
    better when the data has a comparable scale.
    """

    def __init__(self, num_shapes: int = 64, classes=PROCEDURAL_CLASSES, tr_sample_size: int = 2048,
                 te_sample_size: int = 2048, seed: int = 0, random_subsample: bool = True,
                 normalize: bool = False, mean=None, std=None):
        bad = [c for c in classes if c not in PROCEDURAL_CLASSES]
        if bad or not classes:
            raise DataError(f"classes must be a non-empty subset of {PROCEDURAL_CLASSES}, got {list(classes)}")
        if num_shapes < 1:
            raise DataError("num_shapes must be at least 1")
        self.classes = tuple(classes)
        self.tr_sample_size, self.te_sample_size = tr_sample_size, te_sample_size
        self.random_subsample = random_subsample
        pool = max(tr_sample_size, te_sample_size) * 2
        self.points = np.empty((num_shapes, pool, 3), dtype=np.float32)
        for i in range(num_shapes):
            rng = np.random.default_rng([seed, i])
            pts = _sample_surface(self.classes[i % len(self.classes)], rng, pool)
            angle = rng.uniform(0, 2 * math.pi)
            c, s = math.cos(angle), math.sin(angle)
            rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
            self.points[i] = pts @ rot.T
        self.half = pool // 2  # first half for training draws, second for test, as PC15k
        self.mean, self.std = np.zeros((1, 3)), np.ones((1, 1))
        if normalize:
            self.points, self.mean, self.std = global_normalize(self.points, self.points[:, :self.half], mean, std)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, idx: int) -> dict:
        train, test = self.points[idx, :self.half], self.points[idx, self.half:]
        if self.random_subsample:
            tr = np.random.choice(self.half, self.tr_sample_size, replace=False)
            te = np.random.choice(self.half, self.te_sample_size, replace=False)
        else:
            tr, te = np.arange(self.tr_sample_size), np.arange(self.te_sample_size)
        cls = idx % len(self.classes)
        return {"idx": idx, "train_points": torch.from_numpy(train[tr]), "test_points": torch.from_numpy(test[te]),
                "cate_idx": cls, "mean": torch.from_numpy(self.mean).float(), "std": torch.from_numpy(self.std).float(),
                "sid": self.classes[cls], "mid": f"{self.classes[cls]}_{idx:04d}"}


def crop_half(points: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """The points ``[M,3]`` of ``points [N,3]`` on the side of the centroid that ``direction`` points to:
    what a cut through the middle of the shape leaves (the partial input of completion)."""
    d = np.asarray(direction, np.float64).reshape(3)
    d = d / max(np.linalg.norm(d), 1e-12)
    keep = (points - points.mean(0)) @ d >= 0
    return points[keep]


class ProceduralCompletion(Dataset):
    """Partial/complete pairs made from `ProceduralShapes`, for the completion model.

    Item: ``given [num_given,3]`` (``num_given`` points drawn from the half of the shape
    that a cut through its centroid, normal to a random direction, leaves), ``train_points
    [num_points - num_given, 3]`` (points of the whole shape: what the model generates),
    ``complete [num_points, 3]`` (held-out points of the whole shape, to measure against),
    plus ``idx``, ``mean``, ``std``. With ``random_view`` (training) the direction and the
    draws change on every access; without it they are fixed per ``(seed, index)``
    (evaluation). Normalization as `ProceduralShapes` (``mean``/``std`` from the training set).
    """

    def __init__(self, num_shapes: int = 64, num_points: int = 512, num_given: int = 128, seed: int = 0,
                 random_view: bool = True, normalize: bool = False, mean=None, std=None):
        if not 1 <= num_given < num_points:
            raise DataError(f"num_given must be in [1, {num_points}), not {num_given}")
        self.shapes = ProceduralShapes(num_shapes, tr_sample_size=num_points, te_sample_size=num_points, seed=seed,
                                       normalize=normalize, mean=mean, std=std)
        self.mean, self.std = self.shapes.mean, self.shapes.std
        self.num_points, self.num_given, self.seed, self.random_view = num_points, num_given, seed, random_view

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, idx: int) -> dict:
        rng = np.random.default_rng(np.random.randint(2 ** 31)) if self.random_view else np.random.default_rng([self.seed, idx, 7])
        sh = self.shapes
        train, test = sh.points[idx, :sh.half], sh.points[idx, sh.half:]
        direction = rng.normal(size=3)
        visible = crop_half(train, direction)
        given = visible[rng.choice(len(visible), self.num_given, replace=len(visible) < self.num_given)]
        gen = train[rng.choice(sh.half, self.num_points - self.num_given, replace=False)]
        complete = test[rng.choice(sh.half, self.num_points, replace=False)]
        return {"idx": idx, "given": torch.from_numpy(given.astype(np.float32)),
                "train_points": torch.from_numpy(gen.astype(np.float32)),
                "complete": torch.from_numpy(complete.astype(np.float32)),
                "direction": torch.from_numpy(direction.astype(np.float32)),
                "mean": torch.from_numpy(self.mean).float(), "std": torch.from_numpy(self.std).float()}
