"""Procedural meshes for tests, benchmarks and demos (no files needed)."""
from __future__ import annotations

import math

import torch

from zoo.errors import RenderError

__all__ = ["quad", "capsule"]


def quad(size: float = 1.0, z: float = 0.0):
    """Square ``[-size, size]^2`` at depth ``z``: vertices ``[4,3]``, uv ``[4,2]``, tri ``[2,3]``.

    ``uv = (0, 0)`` at ``(-size, -size)`` and ``(1, 1)`` at ``(size, size)``.
    """
    verts = torch.tensor([[-size, -size, z], [size, -size, z], [size, size, z], [-size, size, z]])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    return verts, uv, tri


def capsule(radius: float = 0.5, length: float = 1.0, segments: int = 96, rings: int = 72,
            dtype: torch.dtype = torch.float32):
    """Closed, watertight capsule along ``y``: vertices ``[V,3]``, tri ``[2*segments*rings, 3]``.

    Two hemispheres of radius ``radius`` joined by a cylinder of ``length``: ``rings`` rows
    of ``segments`` vertices between the two poles, evenly spaced along the profile, so
    triangles are of similar size everywhere. The defaults give 13,824 triangles, an
    SMPL-sized body.
    Triangles wind counter-clockwise seen from outside. ``dtype``: of the vertices.
    """
    if segments < 3 or rings < 1 or radius <= 0 or length < 0:
        raise RenderError("capsule needs segments >= 3, rings >= 1, radius > 0 and length >= 0")
    # Rows spaced evenly along the profile's arc length (hemisphere, cylinder, hemisphere),
    # so the cylinder is subdivided like the caps: no long sliver triangles.
    cap_arc = math.pi / 2 * radius
    total = 2 * cap_arc + length
    heights, radii = [], []
    for i in range(rings):
        s = (i + 1) * total / (rings + 1)
        if s < cap_arc:  # top hemisphere, from the pole down
            phi = s / radius
            heights.append(length / 2 + radius * math.cos(phi))
            radii.append(radius * math.sin(phi))
        elif s <= cap_arc + length:  # cylinder
            heights.append(length / 2 - (s - cap_arc))
            radii.append(radius)
        else:  # bottom hemisphere
            phi = (total - s) / radius
            heights.append(-length / 2 - radius * math.cos(phi))
            radii.append(radius * math.sin(phi))
    theta = torch.arange(segments, dtype=torch.float64) * (2 * math.pi / segments)
    h = torch.tensor(heights, dtype=torch.float64)[:, None].expand(rings, segments)
    r = torch.tensor(radii, dtype=torch.float64)[:, None]
    ring = torch.stack([r * torch.cos(theta), h, -r * torch.sin(theta)], dim=-1).reshape(-1, 3)
    top = torch.tensor([[0.0, length / 2 + radius, 0.0]], dtype=torch.float64)
    bottom = torch.tensor([[0.0, -length / 2 - radius, 0.0]], dtype=torch.float64)
    verts = torch.cat([ring, top, bottom]).to(dtype)  # built in float64
    top_i, bottom_i = rings * segments, rings * segments + 1
    s = torch.arange(segments)
    s1 = (s + 1) % segments
    faces = [torch.stack([torch.full_like(s, top_i), s, s1], 1)]
    for i in range(rings - 1):
        a, b = i * segments + s, i * segments + s1
        c, d = (i + 1) * segments + s, (i + 1) * segments + s1
        faces += [torch.stack([a, c, d], 1), torch.stack([a, d, b], 1)]
    last = (rings - 1) * segments
    faces.append(torch.stack([torch.full_like(s, bottom_i), last + s1, last + s], 1))
    return verts, torch.cat(faces).to(torch.int32)
