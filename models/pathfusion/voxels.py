"""Points to voxels, as spconv's `PointToVoxel` makes them, and OpenPCDet's mean VFE.

A point's voxel is ``floor((p - range_min) / voxel_size)`` computed in float32 (subtract, then
divide: float64 or a multiply by the reciprocal puts points on voxel boundaries elsewhere and
gives a different voxel set on real scans); points whose voxel falls outside the grid
``round((range_max - range_min) / voxel_size)`` are dropped, which keeps ``[min, max)`` up to
that rounding. Voxels are numbered in the order their first point appears, the first
`max_voxels` are kept, and each keeps its first `max_points_per_voxel` points.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from zoo.errors import ConfigError

__all__ = ["voxelize", "grid_size", "MeanVFE"]


def grid_size(voxel_size: Sequence[float], point_range: Sequence[float]) -> tuple[int, int, int]:
    """The voxel grid ``(X, Y, Z)`` of a point range ``[xmin, ymin, zmin, xmax, ymax, zmax]``."""
    if len(voxel_size) != 3 or len(point_range) != 6:
        raise ConfigError(f"voxel_size needs 3 values and point_range 6, got {list(voxel_size)} and {list(point_range)}")
    size = tuple(int(round((point_range[i + 3] - point_range[i]) / voxel_size[i])) for i in range(3))
    if min(size) <= 0:
        raise ConfigError(f"point_range {list(point_range)} with voxel_size {list(voxel_size)} holds no voxel")
    return size


def voxelize(points: torch.Tensor, voxel_size: Sequence[float], point_range: Sequence[float],
             max_points_per_voxel: int, max_voxels: int):
    """Group ``points [N, C]`` (x, y, z first) into voxels.

    Returns ``voxels [M, P, C]`` (zero-padded), ``coords [M, 3]`` int32 as ``(z, y, x)`` and
    ``num_points [M]`` int32, with ``P = max_points_per_voxel`` and ``M <= max_voxels``.
    """
    if points.dim() != 2 or points.shape[1] < 3:
        raise ConfigError(f"points must be [N, C >= 3], got {tuple(points.shape)}")
    dev = points.device
    gx, gy, gz = grid_size(voxel_size, point_range)
    lo = torch.tensor(point_range[:3], dtype=torch.float32, device=dev)
    vs = torch.tensor(voxel_size, dtype=torch.float32, device=dev)
    c = torch.floor((points[:, :3].float() - lo) / vs).long()  # [N, 3] as x, y, z
    grid = torch.tensor([gx, gy, gz], device=dev)
    keep = ((c >= 0) & (c < grid)).all(dim=1)
    idx = keep.nonzero().squeeze(1)  # surviving points in input order
    c = c[idx]
    key = (c[:, 2] * gy + c[:, 1]) * gx + c[:, 0]
    uniq, inverse = torch.unique(key, return_inverse=True)
    n = idx.numel()
    first = torch.full((uniq.numel(),), n, dtype=torch.long, device=dev)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=dev), reduce="amin")
    # rank of voxels by first appearance; only the first max_voxels survive
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=dev)
    vox = rank[inverse]  # voxel number of each surviving point
    alive = vox < max_voxels
    pts_idx, vox = idx[alive], vox[alive]
    # slot of each point inside its voxel, by input order: stable sort by voxel
    by_vox = vox.argsort(stable=True)
    vox_sorted = vox[by_vox]
    m = min(int(order.numel()), max_voxels)
    counts = torch.bincount(vox_sorted, minlength=m)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(vox_sorted.numel(), device=dev) - starts[vox_sorted]
    fits = slot < max_points_per_voxel
    voxels = points.new_zeros((m, max_points_per_voxel, points.shape[1]))
    voxels[vox_sorted[fits], slot[fits]] = points[pts_idx[by_vox][fits]]
    ukey = uniq[order[:m]]
    coords = torch.stack([ukey // (gx * gy), (ukey // gx) % gy, ukey % gx], dim=1).int()
    return voxels, coords, counts.clamp_max(max_points_per_voxel).int()


class MeanVFE(nn.Module):
    """OpenPCDet's MeanVFE: each voxel's feature is the mean of its points ``[M, C]``."""

    def __init__(self, num_point_features: int = 4):
        super().__init__()
        self.num_point_features = num_point_features

    def forward(self, voxels: torch.Tensor, num_points: torch.Tensor) -> torch.Tensor:
        total = voxels.sum(dim=1)
        return total / num_points.clamp_min(1).to(voxels.dtype).unsqueeze(1)
