"""KITTI 3D object detection AP, exactly as OpenPCDet's ``kitti_object_eval_python`` (the Python
port of the KITTI devkit that the field reports with) computes it, in numpy on any machine.

That port needs numba and runs its rotated IoU as a numba CUDA kernel; this module reproduces
its arithmetic without either: the same difficulty filters, ignore rules (DontCare regions,
Van counted as neither hit nor miss for Car, Person_sitting for Pedestrian), greedy matching,
41-point score thresholds, R11 and R40 interpolation and AOS. The matching is vectorised over
frames and thresholds (a loop over ground-truth slots only), and the rotated overlaps come from
`zoo.boxes` in float64 (the port's kernel is float32, so the two can differ only where an
overlap lies within ~1e-6 of a threshold).

Conventions: boxes are compared in the rectified camera frame, BEV on (x, z), 3D with the
vertical extent ``[y - h, y]``; overlaps are "greater than" the threshold, as in the port.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from zoo.boxes import bev_intersection
from zoo.data.kitti import MAX_OCCLUSION, MAX_TRUNCATION, MIN_HEIGHT, labels_to_arrays, read_labels
from zoo.errors import DataError

__all__ = ["evaluate", "evaluate_annos", "format_results", "DIFFICULTIES", "MIN_OVERLAPS"]

DIFFICULTIES = ("easy", "moderate", "hard")
METRICS = ("bbox", "bev", "3d")
_EVAL_CLASSES = ("Car", "Pedestrian", "Cyclist", "Van", "Person_sitting", "Truck")
# [threshold set][metric (bbox, bev, 3d)][class in _EVAL_CLASSES order]: the official set,
# then OpenPCDet's looser second one
MIN_OVERLAPS = np.array([
    [[0.7, 0.5, 0.5, 0.7, 0.5, 0.7]] * 3,
    [[0.7, 0.5, 0.5, 0.7, 0.5, 0.5], [0.5, 0.25, 0.25, 0.5, 0.25, 0.5], [0.5, 0.25, 0.25, 0.5, 0.25, 0.5]],
])
_NEIGHBOUR = {"car": "van", "pedestrian": "person_sitting"}  # counted as neither hit nor miss
_N_SAMPLE = 41


def evaluate(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike,
             classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist")) -> dict:
    """AP of the result files in `pred_dir` against the label_2 files in `gt_dir`.

    The frames are the ``*.txt`` files of `gt_dir`; a frame's result file of the same name may
    be missing or empty (no detections). Returns ``{"ap": ..., "ap_loose": ...}`` with
    ``ap[class]["R11"|"R40"]["bbox"|"bev"|"3d"|"aos"]["easy"|"moderate"|"hard"]`` in percent at
    the official thresholds (Car 0.7, Pedestrian and Cyclist 0.5), ``ap_loose`` at OpenPCDet's
    second set (0.7/0.5/0.5 for bbox and aos, 0.5/0.25/0.25 for BEV and 3D), plus ``"frames"``.
    AOS is NaN when the predictions carry no observation angle (alpha -10), as the port skips it.
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    if not gt_dir.is_dir():
        raise DataError(f"{gt_dir}: no such folder of label_2 files.")
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: no such folder of result files.")
    frames = sorted(p.stem for p in gt_dir.glob("*.txt"))
    if not frames:
        raise DataError(f"{gt_dir}: no label files (*.txt) to evaluate against.")
    gt = [labels_to_arrays(read_labels(gt_dir / f"{f}.txt")) for f in frames]
    dt = []
    for f in frames:
        p = pred_dir / f"{f}.txt"
        dt.append(labels_to_arrays(read_labels(p) if p.is_file() else []))
    out = evaluate_annos(gt, dt, classes)
    out["frames"] = len(frames)
    return out


def evaluate_annos(gt: Sequence[dict], dt: Sequence[dict], classes: Sequence[str]) -> dict:
    """`evaluate` on per-frame column arrays (`zoo.data.kitti.labels_to_arrays`), aligned."""
    if len(gt) != len(dt):
        raise DataError(f"{len(gt)} ground-truth frames but {len(dt)} prediction frames.")
    for c in classes:
        if c not in _EVAL_CLASSES:
            raise DataError(f"KITTI AP is defined for {', '.join(_EVAL_CLASSES)}, not {c!r}.")
    cls_idx = [_EVAL_CLASSES.index(c) for c in classes]
    compute_aos = False
    for a in dt:  # the port decides from the first frame with detections
        if len(a["alpha"]):
            compute_aos = bool(a["alpha"][0] != -10)
            break
    overlaps = [[_overlaps(d, g, m) for d, g in zip(dt, gt)] for m in range(3)]
    dc_overlaps = [_image_overlap(d["bbox"], g["bbox"][g["name"] == "DontCare"], criterion=0)
                   for d, g in zip(dt, gt)]
    ap = {key: {c: {"R11": {}, "R40": {}} for c in classes} for key in ("ap", "ap_loose")}
    for ci, c in zip(cls_idx, classes):
        for di, diff in enumerate(DIFFICULTIES):
            flags = [_clean(g, d, ci, di) for g, d in zip(gt, dt)]
            for m, metric in enumerate(METRICS):
                for s, key in enumerate(("ap", "ap_loose")):
                    prec, aos = _eval_one(gt, dt, flags, overlaps[m], dc_overlaps, m,
                                          MIN_OVERLAPS[s, m, ci], compute_aos and m == 0)
                    ap[key][c]["R11"].setdefault(metric, {})[diff] = float(prec[0::4].sum() / 11 * 100)
                    ap[key][c]["R40"].setdefault(metric, {})[diff] = float(prec[1:].sum() / 40 * 100)
                    if m == 0:
                        r11 = float(aos[0::4].sum() / 11 * 100) if compute_aos else math.nan
                        r40 = float(aos[1:].sum() / 40 * 100) if compute_aos else math.nan
                        ap[key][c]["R11"].setdefault("aos", {})[diff] = r11
                        ap[key][c]["R40"].setdefault("aos", {})[diff] = r40
    return ap


def format_results(result: dict) -> str:
    """The AP table as text, one block per class and threshold set (the port's layout)."""
    lines = []
    for key, label in (("ap", "official"), ("ap_loose", "loose")):
        for c, per in result[key].items():
            ci = _EVAL_CLASSES.index(c)
            th = ", ".join(f"{MIN_OVERLAPS[0 if key == 'ap' else 1, m, ci]:.2f}" for m in range(3))
            for r in ("R11", "R40"):
                lines.append(f"{c} AP_{r}@{th} ({label}):")
                for metric in ("bbox", "bev", "3d", "aos"):
                    v = per[r][metric]
                    lines.append(f"  {metric:<4} " + ", ".join(f"{v[d]:.4f}" for d in DIFFICULTIES))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- overlaps

def _image_overlap(boxes: np.ndarray, query: np.ndarray, criterion: int = -1) -> np.ndarray:
    """[N, K] 2D overlaps: IoU (-1), over boxes' area (0) or query's (1); zero unless both
    extents are positive (the port's rule)."""
    b, q = boxes[:, None, :], query[None, :, :]
    iw = np.minimum(b[..., 2], q[..., 2]) - np.maximum(b[..., 0], q[..., 0])
    ih = np.minimum(b[..., 3], q[..., 3]) - np.maximum(b[..., 1], q[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    area_q = (q[..., 2] - q[..., 0]) * (q[..., 3] - q[..., 1])
    inter = iw * ih
    ua = {-1: area_b + area_q - inter, 0: area_b, 1: area_q}[criterion]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where((iw > 0) & (ih > 0), inter / ua, 0.0)
    return out.reshape(len(boxes), len(query))


def _bev(a: dict) -> torch.Tensor:
    # camera (x, z) plane; l along x at rotation 0 and the port's clockwise angle, so heading = -ry
    dims = a["dimensions"]  # h, w, l
    return torch.from_numpy(np.stack([a["location"][:, 0], a["location"][:, 2], dims[:, 2], dims[:, 1],
                                      -a["rotation_y"]], axis=1).reshape(-1, 5))


def _overlaps(d: dict, g: dict, metric: int) -> np.ndarray:
    """[D, G] overlaps of one frame's detections with its ground truth."""
    if metric == 0:
        return _image_overlap(d["bbox"], g["bbox"])
    inter = bev_intersection(_bev(d), _bev(g)).numpy()
    dd, gd = d["dimensions"], g["dimensions"]
    if metric == 1:
        area_d = (dd[:, 2] * dd[:, 1])[:, None]
        area_g = (gd[:, 2] * gd[:, 1])[None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.nan_to_num(inter / (area_d + area_g - inter))
    yd, yg = d["location"][:, 1][:, None], g["location"][:, 1][None]
    iw = np.minimum(yd, yg) - np.maximum(yd - dd[:, 0][:, None], yg - gd[:, 0][None])
    inc = inter * iw
    vol_d = (dd[:, 0] * dd[:, 1] * dd[:, 2])[:, None]
    vol_g = (gd[:, 0] * gd[:, 1] * gd[:, 2])[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((inter > 0) & (iw > 0), inc / (vol_d + vol_g - inc), 0.0)


# ----------------------------------------------------------------------------- matching

def _clean(g: dict, d: dict, cls: int, diff: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-object flags: 0 counts, 1 is ignored (neither hit nor miss), -1 is another class."""
    name = _EVAL_CLASSES[cls].lower()
    gname = np.array([n.lower() for n in g["name"]], dtype=object)
    height = g["bbox"][:, 3] - g["bbox"][:, 1]
    hard = ((g["occluded"] > MAX_OCCLUSION[diff]) | (g["truncated"] > MAX_TRUNCATION[diff])
            | (height <= MIN_HEIGHT[diff]))
    same = gname == name
    neighbour = gname == _NEIGHBOUR.get(name, "\0")
    ig_gt = np.where(same & ~hard, 0, np.where(neighbour | same, 1, -1)).astype(np.int64)
    dname = np.array([n.lower() for n in d["name"]], dtype=object)
    dh = np.abs(d["bbox"][:, 3] - d["bbox"][:, 1])
    ig_dt = np.where(dh < MIN_HEIGHT[diff], 1, np.where(dname == name, 0, -1)).astype(np.int64)
    return ig_gt, ig_dt, int((ig_gt == 0).sum())


def _eval_one(gt, dt, flags, overlaps, dc_overlaps, metric, min_ov, compute_aos):
    """Precision (and AOS) at the 41 recall samples for one class, difficulty and metric."""
    num_valid = sum(f[2] for f in flags)
    frames = []
    for i, (ig_gt, ig_dt, _) in enumerate(flags):
        ov = overlaps[i]
        cand = (ov > min_ov) & (ig_dt != -1)[:, None] & (ig_gt != -1)[None, :]
        dets = np.flatnonzero(cand.any(axis=1))
        gts = np.flatnonzero(cand.any(axis=0))  # ground truth order is the port's loop order
        dc_hit = (dc_overlaps[i] > min_ov).any(axis=1) if metric == 0 else np.zeros(len(ig_dt), bool)
        frames.append((i, dets, gts, dc_hit))
    # pass 1: scores of the true positives when every detection counts
    scores = np.concatenate([_match(gt, dt, flags, overlaps, frames, min_ov, None, False)[0]] + [np.zeros(0)])
    thresholds = _thresholds(scores, num_valid)
    prec = np.zeros(_N_SAMPLE)
    aos = np.zeros(_N_SAMPLE)
    if len(thresholds) == 0:
        return prec, aos
    tp, fp_matched, sim = _match(gt, dt, flags, overlaps, frames, min_ov, thresholds, compute_aos)
    # unmatchable detections are false positives unless a DontCare region absorbs them
    fp = fp_matched
    rest = []
    for (i, dets, _, dc_hit) in frames:
        keep = np.ones(len(flags[i][1]), bool)
        keep[dets] = False
        keep &= (flags[i][1] == 0) & ~dc_hit
        rest.append(dt[i]["score"][keep])
    rest = np.sort(np.concatenate(rest + [np.zeros(0)]))
    fp = fp + (len(rest) - np.searchsorted(rest, thresholds, side="left"))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = tp / (tp + fp)
        a = sim / (tp + fp)
    n = len(thresholds)
    prec[:n] = p
    aos[:n] = a
    # the port's interpolation: each sample takes the best value at any later (lower-score,
    # higher-recall) threshold, NaN propagating through np.max as it does there
    for k in range(n):
        prec[k] = np.max(prec[k:])
        aos[k] = np.max(aos[k:])
    return prec, aos


def _thresholds(scores: np.ndarray, num_gt: int) -> np.ndarray:
    """The port's 41 score thresholds: one true-positive score per recall step of 1/40."""
    scores = np.sort(scores)[::-1]
    out, current = [], 0.0
    n = len(scores)
    for i, s in enumerate(scores):
        l_recall = (i + 1) / num_gt
        r_recall = (i + 2) / num_gt if i < n - 1 else l_recall
        if (r_recall - current) < (current - l_recall) and i < n - 1:
            continue
        out.append(s)
        current += 1 / (_N_SAMPLE - 1.0)
    return np.array(out, dtype=np.float64)


def _match(gt, dt, flags, overlaps, frames, min_ov, thresholds, compute_aos, chunk_elems=1 << 22):
    """The port's greedy assignment, for every frame at once (padded), and at every threshold.

    Only detections that overlap a counted-or-ignored ground truth above `min_ov` take part;
    the rest can never be assigned. With ``thresholds=None`` (the first pass) every detection
    is available and the pick is the highest score; otherwise a detection is available at
    threshold t when its score >= t, and the pick is the highest overlap among counted
    detections, else the first ignored one. Returns (tp scores, ...) for the first pass and
    (tp [T], fp among matchable detections [T], AOS similarity [T]) otherwise.
    """
    first = thresholds is None
    th = np.zeros(1) if first else thresholds
    T = len(th)
    tp = np.zeros(T)
    fp = np.zeros(T)
    sim = np.zeros(T)
    tp_scores = []
    work = [f for f in frames if len(f[1])]
    work.sort(key=lambda f: (len(f[2]), len(f[1])))
    start = 0
    while start < len(work):
        G = len(work[start][2])
        stop = start
        while stop < len(work) and len(work[stop][2]) == G:
            stop += 1
        group = work[start:stop]
        D = max(len(f[1]) for f in group)
        step = max(1, chunk_elems // max(1, T * D))
        for k in range(0, len(group), step):
            part = group[k:k + step]
            F = len(part)
            ov = np.zeros((F, D, G))
            score = np.full((F, D), -np.inf)
            ig_dt = np.full((F, D), -1, np.int64)
            dc = np.zeros((F, D), bool)
            alpha_d = np.zeros((F, D))
            ig_gt = np.zeros((F, G), np.int64)
            alpha_g = np.zeros((F, G))
            for r, (i, dets, gts, dc_hit) in enumerate(part):
                n = len(dets)
                ov[r, :n] = overlaps[i][np.ix_(dets, gts)]
                score[r, :n] = dt[i]["score"][dets]
                ig_dt[r, :n] = flags[i][1][dets]
                dc[r, :n] = dc_hit[dets]
                alpha_d[r, :n] = dt[i]["alpha"][dets]
                ig_gt[r] = flags[i][0][gts]
                alpha_g[r] = gt[i]["alpha"][gts]
            present = ig_dt != -1
            if first:
                avail = present[:, None, :]
            else:
                avail = present[:, None, :] & (score[:, None, :] >= th[None, :, None])
            assigned = np.zeros((F, T, D), bool)
            rows = np.arange(F)[:, None]
            cols = np.arange(T)[None, :]
            for g in range(G):
                cand = avail & ~assigned & (ov[:, None, :, g] > min_ov)
                if first:
                    key = np.where(cand, score[:, None, :], -np.inf)
                    det = key.argmax(axis=-1)
                    found = cand.any(axis=-1)
                else:
                    valid = cand & (ig_dt == 0)[:, None, :]
                    key = np.where(valid, ov[:, None, :, g], -np.inf)
                    det_v = key.argmax(axis=-1)
                    ignored = cand & (ig_dt == 1)[:, None, :]
                    det = np.where(valid.any(-1), det_v, ignored.argmax(axis=-1))
                    found = valid.any(-1) | ignored.any(-1)
                det_ig = ig_dt[rows, det] == 1
                hit = found & ~((ig_gt[:, g] == 1)[:, None] | det_ig)
                assigned[rows, cols, det] |= found
                tp += hit.sum(axis=0)
                if first:
                    tp_scores.append(score[np.arange(F), det[:, 0]][hit[:, 0]])
                elif compute_aos:
                    delta = alpha_g[:, g][:, None] - alpha_d[rows, det]
                    sim += np.where(hit, (1.0 + np.cos(delta)) / 2.0, 0.0).sum(axis=0)
            if not first:
                fp += (avail & ~assigned & (ig_dt == 0)[:, None, :] & ~dc[:, None, :]).sum(axis=(0, 2))
        start = stop
    if first:
        return (np.concatenate(tp_scores + [np.zeros(0)]),)
    return tp, fp, sim
