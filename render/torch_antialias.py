"""Pure-PyTorch analytic antialiasing: nvdiffrast's algorithm (Laine et al. 2020, sec. 4.3).

Not supersampling. For every pair of horizontally or vertically adjacent pixels whose
triangle ids differ, the nearer surface's triangle (or the only one, next to background)
is examined at its own pixel centre. If one of its edges is a *silhouette* edge (a mesh
boundary, or an edge whose neighbouring triangle folds to the same side in screen space)
and crosses the segment between the two pixel centres at fraction ``d`` from that centre,
and the edge is closer to perpendicular than parallel to the segment, the pixel on the
far side of the edge's crossing point gets its colour blended with the other pixel's by
``|0.5 - d|``: exactly the area the edge sweeps over a one-pixel-wide box filter. ``d``
is a differentiable function of the projected vertex positions, so gradients reach
``pos`` through visibility, which plain rasterization cannot give. Several pairs may
adjust one pixel; their changes add, computed from the input colours.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TopologyHash", "construct_topology_hash", "antialias_torch"]

_F32_MAX = 3.402823466e38
_EPS = 0.0625  # a crossing up to 1/16 pixel outside the segment still counts (as nvdiffrast)


@dataclass
class TopologyHash:
    """Across each edge of each triangle, the other triangle's third vertex.

    ``opposite[t, i]`` is the vertex across the edge facing vertex ``i`` of triangle ``t``
    (``-1`` when the edge has no single neighbour: a boundary or non-manifold edge).
    """

    opposite: torch.Tensor  # [T,3] int64
    num_triangles: int


def construct_topology_hash(tri: torch.Tensor) -> TopologyHash:
    """Edge adjacency of ``tri [T,3]``; reuse it across calls when the topology is fixed.

    An edge shared by exactly two triangles pairs them. With three or more (non-manifold)
    the first two in triangle order pair and the rest count as boundary; nvdiffrast keeps
    the first two inserted by its GPU hash, which is not deterministic. Degenerate
    triangles (a repeated vertex) take no part.
    """
    tri = tri.long()
    num_tri = tri.shape[0]
    device = tri.device
    v0, v1, v2 = tri.unbind(1)
    degenerate = (v0 == v1) | (v1 == v2) | (v2 == v0)
    # Edge i faces vertex i: (v1,v2), (v2,v0), (v0,v1).
    ea = torch.stack([v1, v2, v0], 1).reshape(-1)
    eb = torch.stack([v2, v0, v1], 1).reshape(-1)
    self_v = tri.reshape(-1)
    nvert = int(tri.max().item()) + 1 if tri.numel() else 1
    key = torch.minimum(ea, eb) * nvert + torch.maximum(ea, eb)
    key = torch.where(degenerate.repeat_interleave(3), torch.full_like(key, -1), key)
    order = torch.sort(key, stable=True).indices
    skey = key[order]
    _, counts = torch.unique_consecutive(skey, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group_start = starts.repeat_interleave(counts)
    group_size = counts.repeat_interleave(counts)
    rank = torch.arange(skey.numel(), device=device) - group_start
    partner = torch.full_like(order, -1)
    paired = (group_size >= 2) & (rank < 2) & (skey >= 0)
    partner_pos = torch.where(rank == 0, group_start + 1, group_start)
    partner[paired] = order[partner_pos[paired]]
    opposite_sorted = torch.where(partner >= 0, self_v[partner.clamp_min(0)], torch.full_like(partner, -1))
    opposite = torch.empty_like(opposite_sorted)
    opposite[order] = opposite_sorted
    return TopologyHash(opposite.view(num_tri, 3), num_tri)


def _same_sign(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.signbit(a) == torch.signbit(b)


def _rational_gt(n0, n1, d0, d1):
    """``n0/d0 > n1/d1`` without dividing (as nvdiffrast, including its sign handling)."""
    return (n0 * d1 > n1 * d0) == _same_sign(d0, d1)


def antialias_torch(color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
                    topology: TopologyHash, pos_gradient_boost: float = 1.0) -> torch.Tensor:
    """Antialiased ``color [B,H,W,C]``; see the module docstring for what is computed."""
    batch, height, width, ch = color.shape
    if pos_gradient_boost != 1.0:
        pos = pos.detach() + (pos - pos.detach()) * pos_gradient_boost
    ids = rast[..., 3].detach().long()
    zw = rast[..., 2].detach()
    pixel = torch.arange(batch * height * width, device=color.device).view(batch, height, width)
    work = []
    # Right neighbours (d = 0) then upper-row neighbours (d = 1, next row in memory).
    for d, (sl0, sl1) in enumerate([((..., slice(0, -1)), (..., slice(1, None))),
                                    ((slice(None), slice(0, -1)), (slice(None), slice(1, None)))]):
        t0, t1 = ids[sl0], ids[sl1]
        diff = (t0 != t1).flatten()
        p0 = pixel[sl0].flatten()[diff]
        p1 = pixel[sl1].flatten()[diff]
        work.append((p0, p1, torch.full_like(p0, d)))
    p0 = torch.cat([w[0] for w in work])
    p1 = torch.cat([w[1] for w in work])
    dflag = torch.cat([w[2] for w in work])
    if p0.numel() == 0:
        return color
    flat_ids = ids.flatten()
    flat_z = zw.flatten()
    tri0, tri1 = flat_ids[p0] - 1, flat_ids[p1] - 1
    use1 = (tri0 < 0) | ((tri1 >= 0) & ~(flat_z[p0] < flat_z[p1]))
    tri_sel = torch.where(use1, tri1, tri0)
    ppix = torch.where(use1, p1, p0)  # the pixel whose centre the edge test is made from
    ds = torch.where(use1, -1.0, 1.0).to(color.dtype)

    hw = height * width
    b = ppix // hw
    rem = ppix - b * hw
    py, px = rem // width, rem % width
    tri_l = tri.long()
    vi = tri_l[tri_sel]  # [N,3]
    op = topology.opposite.to(tri_sel.device)[tri_sel]
    oi = torch.where(op >= 0, op, vi)  # no neighbour: the vertex itself (always silhouette)
    if pos.dim() == 3:
        pv = pos[b[:, None], vi]
        po = pos[b[:, None], oi]
    else:
        pv, po = pos[vi], pos[oi]
    fx = (px.to(pos.dtype) + 0.5 - width * 0.5).unsqueeze(1)
    fy = (py.to(pos.dtype) + 0.5 - height * 0.5).unsqueeze(1)
    x = pv[..., 0] / pv[..., 3] * (width * 0.5) - fx  # [N,3], pixel units around the centre
    y = pv[..., 1] / pv[..., 3] * (height * 0.5) - fy
    ox = po[..., 0] / po[..., 3] * (width * 0.5) - fx
    oy = po[..., 1] / po[..., 3] * (height * 0.5) - fy
    x0, x1, x2 = x.unbind(1)
    y0, y1, y2 = y.unbind(1)
    ox0, ox1, ox2 = ox.unbind(1)
    oy0, oy1, oy2 = oy.unbind(1)
    with torch.no_grad():
        bb = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        a0 = (x1 - ox0) * (y2 - oy0) - (x2 - ox0) * (y1 - oy0)
        a1 = (x2 - ox1) * (y0 - oy1) - (x0 - ox1) * (y2 - oy1)
        a2 = (x0 - ox2) * (y1 - oy2) - (x1 - ox2) * (y0 - oy2)
        sil = torch.stack([_same_sign(a0, bb), _same_sign(a1, bb), _same_sign(a2, bb)], 1)
    # Vertical pairs: swap axes so the segment always runs along +x.
    vert = (dflag == 1).unsqueeze(1)
    xs = torch.where(vert, y, x)
    ys = torch.where(vert, x, y)
    x0, x1, x2 = xs.unbind(1)
    y0, y1, y2 = ys.unbind(1)
    dx = torch.stack([x2 - x1, x0 - x2, x1 - x0], 1)
    dy = torch.stack([y2 - y1, y0 - y2, y1 - y0], 1)
    xa = torch.stack([x1, x2, x0], 1)  # first endpoint of each edge
    ya = torch.stack([y1, y2, y0], 1)
    yb = torch.stack([y2, y0, y1], 1)
    num = ds.unsqueeze(1) * (xa * dy - ya * dx)  # crossing distance times dy
    with torch.no_grad():
        misses = _same_sign(ya, yb)  # edge does not cross the line through the centres
        n = torch.where(misses, torch.full_like(num, -_F32_MAX), num)
        den = torch.where(misses, torch.ones_like(dy), dy)
        g10 = _rational_gt(n[:, 1], n[:, 0], den[:, 1], den[:, 0])
        g20 = _rational_gt(n[:, 2], n[:, 0], den[:, 2], den[:, 0])
        g21 = _rational_gt(n[:, 2], n[:, 1], den[:, 2], den[:, 1])
        di = torch.where(g20 & g21, 2, torch.where(g10, 1, 0))
        pick = di.unsqueeze(1)
        ok = (sil.gather(1, pick).squeeze(1) & ~misses.gather(1, pick).squeeze(1)
              & (dy.gather(1, pick).abs() >= dx.gather(1, pick).abs()).squeeze(1))
    dc = num.gather(1, pick).squeeze(1) / torch.where(ok, dy.gather(1, pick).squeeze(1),
                                                       torch.ones_like(ds))
    with torch.no_grad():
        ok = ok & (dc > -_EPS) & (dc < 1 + _EPS)
    sel = ok.nonzero().squeeze(1)
    if sel.numel() == 0:
        return color
    dc = dc[sel].clamp(0, 1)
    alpha = ds[sel] * (0.5 - dc)
    q0, q1 = p0[sel], p1[sel]
    target = torch.where(alpha.detach() > 0, q0, q1)
    flat_color = color.reshape(-1, ch)
    delta = alpha.unsqueeze(1) * (flat_color[q1] - flat_color[q0])
    return flat_color.index_add(0, target, delta).view(batch, height, width, ch)
