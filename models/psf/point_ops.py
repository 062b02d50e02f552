"""Point operations of PVCNN in plain PyTorch (the original needs CUDA extensions).

Tensors follow PVCNN's channel-first layout: coordinates ``[B,3,N]``, features ``[B,C,N]``.
Each op reproduces the CUDA kernel it replaces (``mit-han-lab/pvcnn`` as vendored by PVD
and PSF), including its tie and edge rules, so weights trained there give the same outputs.
"""
from __future__ import annotations

import torch

__all__ = ["normalize_voxel_coords", "avg_voxelize", "trilinear_devoxelize",
           "furthest_point_sample", "ball_query", "knn_query", "grouping",
           "three_nn_interpolate"]


def normalize_voxel_coords(coords: torch.Tensor, resolution: int, normalize: bool = True,
                           eps: float = 0.0) -> torch.Tensor:
    """Continuous voxel coordinates ``[B,3,N]`` in ``[0, r-1]`` (PVCNN's ``Voxelization``).

    Centred on the cloud's mean; with ``normalize`` the farthest point lands on the sphere of
    diameter ``r`` around the grid centre, else ``[-1,1]`` maps onto the grid. No gradient
    flows to the coordinates (the original detaches them too).
    """
    c = coords.detach()
    c = c - c.mean(2, keepdim=True)
    if normalize:
        c = c / (c.norm(dim=1, keepdim=True).amax(dim=2, keepdim=True) * 2.0 + eps) + 0.5
    else:
        c = (c + 1) / 2.0
    return (c * resolution).clamp(0.0, float(resolution - 1))


def avg_voxelize(features: torch.Tensor, voxel_coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """Mean of the features of the points in each voxel: ``[B,C,r,r,r]``, zeros where empty.

    ``voxel_coords`` are the continuous ones from :func:`normalize_voxel_coords`, rounded
    here (half to even, like ``torch.round`` in the original). Voxel ``(x, y, z)`` is at
    ``[..., x, y, z]``. Differentiable in ``features``.
    """
    b, c, n = features.shape
    r = resolution
    idx = torch.round(voxel_coords).long()
    flat = (idx[:, 0] * (r * r) + idx[:, 1] * r + idx[:, 2]).unsqueeze(1)  # [B,1,N]
    # scatter_add along the point axis, per batch and channel: it exports to ONNX as
    # ScatterElements(reduction="add"); index_add became an overwriting scatter there, and a
    # flattened batch offset would freeze the batch size into the graph.
    sums = features.new_zeros(b, c, r ** 3).scatter_add(2, flat.expand(b, c, n), features)
    counts = features.new_zeros(b, 1, r ** 3).scatter_add(2, flat, torch.ones_like(features[:, :1]))
    grid = sums / counts.clamp_min(1.0)  # float bounds on float tensors: CoreML wants matching dtypes
    return grid.view(b, c, r, r, r)


def trilinear_devoxelize(grid: torch.Tensor, voxel_coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """Trilinear interpolation of ``grid [B,C,r,r,r]`` at ``voxel_coords [B,3,N]``: ``[B,C,N]``.

    Corners are ``floor(x)`` and ``min(floor(x) + 1, r - 1)`` per axis, as PVCNN's kernel.
    Differentiable in ``grid`` (the coordinates carry no gradient, as in the original).
    """
    b, c = grid.shape[:2]
    r = resolution
    coords = voxel_coords.detach()
    lo = coords.floor()
    frac = coords - lo
    lo = lo.long()
    hi = (lo + 1).clamp_max(r - 1)
    flat = grid.reshape(b, c, r ** 3)
    out = 0
    for cx in (0, 1):
        x = hi[:, 0] if cx else lo[:, 0]
        wx = frac[:, 0] if cx else 1 - frac[:, 0]
        for cy in (0, 1):
            y = hi[:, 1] if cy else lo[:, 1]
            wy = frac[:, 1] if cy else 1 - frac[:, 1]
            for cz in (0, 1):
                z = hi[:, 2] if cz else lo[:, 2]
                wz = frac[:, 2] if cz else 1 - frac[:, 2]
                index = (x * (r * r) + y * r + z).unsqueeze(1).expand(b, c, -1)
                out = out + flat.gather(2, index) * (wx * wy * wz).unsqueeze(1).to(grid.dtype)
    return out


def furthest_point_sample(coords: torch.Tensor, num_centers: int) -> torch.Tensor:
    """Farthest point sampling: ``[B,3,num_centers]`` coordinates, starting from point 0.

    Each step takes the point farthest (squared L2) from those chosen so far; ties go to
    the lowest index. A Python loop over the centres (each step is vectorized over points):
    the method is sequential by nature.
    """
    pts = coords.detach()
    if num_centers == 1:
        return coords[:, :, :1]
    last = pts[:, :, :1]
    dist = None
    chosen = []
    # Indices are collected in a list and stacked once: an in-place write per step would
    # become one index_put (and a copy) per centre in an exported graph.
    for _ in range(1, num_centers):
        d = (pts - last).pow(2).sum(1)  # [B,N]
        dist = d if dist is None else torch.minimum(dist, d)
        idx = dist.argmax(1)  # first maximum on ties, as in ONNX's ArgMax
        last = pts.gather(2, idx[:, None, None].expand(-1, 3, 1))
        chosen.append(idx)
    # the start index 0 made from an integer tensor (coremltools drops zeros_like's dtype=)
    index = torch.stack([torch.zeros_like(chosen[0])] + chosen, 1)  # [B,num_centers]
    return coords.gather(2, index.unsqueeze(1).expand(-1, 3, -1))


def _sq_dist(centers: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``[B,M,N]`` squared distances between ``centers [B,3,M]`` and ``points [B,3,N]``."""
    return (centers.unsqueeze(3) - points.unsqueeze(2)).pow(2).sum(1)


def ball_query(centers: torch.Tensor, points: torch.Tensor, radius: float, num_neighbors: int) -> torch.Tensor:
    """Indices ``[B,M,K]`` of the first ``K`` points (in index order) within ``radius`` of each centre.

    Strictly inside (``d^2 < r^2``). Slots left over when fewer than ``K`` points qualify
    repeat the first one found; a centre with no point in range gets index 0 (PVCNN's kernel
    leaves its zero-initialised output).
    """
    n = points.shape[2]
    inside = _sq_dist(centers.detach(), points.detach()) < radius * radius
    order = torch.arange(n, device=points.device)
    key = torch.where(inside, order, torch.full_like(order, n))
    k = min(num_neighbors, n)
    first = key.topk(k, dim=2, largest=False, sorted=True).values  # [B,M,k]
    found = first < n
    fill = torch.where(found[..., :1], first[..., :1], torch.zeros_like(first[..., :1]))
    idx = torch.where(found, first, fill)
    if k < num_neighbors:
        idx = torch.cat([idx, fill.expand(*idx.shape[:2], num_neighbors - k)], 2)
    return idx


def knn_query(centers: torch.Tensor, points: torch.Tensor, num_neighbors: int) -> torch.Tensor:
    """Indices ``[B,M,K]`` of the ``K`` nearest points to each centre (nearest first)."""
    d = _sq_dist(centers.detach(), points.detach())
    return d.topk(min(num_neighbors, points.shape[2]), dim=2, largest=False).indices


def grouping(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather ``features [B,C,N]`` at ``indices [B,M,K]``: ``[B,C,M,K]``; differentiable."""
    b, c, _ = features.shape
    _, m, k = indices.shape
    flat = indices.reshape(b, 1, m * k).expand(b, c, m * k)
    return features.gather(2, flat).view(b, c, m, k)


def three_nn_interpolate(points: torch.Tensor, centers: torch.Tensor, center_features: torch.Tensor) -> torch.Tensor:
    """Features at ``points [B,3,N]`` from the 3 nearest ``centers [B,3,M]``: ``[B,C,N]``.

    Weights are inverse squared distances (clamped to ``[1e-10, 1e10]``), normalized to sum
    to 1, as PVCNN's ``nearest_neighbor_interpolate``. Differentiable in the features only.
    """
    d = _sq_dist(points.detach(), centers.detach())  # [B,N,M]
    k = min(3, centers.shape[2])
    best, idx = d.topk(k, dim=2, largest=False)  # ascending
    inv = 1.0 / best.clamp(1e-10, 1e10)
    w = inv / inv.sum(2, keepdim=True)  # [B,N,k]
    b, c, _ = center_features.shape
    n = points.shape[2]
    gathered = center_features.gather(2, idx.reshape(b, 1, n * k).expand(b, c, n * k)).view(b, c, n, k)
    return (gathered * w.unsqueeze(1).to(center_features.dtype)).sum(3)
