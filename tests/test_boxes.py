"""zoo.boxes: rotated BEV intersection and IoU against shapely's polygon clipping, 3D IoU, NMS."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from shapely.geometry import Polygon

from zoo.boxes import bev_corners, bev_intersection, bev_iou, corners3d, iou3d, nms


def random_bev(n, seed, spread=6.0):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g, dtype=torch.float64) * spread
    size = 0.3 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 4
    heading = (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5) * 4 * math.pi
    return torch.cat([centre, size, heading], 1)


def degenerate_pairs():
    """Pairs where clipping is hardest: identical, shared edge, corner touch, nested, 90 degrees,
    collinear edges, far apart."""
    a = torch.tensor([2.0, 1.0, 4.0, 2.0, 0.3], dtype=torch.float64)
    c, s = math.cos(0.3), math.sin(0.3)
    return [
        (a, a.clone()),
        (a, a + torch.tensor([4 * c, 4 * s, 0, 0, 0], dtype=torch.float64)),  # shared edge
        (a, a + torch.tensor([4 * c - 2 * s, 4 * s + 2 * c, 0, 0, 0], dtype=torch.float64)),  # corner
        (a, torch.tensor([2.0, 1.0, 1.0, 0.5, 0.3], dtype=torch.float64)),  # nested
        (a, torch.tensor([2.0, 1.0, 4.0, 2.0, 0.3 + math.pi / 2], dtype=torch.float64)),
        (a, a + torch.tensor([1 * c, 1 * s, 0, 0, 0], dtype=torch.float64)),  # collinear long edges
        (a, a + torch.tensor([0, 0, 0, 0, math.pi], dtype=torch.float64)),  # same box, flipped
        (a, torch.tensor([40.0, 1.0, 4.0, 2.0, 0.0], dtype=torch.float64)),
    ]


def shapely_iou(a, b):
    pa, pb = Polygon(bev_corners(a).numpy()), Polygon(bev_corners(b).numpy())
    inter = pa.intersection(pb).area
    return inter, inter / (pa.area + pb.area - inter)


def test_bev_iou_equals_polygon_clipping():
    a, b = random_bev(150, 0), random_bev(150, 1)
    pairs = list(zip(a, b)) + degenerate_pairs()
    A = torch.stack([p[0] for p in pairs])
    B = torch.stack([p[1] for p in pairs])
    inter = bev_intersection(A, B)
    iou = bev_iou(A, B)
    worst = 0.0
    for i, (x, y) in enumerate(pairs):
        ref_inter, ref_iou = shapely_iou(x, y)
        worst = max(worst, abs(inter[i, i].item() - ref_inter), abs(iou[i, i].item() - ref_iou))
    assert worst < 1e-6
    # all pairs, not just the diagonal: the near-pair filter must not drop an overlapping pair
    for i in range(0, len(pairs), 7):
        for j in range(0, len(pairs), 5):
            assert abs(iou[i, j].item() - shapely_iou(A[i], B[j])[1]) < 1e-6


def test_bev_iou_is_symmetric_and_one_on_itself():
    a, b = random_bev(40, 2), random_bev(30, 3)
    assert torch.allclose(bev_iou(a, b), bev_iou(b, a).T, atol=1e-12)
    assert torch.allclose(bev_iou(a, a).diagonal(), torch.ones(40, dtype=torch.float64), atol=1e-9)
    assert bev_iou(a[:0], b).shape == (0, 30)


def test_iou3d_is_bev_intersection_times_height_overlap():
    a, b = random_bev(60, 4, spread=3), random_bev(60, 5, spread=3)
    g = torch.Generator().manual_seed(6)
    za, zb = torch.rand(60, generator=g, dtype=torch.float64), torch.rand(60, generator=g, dtype=torch.float64)
    ha, hb = 0.5 + torch.rand(60, generator=g, dtype=torch.float64), 0.5 + torch.rand(60, generator=g, dtype=torch.float64)
    A = torch.stack([a[:, 0], a[:, 1], za, a[:, 2], a[:, 3], ha, a[:, 4]], 1)
    B = torch.stack([b[:, 0], b[:, 1], zb, b[:, 2], b[:, 3], hb, b[:, 4]], 1)
    got = iou3d(A, B)
    for i in range(60):
        inter, _ = shapely_iou(a[i], b[i])
        dz = max(0.0, min(za[i] + ha[i] / 2, zb[i] + hb[i] / 2) - max(za[i] - ha[i] / 2, zb[i] - hb[i] / 2))
        vol = inter * dz
        ref = vol / (a[i, 2] * a[i, 3] * ha[i] + b[i, 2] * b[i, 3] * hb[i] - vol)
        assert abs(got[i, i].item() - float(ref)) < 1e-6


def test_nms_matches_the_greedy_rule():
    boxes = random_bev(80, 7, spread=5)
    scores = torch.rand(80, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    keep = nms(boxes, scores, 0.1).tolist()
    # brute force: walk by score, keep a box unless a kept one overlaps it above the threshold
    ref = []
    for i in scores.argsort(descending=True).tolist():
        if all(shapely_iou(boxes[i], boxes[k])[1] <= 0.1 for k in ref):
            ref.append(i)
    assert keep == ref
    assert len(keep) < 80  # the threshold did suppress
    assert nms(boxes, scores, 0.1, post_max=3).tolist() == ref[:3]


def test_corners3d_span_the_box():
    box = torch.tensor([[1.0, 2.0, 0.5, 4.0, 2.0, 1.5, 0.0]], dtype=torch.float64)
    c = corners3d(box)[0]
    assert torch.allclose(c.min(0).values, torch.tensor([-1.0, 1.0, -0.25], dtype=torch.float64))
    assert torch.allclose(c.max(0).values, torch.tensor([3.0, 3.0, 1.25], dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bev_iou_on_gpu_equals_cpu():
    a, b = random_bev(200, 9), random_bev(150, 10)
    assert torch.allclose(bev_iou(a.cuda(), b.cuda()).cpu(), bev_iou(a, b), atol=1e-9)


def test_float32_and_float64_agree():
    a, b = random_bev(50, 11), random_bev(50, 12)
    assert np.abs((bev_iou(a.float(), b.float()).double() - bev_iou(a, b)).numpy()).max() < 1e-4
