"""Procedural clothing for the shells, painted in 3D and baked into each layer's UV texture.

`bake_vertex_values` rasterizes the UV layout (each triangle drawn at its texture coordinates)
with `zoo.render` and interpolates per-vertex values into texels, then grows every chart a few
texels outward so bilinear lookups at chart borders read the chart, not empty atlas.

`procedural_outfit` dresses the 5-shell mannequin from its rest-pose surface (metres, ``y`` up):
skin on the body layer (offset 0), a striped shirt, trousers and shoes on the 0.025 m layer, and
hair and a translucent skirt on the outermost 0.05 m layer, so some colour sits off the body
surface; the inner layers are left empty. A seed varies the colours and stripes. Used by the
demo and the texture-fitting check; the LSV-GAN's synthetic data draws from it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.render import interpolate, rasterize

__all__ = ["bake_vertex_values", "procedural_outfit"]


def bake_vertex_values(values: torch.Tensor, faces: torch.Tensor, uv: torch.Tensor, uv_faces: torch.Tensor,
                       size: int, grow: int = 3) -> torch.Tensor:
    """Texels ``[C, size, size]`` of per-vertex ``values [V, C]`` on the mesh ``faces [F, 3]`` laid out
    by ``uv [Vt, 2]`` / ``uv_faces [F, 3]`` (row 0 at ``v = 0``); ``grow`` texels of dilation."""
    if size < 2 or size & (size - 1):
        raise ConfigError(f"the texture size must be a power of two, not {size}")
    uv_vertex = torch.zeros(len(uv), dtype=torch.long)
    uv_vertex[uv_faces.reshape(-1).long()] = faces.reshape(-1).long()  # each uv vertex's position vertex
    clip = torch.cat([uv * 2 - 1, torch.zeros(len(uv), 1), torch.ones(len(uv), 1)], 1)[None]
    tri = uv_faces.int()
    rast, _ = rasterize(clip.float(), tri, (size, size), backend="torch")
    out, _ = interpolate(values[uv_vertex].float(), rast, tri, backend="torch")
    img = out[0].permute(2, 0, 1)  # [C, T, T]
    mask = (rast[0, ..., 3] > 0).float()[None]
    for _ in range(grow):  # dilate: empty texels take the mean of their filled neighbours
        s = F.avg_pool2d((img * mask)[None], 3, 1, 1)[0]
        m = F.avg_pool2d(mask[None], 3, 1, 1)[0]
        fill = (mask == 0) & (m > 0)
        img = torch.where(fill, s / m.clamp_min(1e-8), img)
        mask = torch.where(fill, torch.ones_like(mask), mask)
    return img


def procedural_outfit(template, size: int = 128, seed: int = 0, num_layers: int = 5) -> torch.Tensor:
    """Straight RGBA textures ``[num_layers, 4, size, size]`` dressing the mannequin (module
    docstring): layer 0 hair and skirt, layer 1 shirt, trousers and shoes, layer 2 skin.
    ``template``: anything with ``body``, ``uv`` and ``uv_faces`` (a `Template`, an LSV model)."""
    if num_layers < 3:
        raise ConfigError("the outfit needs at least 3 layers (outer, clothes, body)")
    g = torch.Generator().manual_seed(seed)
    p = template.body.v_template  # [V, 3] rest surface
    x, y, z = p.unbind(1)
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    skin = torch.tensor([0.93, 0.76, 0.62]) * (0.6 + 0.4 * r(1))
    shirt_a, shirt_b = r(3) * 0.8 + 0.1, r(3) * 0.8 + 0.1
    trousers = r(3) * 0.4 + 0.05
    hair = torch.tensor([0.25, 0.15, 0.08]) * (0.5 + r(1))
    skirt = r(3) * 0.7 + 0.2
    stripes = 6 + int(r(1) * 10)
    ones = torch.ones_like(x)

    arm = x.abs() > 0.2
    torso = (y > 0.9) & (y < 1.44) & ~arm
    upper_arm = arm & (x.abs() < 0.42) & (y > 1.3)
    legs = (y < 0.92) & (y > 0.11)
    feet = y <= 0.11
    stripe = (torch.sin(y * stripes * 6.283) > 0)[:, None]
    shirt = torch.where(stripe, shirt_a, shirt_b)
    clothes_rgb = torch.where((torso | upper_arm)[:, None], shirt, torch.where(legs[:, None], trousers,
                                                                              torch.full((len(p), 3), 0.08)))
    clothes_a = (torso | upper_arm | legs | feet).float()
    head = y > 1.55
    hair_mask = head & ((y > 1.68) | (z < -0.01))
    hem = (y > 0.72 + 0.03 * torch.sin(8 * torch.atan2(x, z))) & (y < 1.02) & ~arm
    outer_rgb = torch.where(hair_mask[:, None], hair, skirt.expand(len(p), 3))
    outer_a = torch.where(hair_mask, ones, torch.where(hem, 0.85 * ones, 0 * ones))
    body_rgb = skin * (0.9 + 0.1 * torch.sin(3 * y))[:, None]

    faces, uv, uvf = template.body.faces, template.uv, template.uv_faces
    layers = []
    for rgb, a in ((outer_rgb, outer_a), (clothes_rgb, clothes_a), (body_rgb, ones)):
        layers.append(bake_vertex_values(torch.cat([rgb, a[:, None]], 1), faces, uv, uvf, size))
    layers += [torch.zeros(4, size, size) for _ in range(num_layers - 3)]
    return torch.stack(layers).clamp(0, 1)
