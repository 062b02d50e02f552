"""Pure-PyTorch rasterizer: the CPU path and the reference the nvdiffrast path is checked against.

Two passes, both vectorized (no Python loop over triangles or pixels):

1. **Coverage** (no autograd), nvdiffrast's rules, so both backends pick the same triangle:
   - **Snapped path**, for triangles with every vertex inside the depth range
     (``|z| <= w``; nearly all of them): vertices are projected and rounded to 1/16 pixel in
     float32 exactly as nvdiffrast's cudaraster does, triangles of zero snapped area are
     dropped, and a pixel centre is covered when the three integer edge functions are
     ``>= 0`` with cudaraster's tie rule (a sample on an edge belongs to one side only).
     The edge functions are exact integers (float32 while every partial sum stays below
     2**24, float64 beyond), so shared edges are watertight. Depth for visibility is the
     screen-space plane of ``z/w`` through the snapped vertices.
   - **Homogeneous path**, for triangles crossing the near or far plane (cudaraster clips
     those into sub-triangles before snapping, which is not reproduced): no clipping, but
     homogeneous 2D edge functions (Olano & Greer), ``e_i(p) = (V_j x V_k) . (px, py, 1)``
     with ``V_i = (x_i, y_i, w_i)``. A covered point lies in front of the camera, and
     ``z/w = sum e_i z_i / sum e_i w_i`` is tested against ``[-1, 1]``, which clips the near
     and far planes per pixel exactly. Shared edges are watertight here too: ``a*b - c*d``
     with the operands swapped is the exact negative in IEEE arithmetic. Pixels along such
     triangles' edges can differ from nvdiffrast's, which clips them into pieces before
     snapping (`tests/test_render_nvdiffrast.py` bounds the difference).

   Triangles are grouped by the power-of-two size of their pixel bounding box and each
   group is evaluated as a dense ``[triangles, rows, cols]`` grid, so the work is a few
   dozen tensor ops per group. The nearest fragment per pixel wins through one
   ``scatter_reduce(amin)`` over int64 keys ``(depth as ordered int32) << 32 | triangle``,
   so ties in depth go to the lower triangle index, deterministically.
2. **Resolve** (differentiable). For the covered pixels only, the winning triangle's
   perspective-correct barycentrics ``b_i = e_i / sum e`` are recomputed from ``pos`` with
   autograd on, with their pixel derivatives (``rast_db``) in closed form. Here the edge
   functions are evaluated relative to the pixel (nvdiffrast's arithmetic, much better
   conditioned at grazing angles; see :func:`_pixel_edges`), and sums of three run in a
   fixed order, so CPU and CUDA round alike. As in nvdiffrast, ``u, v`` are clamped to
   ``[0, 1]`` and ``z/w`` to ``[-1, 1]`` on output (a sample inside the snapped triangle can
   lie just outside the exact one) and ``rast_db`` is computed from the clamped ``u, v``,
   while gradients flow as if unclamped, as nvdiffrast's backward pass computes them.

The pixel-centre / row conventions are the ones in :mod:`zoo.render`'s docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["rasterize_torch", "fragments_torch", "resolve_torch", "resolve_fragments", "TorchFragments", "TorchPeelState", "EMPTY_KEY"]

EMPTY_KEY = torch.iinfo(torch.int64).max
# Dense evaluation is split so that no group allocates more than this many grid points
# (about 16 bytes each across the temporaries): bounded memory for huge triangles.
_CHUNK_POINTS = 1 << 22
# Grid sizes a bounding box is rounded up to. Powers of two keep the number of groups (each
# a fixed cost of a few dozen ops) small; finer classes (adding 1.5x steps) waste fewer grid
# points but were slower on the benchmark mesh (more groups).
_SIZES = [1 << k for k in range(15)]
# nvdiffrast's cudaraster: vertices snap to 1/16 pixel (CR_SUBPIXEL_LOG2 = 4) and the fast
# path needs snapped coordinates inside a signed 16-bit guard band.
_SUBPIXELS = 16
_GUARD = 32767
_SNAPPED, _HOMOGENEOUS = 0, 1


def _min3(x: torch.Tensor) -> torch.Tensor:
    """``x.amin(1)`` of an ``[n, 3]`` tensor, column by column (a reduction over a dimension of 3
    is several times slower on the CPU than two elementwise minimums)."""
    return torch.minimum(torch.minimum(x[:, 0], x[:, 1]), x[:, 2])


def _max3(x: torch.Tensor) -> torch.Tensor:
    """``x.amax(1)`` of an ``[n, 3]`` tensor (see `_min3`)."""
    return torch.maximum(torch.maximum(x[:, 0], x[:, 1]), x[:, 2])


def _size_class(extent: torch.Tensor) -> torch.Tensor:
    """Index into ``_SIZES`` of the smallest size >= extent (extent >= 1)."""
    return torch.bucketize(extent, torch.tensor(_SIZES, device=extent.device))


@dataclass
class TorchPeelState:
    """Per-pixel key of the previous depth layer, ``[B*H*W]`` int64 (EMPTY_KEY where empty)."""

    keys: torch.Tensor


def _instances(pos: torch.Tensor, tri: torch.Tensor, ranges: torch.Tensor | None):
    """Triangle instances to draw: (image index ``[N]``, triangle index ``[N]``, verts ``[N,3,4]``)."""
    device = pos.device
    tri = tri.long()
    if pos.dim() == 3:
        batch, num_tri = pos.shape[0], tri.shape[0]
        img = torch.arange(batch, device=device).repeat_interleave(num_tri)
        tid = torch.arange(num_tri, device=device).repeat(batch)
        verts = pos[:, tri].reshape(-1, 3, 4)
        return img, tid, verts
    starts = ranges[:, 0].long().tolist()
    counts = ranges[:, 1].long().tolist()
    tid = torch.cat([torch.arange(s, s + c, device=device) for s, c in zip(starts, counts)]) \
        if counts else torch.zeros(0, dtype=torch.long, device=device)
    img = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                  torch.tensor(counts, device=device, dtype=torch.long))
    return img, tid, pos[tri[tid]]


def _edge_setup(verts: torch.Tensor):
    """Edge-function coefficients of each triangle: ``(A, B, C)`` each ``[N,3]``, and det ``[N]``.

    ``e_i(px, py) = A_i px + B_i py + C_i`` with ``(A_i, B_i, C_i) = V_j x V_k``.
    """
    x, y, w = verts[..., 0], verts[..., 1], verts[..., 3]
    j = [1, 2, 0]
    k = [2, 0, 1]
    xj, yj, wj = x[:, j], y[:, j], w[:, j]
    xk, yk, wk = x[:, k], y[:, k], w[:, k]
    a = yj * wk - wj * yk
    b = wj * xk - xj * wk
    c = xj * yk - yj * xk
    det = x[:, 0] * a[:, 0] + y[:, 0] * b[:, 0] + w[:, 0] * c[:, 0]
    return a, b, c, det


def _pixel_ndc(i: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """NDC of pixel centres ``(2 i + 1) / size - 1``, rounded once from float64.

    Barycentrics at grazing angles are sensitive to the last bit of the pixel centre, and
    CUDA divides by a scalar through its reciprocal: one rounding makes every device agree.
    """
    return ((2 * i + 1 - size).double() / size).to(dtype)


def _pixel_edges(verts: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Edge functions ``[N,3]`` at one pixel per triangle, evaluated relative to that pixel.

    The same ``e_i`` as :func:`_edge_setup` gives (a shear moving the pixel to the origin has
    determinant 1), but the large terms cancel in ``x - px * w`` before the products, not
    after: on the closed benchmark mesh the barycentrics' worst float32 error against float64
    drops from 1e-2 to 2e-4 at near-silhouette pixels. It is nvdiffrast's own arithmetic, so
    the two backends also agree there. ``px``, ``py``: ``[N,1]`` in NDC.
    """
    x = verts[..., 0] - px * verts[..., 3]
    y = verts[..., 1] - py * verts[..., 3]
    j, k = [1, 2, 0], [2, 0, 1]
    return x[:, j] * y[:, k] - y[:, j] * x[:, k]


def _clamp_forward(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``x`` clamped to ``[lo, hi]`` in value, with the gradient of ``x`` itself."""
    return x + (x.detach().clamp(lo, hi) - x.detach())


def _dot3(e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``sum_i e_i u_i`` over 3 columns in a fixed order, so every device rounds alike."""
    p = e * u
    return (p[:, 0] + p[:, 1]) + p[:, 2]


def _depth_key(depth: torch.Tensor, tid: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 key: float32 depth bits in the high word, triangle index low."""
    bits = depth.float().contiguous().view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()
    return (ordered << 32) | tid


def _snap(verts: torch.Tensor, width: int, height: int):
    """nvdiffrast's vertex snapping: ``(fast [N], X [N,3], Y [N,3] int64, z/w [N,3] float32)``.

    ``X = rint((x * (1/w)) * 8W)`` in float32 is the vertex in 1/16-pixel units from the
    viewport centre, as cudaraster's ``snapTriangle`` computes it (``rint``: half to even).
    ``fast`` marks the triangles cudaraster rasterizes from snapped vertices directly: every
    vertex inside the depth range (``|z| <= w``) and the snapped box inside its 16-bit guard
    band. It clips the others first; here they take the homogeneous path.
    """
    x, y, z, w = verts.float().unbind(-1)
    rcp = 1.0 / w
    sx = torch.round(x * rcp * float(width * _SUBPIXELS // 2))
    sy = torch.round(y * rcp * float(height * _SUBPIXELS // 2))
    lo = torch.minimum(_min3(sx), _min3(sy))
    hi = torch.maximum(_max3(sx), _max3(sy))
    fast = ((w >= z.abs()).all(1) & torch.isfinite(lo) & torch.isfinite(hi)
            & (lo >= -_GUARD - 1) & (hi <= _GUARD) & (hi - lo <= _GUARD))
    zero = torch.zeros_like(sx)
    return (fast, torch.where(fast[:, None], sx, zero).long(),
            torch.where(fast[:, None], sy, zero).long(), z * rcp)


def _snapped_setup(X, Y, zw, width, height):
    """Integer edge functions and a depth plane per snapped triangle, ``X, Y [S,3]``.

    Returns ``hit [S]`` (the box holds a pixel centre of the viewport), the pixel boxes
    ``x0, x1, y0, y1`` ``[S]`` clamped to the viewport, and ``coef [S,12]`` float64: for grid
    offsets ``(gx, gy)`` from the clamped box corner, edge ``i`` covers when
    ``A_i gx + B_i gy + C_i >= 0`` (exact integers) and ``z/w = D0 + Dx gx + Dy gy``.
    Triangles are turned counter-clockwise; a sample exactly on an edge belongs to it only
    when the edge points down, or left when horizontal (cudaraster's ``cover8x8`` rule), so
    a shared edge gives each of its samples to exactly one side.
    """
    # Counter-clockwise order: swap vertices 1 and 2 where the snapped area is negative.
    d1x, d1y = X[:, 1] - X[:, 0], Y[:, 1] - Y[:, 0]
    d2x, d2y = X[:, 2] - X[:, 0], Y[:, 2] - Y[:, 0]
    swap = (d1x * d2y - d1y * d2x) < 0
    order = torch.tensor([[0, 1, 2], [0, 2, 1]], device=X.device)[swap.long()]
    X, Y, zw = X.gather(1, order), Y.gather(1, order), zw.gather(1, order).double()
    x0, x1 = _sample_span(X, width)
    y0, y1 = _sample_span(Y, height)
    hit = (x0 <= x1) & (y0 <= y1) & (x1 >= 0) & (x0 <= width - 1) & (y1 >= 0) & (y0 <= height - 1)
    x0, x1 = x0.clamp(0, width - 1), x1.clamp(0, width - 1)
    y0, y1 = y0.clamp(0, height - 1), y1.clamp(0, height - 1)
    cx = _SUBPIXELS * x0 + _SUBPIXELS // 2 - width * _SUBPIXELS // 2  # corner sample, subpixels
    cy = _SUBPIXELS * y0 + _SUBPIXELS // 2 - height * _SUBPIXELS // 2
    dx, dy = X.roll(-1, 1) - X, Y.roll(-1, 1) - Y  # edges 0->1, 1->2, 2->0
    tie = ((dy > 0) | ((dy == 0) & (dx <= 0))).long()
    c = (X - cx[:, None]) * dy - (Y - cy[:, None]) * dx - tie
    # z/w is affine in screen space: the plane through the three snapped vertices.
    e1x, e1y, e2x, e2y = (t.double() for t in (dx[:, 0], dy[:, 0], -dx[:, 2], -dy[:, 2]))
    area = e1x * e2y - e1y * e2x
    beta = ((zw[:, 1] - zw[:, 0]) * e2y - (zw[:, 2] - zw[:, 0]) * e1y) / area
    gamma = ((zw[:, 2] - zw[:, 0]) * e1x - (zw[:, 1] - zw[:, 0]) * e2x) / area
    d0 = zw[:, 0] + beta * (cx - X[:, 0]) + gamma * (cy - Y[:, 0])
    coef = torch.cat([(-_SUBPIXELS * dy).double(), (_SUBPIXELS * dx).double(), c.double(),
                      torch.stack([d0, _SUBPIXELS * beta, _SUBPIXELS * gamma], 1)], 1)
    return hit, x0, x1, y0, y1, coef


def _sample_span(v: torch.Tensor, size: int):
    """First and last pixel whose centre lies in ``[min v, max v]`` (subpixels), unclamped."""
    offset = size * _SUBPIXELS // 2 - _SUBPIXELS // 2  # pixel i's centre is 16 i - offset
    lo = torch.div(_min3(v) + offset + _SUBPIXELS - 1, _SUBPIXELS, rounding_mode="floor")
    hi = torch.div(_max3(v) + offset, _SUBPIXELS, rounding_mode="floor")
    return lo, hi


def _homogeneous_setup(verts, width, height):
    """Pixel boxes ``x0, x1, y0, y1 [N]`` (float, unclamped) for the homogeneous path."""
    x, y, w = verts[..., 0], verts[..., 1], verts[..., 3]
    # One pixel of margin against rounding; a triangle with a vertex at or behind w = 0 has
    # no finite projection: whole viewport.
    all_front = (w > 0).all(1)
    safe_w = torch.where(w > 0, w, torch.ones_like(w))
    fx = (x / safe_w + 1) * (width * 0.5) - 0.5
    fy = (y / safe_w + 1) * (height * 0.5) - 0.5
    zeros = torch.zeros_like(all_front, dtype=verts.dtype)
    x0 = torch.where(all_front, _min3(fx).floor(), zeros)
    x1 = torch.where(all_front, _max3(fx).ceil(), zeros + (width - 1))
    y0 = torch.where(all_front, _min3(fy).floor(), zeros)
    y1 = torch.where(all_front, _max3(fy).ceil(), zeros + (height - 1))
    return x0, x1, y0, y1


def _coverage(verts, img, tid, batch, height, width, peel_keys, collect: list | None = None):
    """Nearest-fragment key per pixel, ``[B*H*W]`` int64; EMPTY_KEY where nothing covers.

    With ``collect`` (a list), every fragment's ``(pixel, key)`` pair is appended to it instead
    and the list is returned."""
    device, dtype = verts.device, verts.dtype
    keys = collect if collect is not None else \
        torch.full((batch * height * width,), EMPTY_KEY, dtype=torch.long, device=device)
    if verts.shape[0] == 0:
        return keys
    x, y, z, w = verts.unbind(-1)
    # Frustum culling: all three vertices beyond one clip plane.
    outside = ((x > w).all(1) | (x < -w).all(1) | (y > w).all(1) | (y < -w).all(1)
               | (z > w).all(1) | (z < -w).all(1))
    fast, sx, sy, zw = _snap(verts, width, height)
    area = ((sx[:, 1] - sx[:, 0]) * (sy[:, 2] - sy[:, 0])
            - (sy[:, 1] - sy[:, 0]) * (sx[:, 2] - sx[:, 0]))

    parts = []  # (kind, triangle indices, pixel box clamped to the viewport, coef)
    hsel = (~outside & ~fast).nonzero().squeeze(1)
    if hsel.numel():
        hv = verts[hsel]
        a, b, c, det = _edge_setup(hv)
        hx0, hx1, hy0, hy1 = _homogeneous_setup(hv, width, height)
        keep = ((det != 0) & torch.isfinite(det) & (hx1 >= 0) & (hx0 <= width - 1)
                & (hy1 >= 0) & (hy0 <= height - 1)).nonzero().squeeze(1)
        # Orient every triangle so that inside means all e_i >= 0 (exact: multiply by +-1).
        sign = det[keep].sign().unsqueeze(1)
        coef = torch.cat([a[keep] * sign, b[keep] * sign, c[keep] * sign, hv[keep, :, 2],
                          hv[keep, :, 3]], 1)
        box = [t[keep].long().clamp(0, size - 1)
               for t, size in ((hx0, width), (hx1, width), (hy0, height), (hy1, height))]
        parts.append((_HOMOGENEOUS, hsel[keep], *box, coef))
    fsel = (~outside & fast & (area != 0)).nonzero().squeeze(1)
    if fsel.numel():
        hit, sx0, sx1, sy0, sy1, coef = _snapped_setup(sx[fsel], sy[fsel], zw[fsel], width, height)
        hit = hit.nonzero().squeeze(1)
        parts.append((_SNAPPED, fsel[hit], sx0[hit], sx1[hit], sy0[hit], sy1[hit], coef[hit]))

    base_x = torch.arange(width, device=device)
    base_y = torch.arange(height, device=device)
    for kind, sel, x0, x1, y0, y1, coef in parts:
        cls_x, cls_y = _size_class(x1 - x0 + 1), _size_class(y1 - y0 + 1)
        group = cls_x * 64 + cls_y
        if kind == _SNAPPED:
            # float32 holds the integer edge functions exactly while every partial sum stays
            # below 2**24; larger ones (big or far-out triangles) evaluate in float64.
            gw = (1 << cls_x).clamp(max=width) - 1  # largest grid offset: _SIZES[k] = 2**k
            gh = (1 << cls_y).clamp(max=height) - 1
            bound = (coef[:, 0:3].abs() * gw[:, None] + coef[:, 3:6].abs() * gh[:, None]
                     + coef[:, 6:9].abs())
            bound = _max3(bound)
            group = group + 4096 * (bound >= 2 ** 24)
        order = torch.argsort(group)
        codes, counts = torch.unique_consecutive(group[order], return_counts=True)
        start = 0
        for code, count in zip(codes.tolist(), counts.tolist()):
            members = order[start:start + count]
            start += count
            gw = min(_SIZES[(code % 4096) // 64], width)
            gh = min(_SIZES[code % 64], height)
            per_chunk = max(1, _CHUNK_POINTS // (gw * gh))
            for lo in range(0, count, per_chunk):
                m = members[lo:lo + per_chunk]
                box = (x0[m], x1[m], y0[m], y1[m], img[sel[m]], tid[sel[m]])
                if kind == _SNAPPED:
                    edge_dtype = torch.float64 if code >= 4096 else torch.float32
                    _cover_snapped(keys, coef[m], *box, base_x[:gw], base_y[:gh], height, width,
                                   edge_dtype, peel_keys)
                else:
                    _cover_group(keys, coef[m], *box, base_x[:gw], base_y[:gh], height, width,
                                 dtype, peel_keys)
    return keys


def _grid(x0, x1, y0, y1, ix, iy):
    """``valid [n,gh,gw]``: grid points inside each triangle's pixel box."""
    return (((x0[:, None] + ix) <= x1[:, None]).unsqueeze(1)
            & ((y0[:, None] + iy) <= y1[:, None]).unsqueeze(2))


def _merge(keys, flat, gw, gh, x0, y0, img, tid, depth_fn, height, width, peel_keys):
    """Scatter the nearest fragment of grid points ``flat`` (indices into ``[n,gh,gw]``).

    ``depth_fn(t, row, col)`` gives each point's ``z/w`` and a mask of valid ones (or None).
    """
    cell = gw * gh
    t_local = flat // cell
    rem = flat - t_local * cell
    row = rem // gw
    col = rem - row * gw
    depth, ok = depth_fn(t_local, row, col)
    base = img * (height * width) + y0 * width + x0  # pixel index of each box's corner
    pix = base[t_local] + row * width + col
    key = _depth_key(depth, tid[t_local])
    if peel_keys is not None:
        # Depth peeling: only fragments strictly behind the previous layer's depth survive.
        prev = peel_keys[pix]
        behind = (prev != EMPTY_KEY) & ((key >> 32) > (prev >> 32))
        ok = behind if ok is None else ok & behind
    if isinstance(keys, list):  # collecting every fragment (see fragments_torch)
        keys.append((pix, key) if ok is None else (pix[ok], key[ok]))
        return
    if ok is not None:
        key = torch.where(ok, key, torch.full_like(key, EMPTY_KEY))
    keys.scatter_reduce_(0, pix, key, reduce="amin")


def _cover_snapped(keys, coef, x0, x1, y0, y1, img, tid, ix, iy, height, width, dtype, peel_keys):
    """One group of snapped triangles on a dense ``[n, gh, gw]`` grid, merged into ``keys``."""
    gw, gh = ix.shape[0], iy.shape[0]
    valid = _grid(x0, x1, y0, y1, ix, iy)
    fx = ix.to(dtype)[None, None, :]
    fy = iy.to(dtype)[None, :, None]
    c = coef[:, :9].to(dtype)[:, :, None, None]
    inside = valid
    for i in range(3):
        inside = inside & ((c[:, i] * fx + c[:, 3 + i] * fy) + c[:, 6 + i] >= 0)
    flat = inside.view(-1).nonzero().squeeze(1)
    if flat.numel() == 0:
        return

    def depth(t, row, col):
        d = coef[t, 9:12]
        return d[:, 0] + d[:, 1] * col + d[:, 2] * row, None

    _merge(keys, flat, gw, gh, x0, y0, img, tid, depth, height, width, peel_keys)


def _cover_group(keys, coef, x0, x1, y0, y1, img, tid, ix, iy, height, width, dtype, peel_keys):
    """One group of clip-path triangles on a dense ``[n, gh, gw]`` grid, merged into ``keys``."""
    gw, gh = ix.shape[0], iy.shape[0]
    valid = _grid(x0, x1, y0, y1, ix, iy)
    px = _pixel_ndc(x0[:, None] + ix, width, dtype)[:, None, :]  # [n, 1, gw]
    py = _pixel_ndc(y0[:, None] + iy, height, dtype)[:, :, None]  # [n, gh, 1]
    # Same operation order for every triangle, so a shared edge evaluates to exact
    # negatives on its two sides.
    c = coef[:, :9, None, None]
    e0 = c[:, 0] * px + c[:, 3] * py + c[:, 6]  # [n, gh, gw]
    e1 = c[:, 1] * px + c[:, 4] * py + c[:, 7]
    e2 = c[:, 2] * px + c[:, 5] * py + c[:, 8]
    inside = valid & (e0 >= 0) & (e1 >= 0) & (e2 >= 0)
    flat = inside.view(-1).nonzero().squeeze(1)
    if flat.numel() == 0:
        return
    e = torch.stack([e0.view(-1)[flat], e1.view(-1)[flat], e2.view(-1)[flat]], 1)

    def depth(t, row, col):
        # z/w of the point: sum b_i z_i / sum b_i w_i (the barycentric scale cancels).
        zw = coef[t, 9:15]
        d = ((zw[:, 0] * e[:, 0] + zw[:, 1] * e[:, 1] + zw[:, 2] * e[:, 2])
             / (zw[:, 3] * e[:, 0] + zw[:, 4] * e[:, 1] + zw[:, 5] * e[:, 2]))
        return d, (e.sum(1) > 0) & (d >= -1) & (d <= 1)  # in front (w > 0), inside near/far

    _merge(keys, flat, gw, gh, x0, y0, img, tid, depth, height, width, peel_keys)


def rasterize_torch(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int],
                    ranges: torch.Tensor | None = None, grad_db: bool = True,
                    peel: TorchPeelState | None = None):
    """Rasterize on any device; returns ``(rast [B,H,W,4], rast_db [B,H,W,4 or 0], keys)``.

    Inputs are already validated by :func:`zoo.render.rasterize`. ``peel`` restricts the
    result to fragments behind the previous layer (depth peeling); ``keys`` is the new
    layer's per-pixel key for the next peel.
    """
    height, width = resolution
    batch = pos.shape[0] if pos.dim() == 3 else ranges.shape[0]
    img, tid, verts = _instances(pos, tri, ranges)
    with torch.no_grad():
        keys = _coverage(verts.detach(), img, tid, batch, height, width,
                         None if peel is None else peel.keys)
    rast, rast_db = resolve_torch(pos, tri, keys, batch, resolution, grad_db)
    return rast, rast_db, keys


@dataclass
class TorchFragments:
    """Every fragment of a rasterization, in peeling order: ``pix [M]`` (pixel index into
    ``[B*H*W]``) and ``key [M]`` sorted by pixel, then key; a fragment at the same depth as the
    one before it in its pixel is dropped (a peel never returns it); ``rank [M]`` is each
    fragment's depth layer."""

    pix: torch.Tensor
    key: torch.Tensor
    rank: torch.Tensor
    size: int

    def layers(self, first: int, count: int) -> torch.Tensor:
        """Layers ``first .. first+count-1`` stacked layer-major: keys ``[count * B*H*W]``, as that
        many peels would leave them."""
        keys = torch.full((count * self.size,), EMPTY_KEY, dtype=torch.long, device=self.key.device)
        sel = ((self.rank >= first) & (self.rank < first + count)).nonzero().squeeze(1)
        return keys.index_copy_(0, (self.rank[sel] - first) * self.size + self.pix[sel], self.key[sel])


def fragments_torch(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int],
                    ranges: torch.Tensor | None = None) -> TorchFragments:
    """All fragments at once (one coverage pass), so K depth layers cost one rasterization and a
    sort instead of K rasterizations. Layer ``k`` equals what ``k`` successive peels give:
    the nearest fragment strictly behind layer ``k-1``'s depth, ties to the lower triangle."""
    height, width = resolution
    batch = pos.shape[0] if pos.dim() == 3 else ranges.shape[0]
    img, tid, verts = _instances(pos, tri, ranges)
    with torch.no_grad():
        found = _coverage(verts.detach(), img, tid, batch, height, width, None, collect=[])
        if found:
            pix = torch.cat([p for p, _ in found])
            key = torch.cat([k for _, k in found])
        else:
            pix = key = torch.zeros(0, dtype=torch.long, device=pos.device)
        order = torch.sort(key, stable=True).indices
        pix, key = pix[order], key[order]
        order = torch.sort(pix, stable=True).indices
        pix, key = pix[order], key[order]
        first = torch.ones_like(pix, dtype=torch.bool)
        if pix.numel() > 1:
            first[1:] = (pix[1:] != pix[:-1]) | ((key[1:] >> 32) != (key[:-1] >> 32))
        pix, key = pix[first], key[first]
        new_pixel = torch.ones_like(pix, dtype=torch.bool)
        if pix.numel() > 1:
            new_pixel[1:] = pix[1:] != pix[:-1]
        pos_ = torch.arange(pix.numel(), device=pix.device)
        run_start = torch.cummax(torch.where(new_pixel, pos_, torch.zeros_like(pos_)), 0).values \
            if pix.numel() else pos_
        rank = pos_ - run_start
    return TorchFragments(pix, key, rank, batch * height * width)


def _resolve_samples(pos: torch.Tensor, tri: torch.Tensor, pidx: torch.Tensor, t: torch.Tensor,
                     resolution: tuple[int, int]):
    """Differentiable ``(u, v, z/w, id + 1)`` ``[N, 4]`` of triangle ``t [N]`` at pixel ``pidx [N]``
    (index into ``[B*H*W]``), and what the pixel derivatives need: ``(vals, v, s, bary_c)``."""
    height, width = resolution
    hw = height * width
    b = pidx // hw
    rem = pidx - b * hw
    yy, xx = rem // width, rem % width
    tri_l = tri.long()
    v = pos[b[:, None], tri_l[t]] if pos.dim() == 3 else pos[tri_l[t]]  # [N,3,4], differentiable
    px = _pixel_ndc(xx, width, pos.dtype).unsqueeze(1)
    py = _pixel_ndc(yy, height, pos.dtype).unsqueeze(1)
    e = _pixel_edges(v, px, py)  # [N,3]
    s = ((e[:, 0] + e[:, 1]) + e[:, 2]).unsqueeze(1)
    bary = e / s
    zw = _dot3(e, v[..., 2]) / _dot3(e, v[..., 3])  # the barycentric scale cancels
    # A sample inside the snapped triangle can lie just outside the exact one. nvdiffrast
    # clamps u, v to [0, 1] and z/w to [-1, 1] on output, but its backward pass differentiates
    # the unclamped values; the straight-through clamps below do both the same way.
    bary_c = _clamp_forward(bary, 0.0, 1.0)
    vals = torch.stack([bary_c[:, 0], bary_c[:, 1], _clamp_forward(zw, -1.0, 1.0),
                        (t + 1).to(pos.dtype)], dim=1)
    return vals, v, s, bary_c


def resolve_fragments(pos: torch.Tensor, tri: torch.Tensor, fragments: TorchFragments,
                      resolution: tuple[int, int], max_layers: int | None = None):
    """Every fragment's ``(u, v, z/w, id + 1)`` ``[M, 4]`` (differentiable, as `rasterize`'s values),
    with its pixel ``[M]`` and layer ``[M]``; only layers below ``max_layers`` when given."""
    pix, key, rank = fragments.pix, fragments.key, fragments.rank
    if max_layers is not None:
        keep = (rank < max_layers).nonzero().squeeze(1)
        pix, key, rank = pix[keep], key[keep], rank[keep]
    vals = _resolve_samples(pos, tri, pix, key & 0xFFFFFFFF, resolution)[0]
    return vals, pix, rank


def resolve_torch(pos: torch.Tensor, tri: torch.Tensor, keys: torch.Tensor, batch: int,
                  resolution: tuple[int, int], grad_db: bool = True):
    """The differentiable half of rasterization: ``(rast, rast_db)`` for per-pixel ``keys``."""
    height, width = resolution
    pidx = (keys != EMPTY_KEY).nonzero().squeeze(1)
    t = keys[pidx] & 0xFFFFFFFF
    hw = height * width
    vals, v, s, bary_c = _resolve_samples(pos, tri, pidx, t, resolution)
    rast = torch.zeros(batch * hw, 4, dtype=pos.dtype, device=pos.device).index_copy(0, pidx, vals)
    rast = rast.view(batch, height, width, 4)
    if grad_db:
        # d b_i / dX = (dE_i - b_i dS) / S with dE_i/dX = A_i * 2/W, dE_i/dY = B_i * 2/H
        # (A_i, B_i do not depend on the pixel, so the setup's coefficients serve).
        a_, b_, _, _ = _edge_setup(v)
        da = a_ * (2.0 / width)
        db = b_ * (2.0 / height)
        # From the clamped u, v, as nvdiffrast's forward pass (gradients unclamped again).
        dbx = (da - bary_c * ((da[:, 0:1] + da[:, 1:2]) + da[:, 2:3])) / s
        dby = (db - bary_c * ((db[:, 0:1] + db[:, 1:2]) + db[:, 2:3])) / s
        dvals = torch.stack([dbx[:, 0], dby[:, 0], dbx[:, 1], dby[:, 1]], dim=1)
        rast_db = torch.zeros(batch * hw, 4, dtype=pos.dtype, device=pos.device)
        rast_db = rast_db.index_copy(0, pidx, dvals).view(batch, height, width, 4)
    else:
        rast_db = torch.zeros(batch, height, width, 0, dtype=pos.dtype, device=pos.device)
    return rast, rast_db
