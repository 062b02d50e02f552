"""Multi-view consistency of rendered layered surface volumes.

The same sample is rendered from two cameras A and B. Each pixel of A that sees the shells is
lifted to the 3D point of its nearest fragment (rasterizing every shell with `zoo.render`),
projected into B and kept where B sees that same point (its own nearest fragment within
``tolerance`` metres: not occluded from B); the figure is the mean absolute RGB difference
between A's pixel and B's image bilinearly sampled there, over pixels covered (alpha > 0.5) in
both. Colour that belongs to the surface, as LSV's does, scores near 0 (up to resampling and
the parallax between the outer shell, whose points are lifted, and the deeper layers that may
give the colour); view-dependent colour scores higher. ``mismatched`` in `multiview_consistency`
renders B with another sample's textures: the same figure for images that do not belong together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.render import interpolate, rasterize, transform

from .render import layer_triangles

__all__ = ["multiview_consistency"]


def _nearest_points(flat: torch.Tensor, tri: torch.Tensor, mvp: torch.Tensor, res: int):
    """World points ``[B, H, W, 3]`` of each pixel's nearest fragment and coverage ``[B, H, W]``
    (rows bottom-first, as `zoo.render.rasterize`)."""
    pos = transform(flat, mvp)
    rast, _ = rasterize(pos.contiguous(), tri, (res, res), grad_db=False)
    points, _ = interpolate(flat.contiguous(), rast, tri)
    return points, rast[..., 3] > 0


@torch.no_grad()
def multiview_consistency(model, textures: torch.Tensor, pose: torch.Tensor, mvp_a: torch.Tensor,
                          mvp_b: torch.Tensor, resolution: int = 64, tolerance: float = 0.02,
                          mismatched: bool = False) -> dict:
    """``{"l1", "fraction"}`` for ``textures [B, N, 4, T, T]`` in ``pose [B, 24, 3]`` seen from
    world-to-clip ``mvp_a`` and ``mvp_b [B, 4, 4]`` (module docstring); ``fraction`` is the share
    of A's covered pixels compared."""
    shells = model.pose(pose)["shells"]
    b, n, v, _ = shells.shape
    tri = layer_triangles(model.body.faces, n, v).int()
    flat = shells.reshape(b, n * v, 3)
    res = int(resolution)
    pts_a, cov_a = _nearest_points(flat, tri, mvp_a, res)
    pts_b, _ = _nearest_points(flat, tri, mvp_b, res)
    tex_b = textures.roll(1, 0) if mismatched else textures
    img_a = model.render(textures, shells, mvp_a[:, None], res)[:, 0].flip(1)  # bottom-first, as the points
    img_b = model.render(tex_b, shells, mvp_b[:, None], res)[:, 0].flip(1)
    clip = transform(pts_a.reshape(b, -1, 3), mvp_b)
    ndc = (clip[..., :2] / clip[..., 3:].clamp_min(1e-8)).reshape(b, res, res, 2)
    # grid_sample's (-1, -1) is row 0, column 0's outer corner: NDC's bottom-left on bottom-first rows
    sample = lambda img, mode: F.grid_sample(img.permute(0, 3, 1, 2), ndc, mode=mode, align_corners=False)  # noqa: E731
    seen_b = sample(pts_b, "nearest").permute(0, 2, 3, 1)
    rgba_b = sample(img_b, "bilinear").permute(0, 2, 3, 1)
    inside = (ndc.abs() < 1).all(-1)
    visible = inside & ((seen_b - pts_a).norm(dim=-1) < tolerance)
    mask = cov_a & visible & (img_a[..., 3] > 0.5) & (rgba_b[..., 3] > 0.5)
    straight = lambda x: x[..., :3] / x[..., 3:].clamp_min(1e-6)  # noqa: E731  (renders are premultiplied)
    diff = (straight(img_a) - straight(rgba_b)).abs().mean(-1)
    count = mask.sum()
    return {"l1": (diff[mask].sum() / count.clamp_min(1)).item(),
            "fraction": (count / (cov_a & (img_a[..., 3] > 0.5)).sum().clamp_min(1)).item()}
