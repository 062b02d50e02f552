"""Lifting image features onto sparse voxels: where a voxel lies in the image, and what the image
features are there.

A site of a sparse tensor at stride ``s`` (indices ``(batch, z, y, x)``) stands for the LiDAR
point `site_positions` gives: the centre of the ``s``-voxel cell it indexes (``mode="centre"``,
``min + (index + 0.5) * s * voxel_size``), or Focals Conv's corner (``mode="corner"``,
``min + index * s * voxel_size``). The positions are in the augmented frame the network sees;
each sample's ``lidar_to_image [3, 4]`` (built on the data side: undo scale, rotation and flip,
then LiDAR -> rectified camera -> ``P2``) takes them to pixels in one product.

`sample_at_pixels` reads a feature map ``[B, C, h, w]`` that covers the (padded) batch image
``[B, 3, H, W]`` at those pixels: ``bilinear`` at the continuous pixel, or ``nearest``, Focals
Conv's rule for checkpoint parity (it resizes the feature map to ``H x W`` bilinearly and reads
the pixel ``int(u), int(v)``; that is the same as sampling the map at that pixel's centre).
Pixel ``(u, v)`` covers ``[u, u + 1) x [v, v + 1)``; the feature map spans the padded image
(cell ``j`` covers ``[j, j + 1) * W / w``). Sites behind the camera or outside the sample's
own image (not the batch's padding) get zero features and ``mask`` False; Focals Conv tests
against the padded batch size and not the depth, a difference only at image borders.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from zoo.errors import ConfigError

__all__ = ["site_positions", "project_to_image", "sample_at_pixels", "lift"]


def site_positions(indices: torch.Tensor, stride: int | Sequence[int], voxel_size: Sequence[float],
                   point_range: Sequence[float], mode: str = "centre") -> torch.Tensor:
    """LiDAR ``[N, 3]`` (x, y, z) float64 of sparse sites ``[N, 4]`` (batch, z, y, x) at `stride`
    (an int or per-axis ``(z, y, x)``) on the grid of `voxel_size` (x, y, z) from the minimum of
    `point_range` (x_min, y_min, z_min, x_max, y_max, z_max)."""
    if mode not in ("centre", "corner"):
        raise ConfigError(f"lifting position mode must be 'centre' or 'corner', not {mode!r}")
    st = torch.as_tensor(stride if not isinstance(stride, int) else (stride,) * 3, dtype=torch.float64,
                         device=indices.device).flip(0)  # (z, y, x) -> (x, y, z)
    zyx = indices[:, 1:].to(torch.float64)
    xyz = zyx.flip(1) + (0.5 if mode == "centre" else 0.0)
    size = torch.as_tensor(voxel_size, dtype=torch.float64, device=indices.device)
    low = torch.as_tensor(point_range[:3], dtype=torch.float64, device=indices.device)
    return low + xyz * st * size


def project_to_image(positions: torch.Tensor, batch_index: torch.Tensor, lidar_to_image: torch.Tensor):
    """Pixels ``[N, 2]`` (u, v) and rectified depths ``[N]`` (float64) of LiDAR positions
    ``[N, 3]`` of samples `batch_index` ``[N]`` through ``lidar_to_image [B, 3, 4]``."""
    m = lidar_to_image.to(device=positions.device, dtype=torch.float64)[batch_index.long()]  # [N, 3, 4]
    p = positions.to(torch.float64)
    uvw = torch.einsum("nij,nj->ni", m[:, :, :3], p) + m[:, :, 3]
    depth = uvw[:, 2] - m[:, 2, 3]
    return uvw[:, :2] / uvw[:, 2:3], depth


def sample_at_pixels(feature_map: torch.Tensor, uv: torch.Tensor, batch_index: torch.Tensor,
                     image_size: tuple[int, int], valid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Features ``[N, C]`` of ``feature_map [B, C, h, w]`` at pixels ``uv [N, 2]`` of the batch
    image of `image_size` ``(H, W)``; zero where `valid` ``[N]`` is False. Differentiable in the
    feature map."""
    if mode not in ("bilinear", "nearest"):
        raise ConfigError(f"lifting sample mode must be 'bilinear' or 'nearest', not {mode!r}")
    h_img, w_img = image_size
    pix = uv.floor() + 0.5 if mode == "nearest" else uv
    # grid_sample's align_corners=False grid: -1 and 1 are the outer edges of the map, which spans the image
    grid = torch.stack([pix[:, 0] * (2.0 / w_img) - 1.0, pix[:, 1] * (2.0 / h_img) - 1.0], 1).to(feature_map.dtype)
    out = feature_map.new_zeros((len(uv), feature_map.shape[1]))
    b_idx = batch_index.long()
    for b in range(feature_map.shape[0]):
        rows = torch.nonzero((b_idx == b) & valid).squeeze(1)
        if not len(rows):
            continue
        g = grid[rows].view(1, 1, -1, 2)
        vals = F.grid_sample(feature_map[b:b + 1], g, mode="bilinear", padding_mode="border", align_corners=False)
        out = out.index_copy(0, rows, vals[0, :, 0].t())
    return out


def lift(feature_map: torch.Tensor, indices: torch.Tensor, stride, voxel_size, point_range,
         lidar_to_image: torch.Tensor, image_size: tuple[int, int], sample_sizes: Sequence[tuple[int, int]],
         position: str = "centre", sample: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Image features ``[N, C]`` and ``mask [N]`` for the sparse sites `indices` ``[N, 4]``:
    `site_positions`, `project_to_image`, then `sample_at_pixels` on ``feature_map [B, C, h, w]``
    (which covers the padded batch image of `image_size`); a site counts when it is in front of
    the camera and inside its own sample's image, `sample_sizes` ``[(H_b, W_b), ...]``."""
    pos = site_positions(indices, stride, voxel_size, point_range, position)
    uv, depth = project_to_image(pos, indices[:, 0], lidar_to_image)
    sizes = torch.as_tensor(sample_sizes, dtype=torch.float64, device=uv.device)[indices[:, 0].long()]  # [N, 2] (H, W)
    mask = (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 1] >= 0) & (uv[:, 0] < sizes[:, 1]) & (uv[:, 1] < sizes[:, 0])
    return sample_at_pixels(feature_map, uv, indices[:, 0], image_size, mask, sample), mask
