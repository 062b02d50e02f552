"""KITTI label and result sets for checking `zoo.metrics.kitti` against OpenPCDet's evaluator.

numpy only, so `make_kitti_reference.py` can run it beside OpenPCDet's numba code. Each case is
a folder pair (gt/, pred/) written with KITTI's decimals; the edge cases the official rules
turn on are planted on purpose: box heights of exactly 25 and 40 px (and just above and
below), truncation at exactly 0.15 / 0.30 / 0.50, every occlusion level, frames without
objects, frames without a result file, DontCare regions with detections on them, Van and
Person_sitting beside Car and Pedestrian, detections shorter than the height limits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CASES = {
    # name: (seed, frames, with alpha in the predictions)
    "mixed": (1, 60, True),
    "mixed_no_alpha": (2, 40, False),
    "crowded": (3, 25, True),
    "many": (4, 150, True),
}

_SIZES = {  # h, w, l means (KITTI's statistics, roughly)
    "Car": (1.53, 1.63, 3.88), "Van": (2.2, 1.9, 5.1), "Truck": (3.2, 2.6, 10.0),
    "Pedestrian": (1.76, 0.66, 0.84), "Person_sitting": (1.27, 0.59, 0.80), "Cyclist": (1.74, 0.60, 1.76),
}
_P2 = np.array([[721.5377, 0.0, 609.5593, 44.85728], [0.0, 721.5377, 172.854, 0.2163791], [0.0, 0.0, 1.0, 0.002745884]])
_EDGE_HEIGHTS = (25.0, 40.0, 24.99, 25.01, 39.99, 40.01)
_EDGE_TRUNC = (0.15, 0.3, 0.5, 0.14, 0.31, 0.51, 0.0)


def _project_box(loc, dims, ry):
    h, w, l = dims
    sx = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * l / 2
    sz = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * w / 2
    sy = np.array([0, 0, 0, 0, -h, -h, -h, -h])
    c, s = np.cos(ry), np.sin(ry)
    pts = np.stack([c * sx + s * sz + loc[0], sy + loc[1], -s * sx + c * sz + loc[2]], 1)
    uvw = pts @ _P2[:, :3].T + _P2[:, 3]
    uv = uvw[:, :2] / uvw[:, 2:3]
    return [uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(), uv[:, 1].max()]


def _object(rng, cls):
    h, w, l = (np.array(_SIZES[cls]) * rng.uniform(0.85, 1.15, 3)).round(2)
    loc = np.array([rng.uniform(-12, 12), rng.uniform(1.4, 1.9), rng.uniform(4, 42)]).round(2)
    ry = round(rng.uniform(-np.pi, np.pi), 2)
    bbox = np.array(_project_box(loc, (h, w, l), ry))
    if rng.random() < 0.25:  # plant a height edge, exact in binary from an integer top
        bbox[1] = np.floor(bbox[1])
        bbox[3] = bbox[1] + rng.choice(_EDGE_HEIGHTS)
    bbox = bbox.round(2)
    trunc = float(rng.choice(_EDGE_TRUNC)) if rng.random() < 0.4 else round(rng.uniform(0, 0.6) ** 2, 2)
    occ = int(rng.choice(4, p=[0.5, 0.25, 0.15, 0.1]))
    alpha = round(ry - np.arctan2(loc[0], loc[2]), 2)
    return [cls, trunc, occ, alpha, *bbox, h, w, l, *loc, ry]


def _dontcare(rng):
    x, y = rng.uniform(0, 1100), rng.uniform(120, 300)
    return ["DontCare", -1, -1, -10, round(x, 2), round(y, 2), round(x + rng.uniform(15, 60), 2),
            round(y + rng.uniform(15, 50), 2), -1, -1, -1, -1000, -1000, -1000, -10]


def _detection(rng, obj, with_alpha, noise):
    cls, _, _, alpha, *rest = obj
    bbox, dims, loc, ry = np.array(rest[:4]), np.array(rest[4:7]), np.array(rest[7:10]), rest[10]
    loc = loc + rng.normal(0, noise, 3) * np.array([1, 0.3, 1])
    dims = dims * np.exp(rng.normal(0, noise / 3, 3))
    ry = ry + rng.normal(0, noise) + (np.pi if rng.random() < 0.1 else 0.0)
    bbox = bbox + rng.normal(0, 25 * noise, 4)
    alpha = alpha + (ry - rest[10]) if with_alpha else -10
    # good detections mostly score higher, so the precision-recall curves are not flat
    score = rng.random() if noise == 0 else float(np.clip(1.0 - 2 * noise + rng.normal(0, 0.15), 0.01, 1))
    return [cls, -1, -1, alpha, *bbox, *dims, *loc, ry, score]


def make_case(name: str):
    """Lists of label rows per frame: (ground truth, predictions or None for no file)."""
    seed, frames, with_alpha = CASES[name]
    rng = np.random.default_rng(seed)
    crowd = 14 if name == "crowded" else 7
    out = []
    for f in range(frames):
        gt, dt = [], []
        if f % 9 != 4:  # some frames hold no objects at all
            for _ in range(int(rng.integers(0, crowd))):
                cls = rng.choice(["Car", "Car", "Car", "Van", "Pedestrian", "Pedestrian",
                                  "Person_sitting", "Cyclist", "Truck"])
                gt.append(_object(rng, str(cls)))
            for _ in range(int(rng.integers(0, 4))):
                gt.append(_dontcare(rng))
        for obj in gt:
            if obj[0] == "DontCare":
                if rng.random() < 0.5:  # a detection on a DontCare region
                    x0, y0, x1, y1 = obj[4:8]
                    fake = _object(rng, "Car")
                    fake[4:8] = [x0 + 2, y0 + 2, x1 - 1, y1 - 1]
                    dt.append(_detection(rng, fake, with_alpha, 0.0))
                continue
            if rng.random() < 0.85:
                dt.append(_detection(rng, obj, with_alpha, rng.choice([0.02, 0.05, 0.1, 0.3])))
            if rng.random() < 0.15:  # a duplicate
                dt.append(_detection(rng, obj, with_alpha, 0.2))
        for _ in range(int(rng.integers(0, 4))):  # false positives, some short
            cls = str(rng.choice(["Car", "Pedestrian", "Cyclist"]))
            dt.append(_detection(rng, _object(rng, cls), with_alpha, 0.0))
        for d in dt:
            if rng.random() < 0.1:  # and some renamed to a wrong class
                d[0] = str(rng.choice(["Car", "Pedestrian", "Cyclist"]))
        no_file = f % 11 == 7
        out.append((gt, None if no_file else dt))
    return out


def _fmt(row, score: bool) -> str:
    cls, trunc, occ, *v = row
    nums = v[:-1] if score else v
    line = f"{cls} {float(trunc):.2f} {int(occ)} " + " ".join(f"{float(x):.{4 if score else 2}f}" for x in nums)
    return line + (f" {float(v[-1]):.4f}" if score else "")


def write_case(name: str, root: Path) -> tuple[Path, Path]:
    """Write case `name` as ``root/gt/*.txt`` and ``root/pred/*.txt``; returns the folders."""
    gt_dir, pred_dir = root / "gt", root / "pred"
    gt_dir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)
    for i, (gt, dt) in enumerate(make_case(name)):
        (gt_dir / f"{i:06d}.txt").write_text("".join(_fmt(r, False) + "\n" for r in gt))
        if dt is not None:
            (pred_dir / f"{i:06d}.txt").write_text("".join(_fmt(r, True) + "\n" for r in dt))
    return gt_dir, pred_dir
