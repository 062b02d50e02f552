"""Pure-PyTorch texture sampling (nvdiffrast's ``texture``), differentiable in tex, uv and uv_da.

Follows nvdiffrast's 2D texture rules exactly:

- ``uv`` in ``[0, 1]`` spans the texture; ``u`` runs along width, ``v`` along height with
  ``v = 0`` at row 0 (no flip); texel ``i``'s centre is at ``(i + 0.5) / size``.
- boundary ``wrap`` takes ``uv - floor(uv)``; ``clamp`` clamps the texel-space coordinate
  to the edge texel centres (so the gradient there is zero); ``zero`` reads texels outside
  the texture as zero.
- mip level from ``uv_da = (du/dX, du/dY, dv/dX, dv/dY)``: with ``J`` the Jacobian in
  texels, level = ``0.5 * log2`` of the larger eigenvalue of ``J J^T`` (the footprint's major
  axis squared), plus ``mip_level_bias``, clamped to ``[0, max level]``.
- mip ``k+1`` averages 2x2 texels of level ``k`` (2x1 once one extent is 1); an odd extent
  above 1 cannot be halved and is an error unless ``max_mip_level`` stops before it.
"""
from __future__ import annotations

import torch

from zoo.errors import RenderError

__all__ = ["texture_torch", "build_mip_torch", "mip_sizes"]


def mip_sizes(height: int, width: int, max_mip_level: int | None) -> list[tuple[int, int]]:
    """Extents of levels 0..max, nvdiffrast's rule; raises RenderError on an odd extent > 1."""
    sizes = [(height, width)]
    h, w = height, width
    while (h > 1 or w > 1) and (max_mip_level is None or len(sizes) - 1 < max_mip_level):
        if (h > 1 and h % 2) or (w > 1 and w % 2):
            raise RenderError(
                f"cannot build mip level {len(sizes)} of a {height}x{width} texture: extent "
                f"{h}x{w} is odd. Use power-of-two texture sizes, or pass "
                f"max_mip_level={len(sizes) - 1} (or lower).")
        h, w = max(h // 2, 1), max(w // 2, 1)
        sizes.append((h, w))
    return sizes


def build_mip_torch(tex: torch.Tensor, max_mip_level: int | None = None) -> list[torch.Tensor]:
    """Mip stack ``[level0 = tex, level1, ...]``, each ``[B, h_k, w_k, C]``; differentiable."""
    sizes = mip_sizes(tex.shape[1], tex.shape[2], max_mip_level)
    levels = [tex]
    for h, w in sizes[1:]:
        prev = levels[-1]
        b, ph, pw, c = prev.shape
        levels.append(prev.reshape(b, h, ph // h, w, pw // w, c).mean(dim=(2, 4)))
    return levels


def _mip_level(uv_da, bias, tex_h, tex_w, max_level):
    """Continuous mip level per pixel ``[N]`` (nvdiffrast's footprint formula)."""
    dsdx = uv_da[:, 0] * tex_w
    dsdy = uv_da[:, 1] * tex_w
    dtdx = uv_da[:, 2] * tex_h
    dtdy = uv_da[:, 3] * tex_h
    a = dsdx * dsdx + dtdx * dtdx
    b = dsdy * dsdy + dtdy * dtdy
    c = dsdx * dsdy + dtdx * dtdy
    l2b = 0.5 * (a + b)
    l2a = torch.sqrt(0.25 * (a - b) ** 2 + c * c)
    major = l2b + l2a
    # log2(0) = -inf clamps to level 0; keep its gradient finite there.
    level = 0.5 * torch.log2(major.clamp_min(torch.finfo(major.dtype).tiny))
    if bias is not None:
        level = level + bias
    return level.clamp(0, max_level)


def _bilinear(tex, tz, u, v, boundary):
    """Bilinear sample of ``tex [Bt,h,w,C]`` at ``(u, v)`` ``[N]`` for texture slices ``tz``."""
    _, h, w, ch = tex.shape
    if boundary == "wrap":
        u = u - torch.floor(u)
        v = v - torch.floor(v)
    u = u * w - 0.5
    v = v * h - 0.5
    if boundary == "clamp":
        u = u.clamp(0, w - 1)
        v = v.clamp(0, h - 1)
    iu0 = torch.floor(u.detach()).long()
    iv0 = torch.floor(v.detach()).long()
    fu = (u - iu0.to(u.dtype)).unsqueeze(1)
    fv = (v - iv0.to(v.dtype)).unsqueeze(1)
    iu1, iv1 = iu0 + 1, iv0 + 1
    if boundary == "clamp":
        # At an edge texel centre the neighbour is the texel itself (nvdiffrast does the same).
        iu1 = torch.where(iu0 >= w - 1, iu0, iu1)
        iv1 = torch.where(iv0 >= h - 1, iv0, iv1)
    elif boundary == "wrap":
        iu0 = torch.where(iu0 < 0, iu0 + w, iu0)
        iv0 = torch.where(iv0 < 0, iv0 + h, iv0)
        iu1 = torch.where(iu1 >= w, iu1 - w, iu1)
        iv1 = torch.where(iv1 >= h, iv1 - h, iv1)
    flat = tex.reshape(-1, ch)

    def fetch(iu, iv):
        inside = (iu >= 0) & (iu < w) & (iv >= 0) & (iv < h)
        idx = (tz * h + iv.clamp(0, h - 1)) * w + iu.clamp(0, w - 1)
        val = flat[idx]
        if boundary == "zero":
            val = val * inside.unsqueeze(1).to(val.dtype)
        return val

    a00, a10 = fetch(iu0, iv0), fetch(iu1, iv0)
    a01, a11 = fetch(iu0, iv1), fetch(iu1, iv1)
    top = a00 + fu * (a10 - a00)
    bot = a01 + fu * (a11 - a01)
    return top + fv * (bot - top)


def _nearest(tex, tz, u, v, boundary):
    _, h, w, ch = tex.shape
    if boundary == "wrap":
        u = u - torch.floor(u)
        v = v - torch.floor(v)
    iu = torch.floor(u * w).long()
    iv = torch.floor(v * h).long()
    inside = (iu >= 0) & (iu < w) & (iv >= 0) & (iv < h)
    val = tex.reshape(-1, ch)[(tz * h + iv.clamp(0, h - 1)) * w + iu.clamp(0, w - 1)]
    if boundary == "zero":
        val = val * inside.unsqueeze(1).to(val.dtype)
    return val


def texture_torch(tex: torch.Tensor, uv: torch.Tensor, uv_da: torch.Tensor | None,
                  mip_level_bias: torch.Tensor | None, mip: list[torch.Tensor] | None,
                  filter_mode: str, boundary_mode: str, max_mip_level: int | None) -> torch.Tensor:
    """Sample ``tex [Bt,H,W,C]`` (``Bt`` is 1 or the batch) at ``uv [B,h,w,2]``: ``[B,h,w,C]``.

    ``filter_mode`` is already resolved (no ``auto``) and inputs validated by
    :func:`zoo.render.texture`.
    """
    batch, oh, ow, _ = uv.shape
    ch = tex.shape[-1]
    n = batch * oh * ow
    u = uv[..., 0].reshape(n)
    v = uv[..., 1].reshape(n)
    tz = torch.zeros(n, dtype=torch.long, device=uv.device)
    if tex.shape[0] > 1:
        tz = torch.arange(batch, device=uv.device).repeat_interleave(oh * ow)
    if filter_mode == "nearest":
        return _nearest(tex, tz, u, v, boundary_mode).view(batch, oh, ow, ch)
    if filter_mode == "linear":
        return _bilinear(tex, tz, u, v, boundary_mode).view(batch, oh, ow, ch)

    levels = mip if mip is not None else build_mip_torch(tex, max_mip_level)
    max_level = len(levels) - 1
    if uv_da is not None:
        bias = None if mip_level_bias is None else mip_level_bias.reshape(n)
        flevel = _mip_level(uv_da.reshape(n, 4), bias, tex.shape[1], tex.shape[2], max_level)
    else:  # bias only
        flevel = mip_level_bias.reshape(n).clamp(0, max_level)
    level0 = torch.floor(flevel.detach()).long()
    if filter_mode == "linear-mipmap-nearest":
        frac = torch.zeros_like(flevel)
    else:
        frac = flevel - level0.to(flevel.dtype)
    out = torch.zeros(n, ch, dtype=torch.result_type(tex, uv), device=uv.device)
    for lv in torch.unique(level0).tolist():
        sel = (level0 == lv).nonzero().squeeze(1)
        a = _bilinear(levels[lv], tz[sel], u[sel], v[sel], boundary_mode)
        if lv < max_level and filter_mode == "linear-mipmap-linear":
            b = _bilinear(levels[lv + 1], tz[sel], u[sel], v[sel], boundary_mode)
            a = a + frac[sel].unsqueeze(1) * (b - a)
        out = out.index_copy(0, sel, a)
    return out.view(batch, oh, ow, ch)
