"""Rotated box geometry in plain PyTorch, on any device: BEV corners, exact rotated BEV
intersection and IoU, 3D IoU, greedy NMS.

Conventions (OpenPCDet's LiDAR frame): a 3D box is ``[x, y, z, dx, dy, dz, heading]`` with
``(x, y, z)`` its centre, ``dx`` its length along the heading, ``dy`` its width, ``dz`` its
height, and the heading measured counter-clockwise from +x about +z. A BEV box is
``[x, y, dx, dy, heading]`` in the same sense.

The intersection of two rotated rectangles is computed exactly (up to rounding) as the convex
polygon formed by the corners of each box inside the other and the crossings of their edges,
ordered by angle about its centroid, with the shoelace formula. It is vectorised over all pairs
(no Python loop per pair), so it runs on a GPU as it does on a CPU, and is written here because
torchvision's ``box_iou`` is axis-aligned only and the field's rotated IoUs are CUDA or numba
extensions.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["bev_corners", "bev_intersection", "bev_iou", "iou3d", "nms", "corners3d", "points_in_boxes"]

_EPS = 1e-9


def bev_corners(boxes: torch.Tensor) -> torch.Tensor:
    """Corners of BEV boxes ``[..., 5]`` as ``[..., 4, 2]``, counter-clockwise: the box frame's
    (+dx/2, +dy/2), (-dx/2, +dy/2), (-dx/2, -dy/2), (+dx/2, -dy/2), rotated and moved."""
    half = boxes[..., 2:4] / 2
    sx = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=boxes.dtype, device=boxes.device)
    sy = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=boxes.dtype, device=boxes.device)
    lx = half[..., 0:1] * sx  # [..., 4]
    ly = half[..., 1:2] * sy
    c, s = torch.cos(boxes[..., 4:5]), torch.sin(boxes[..., 4:5])
    x = boxes[..., 0:1] + c * lx - s * ly
    y = boxes[..., 1:2] + s * lx + c * ly
    return torch.stack([x, y], dim=-1)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside(points: torch.Tensor, quads: torch.Tensor) -> torch.Tensor:
    """Whether each point ``[..., P, 2]`` lies in the counter-clockwise convex quad ``[..., 4, 2]``
    (boundary included, to a relative tolerance)."""
    edges = quads.roll(-1, dims=-2) - quads  # [..., 4, 2]
    rel = points.unsqueeze(-2) - quads.unsqueeze(-3)  # [..., P, 4, 2]
    side = _cross(edges.unsqueeze(-3), rel)  # >= 0 on the inner side of each edge
    scale = edges.norm(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1) ** 2
    return (side >= -1e-9 * scale.clamp_min(_EPS)).all(dim=-1)


def _pair_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection areas ``[P]`` of the box pairs ``a[i], b[i]`` (both ``[P, 5]``)."""
    ca, cb = bev_corners(a), bev_corners(b)  # [P, 4, 2]
    in_a = _inside(cb, ca)  # corners of b inside a: [P, 4]
    in_b = _inside(ca, cb)
    # every edge of a against every edge of b: p + t r = q + u s
    p = ca.unsqueeze(2)  # [P, 4, 1, 2]
    r = (ca.roll(-1, dims=1) - ca).unsqueeze(2)
    q = cb.unsqueeze(1)  # [P, 1, 4, 2]
    s = (cb.roll(-1, dims=1) - cb).unsqueeze(1)
    denom = _cross(r, s)  # [P, 4, 4]
    qp = q - p
    parallel = denom.abs() <= _EPS
    safe = torch.where(parallel, torch.ones_like(denom), denom)
    t = _cross(qp, s) / safe
    u = _cross(qp, r) / safe
    hit = ~parallel & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    cross_pts = (p + t.unsqueeze(-1) * r).reshape(-1, 16, 2)
    pts = torch.cat([ca, cb, cross_pts], dim=1)  # [P, 24, 2]
    valid = torch.cat([in_b, in_a, hit.reshape(-1, 16)], dim=1)
    count = valid.sum(dim=1)
    w = valid.to(pts.dtype).unsqueeze(-1)
    centre = (pts * w).sum(dim=1) / count.clamp_min(1).unsqueeze(-1).to(pts.dtype)
    rel = pts - centre.unsqueeze(1)
    angle = torch.atan2(rel[..., 1], rel[..., 0])
    angle = torch.where(valid, angle, torch.full_like(angle, 10.0))  # invalid ones sort last
    order = angle.argsort(dim=1)
    rel = rel.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
    valid = valid.gather(1, order)
    # invalid slots repeat the first vertex: their edges have zero area, and the last valid
    # vertex closes onto it
    rel = torch.where(valid.unsqueeze(-1), rel, rel[:, :1].expand_as(rel))
    area = _cross(rel, rel.roll(-1, dims=1)).sum(dim=1) / 2
    return torch.where(count >= 3, area.abs(), area.new_zeros(()))


def bev_intersection(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Intersection areas ``[N, M]`` of BEV boxes ``a [N, 5]`` and ``b [M, 5]``.

    Only pairs whose circumscribed circles meet are clipped (in chunks of `chunk` pairs), so
    memory and time follow the number of near pairs, not ``N * M``."""
    out = a.new_zeros((a.shape[0], b.shape[0]))
    if out.numel() == 0:
        return out
    ra = a[:, 2:4].norm(dim=1) / 2
    rb = b[:, 2:4].norm(dim=1) / 2
    near = torch.cdist(a[:, :2], b[:, :2]) <= (ra[:, None] + rb[None, :]) * (1 + 1e-6)
    ia, ib = near.nonzero(as_tuple=True)
    for k in range(0, ia.numel(), chunk):
        sa, sb = ia[k:k + chunk], ib[k:k + chunk]
        out[sa, sb] = _pair_intersection(a[sa], b[sb])
    return out


def bev_iou(a: torch.Tensor, b: torch.Tensor, criterion: str = "union") -> torch.Tensor:
    """Rotated BEV overlap ``[N, M]``: intersection over the union (``"union"``), over a's area
    (``"a"``), over b's area (``"b"``), or the bare intersection area (``"none"``)."""
    inter = bev_intersection(a, b)
    area_a = (a[:, 2] * a[:, 3])[:, None]
    area_b = (b[:, 2] * b[:, 3])[None, :]
    if criterion == "union":
        return inter / (area_a + area_b - inter).clamp_min(_EPS)
    if criterion == "a":
        return inter / area_a.clamp_min(_EPS)
    if criterion == "b":
        return inter / area_b.clamp_min(_EPS)
    if criterion == "none":
        return inter
    raise ValueError(f"criterion must be union, a, b or none, not {criterion!r}")


def iou3d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """3D IoU ``[N, M]`` of LiDAR boxes ``a [N, 7]`` and ``b [M, 7]`` (centre z, height dz)."""
    inter = bev_intersection(a[:, [0, 1, 3, 4, 6]], b[:, [0, 1, 3, 4, 6]])
    top = torch.minimum((a[:, 2] + a[:, 5] / 2)[:, None], (b[:, 2] + b[:, 5] / 2)[None])
    bottom = torch.maximum((a[:, 2] - a[:, 5] / 2)[:, None], (b[:, 2] - b[:, 5] / 2)[None])
    inter = inter * (top - bottom).clamp_min(0)
    vol_a = (a[:, 3] * a[:, 4] * a[:, 5])[:, None]
    vol_b = (b[:, 3] * b[:, 4] * b[:, 5])[None]
    return inter / (vol_a + vol_b - inter).clamp_min(_EPS)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, pre_max: int | None = None,
        post_max: int | None = None) -> torch.Tensor:
    """Greedy rotated-BEV NMS. `boxes` ``[N, 7]`` (LiDAR) or ``[N, 5]`` (BEV); returns the kept
    indices into `boxes`, best score first. A box is dropped when its BEV IoU with a kept,
    higher-scoring box exceeds `threshold` (OpenPCDet's rule). `pre_max` keeps the top boxes
    before NMS, `post_max` caps what is returned."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    bev = boxes[:, [0, 1, 3, 4, 6]] if boxes.shape[1] == 7 else boxes
    order = scores.argsort(descending=True, stable=True)
    if pre_max is not None:
        order = order[:pre_max]
    over = (bev_iou(bev[order], bev[order]) > threshold).cpu().numpy()
    keep = []
    removed = np.zeros(len(order), dtype=bool)
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        if post_max is not None and len(keep) >= post_max:
            break
        removed |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def corners3d(boxes: torch.Tensor) -> torch.Tensor:
    """The 8 corners ``[N, 8, 3]`` of LiDAR boxes ``[N, 7]``: the 4 BEV corners at the bottom,
    then the same 4 at the top."""
    bev = bev_corners(boxes[:, [0, 1, 3, 4, 6]])  # [N, 4, 2]
    z0 = (boxes[:, 2] - boxes[:, 5] / 2)[:, None, None].expand(-1, 4, 1)
    z1 = (boxes[:, 2] + boxes[:, 5] / 2)[:, None, None].expand(-1, 4, 1)
    return torch.cat([torch.cat([bev, z0], -1), torch.cat([bev, z1], -1)], dim=1)


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """``[N, K]`` bool: point ``points[n, :3]`` lies inside 3D box ``boxes[k, :7]`` grown by
    `margin` on every side (faces count as inside)."""
    if len(boxes) == 0:
        return torch.zeros((len(points), 0), dtype=torch.bool, device=points.device)
    rel = points[:, None, :3] - boxes[None, :, :3]
    c, s = torch.cos(-boxes[:, 6]), torch.sin(-boxes[:, 6])
    lx = c * rel[..., 0] - s * rel[..., 1]
    ly = s * rel[..., 0] + c * rel[..., 1]
    return ((lx.abs() <= boxes[:, 3] / 2 + margin) & (ly.abs() <= boxes[:, 4] / 2 + margin)
            & (rel[..., 2].abs() <= boxes[:, 5] / 2 + margin))
