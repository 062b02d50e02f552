"""Shells: N mesh layers around a body template, sharing its faces and UVs, skinned from it.

Facts from Gaussian Shell Maps (computational-imaging/GSM, the LSV authors' lab), each a
config field of `ShellConfig`:

- **Layers.** 5 shells, outermost first: the outer ``num_shells // 2 + 1`` are offset along the
  template's vertex normals by ``outer_offsets`` (default 0.05, 0.025 and 0 m: the last is the
  body itself); the inner ones lie ``inner_fractions`` (0.5 and 1) of the way from the body to a
  shrunk body.
- **The shrunk body** (GSM loads one from a mesh file or pushes the body in along its normals):
  ``shrink="skeleton"`` (the default here, a choice) moves each vertex toward the closest point
  of its nearest bone behind the surface, to ``shrink_scale`` of its distance, which never turns
  a thin limb inside out; ``shrink="normal"`` moves it ``shrink_offset`` metres against its normal, as GSM does
  without a file.
- **Skinning.** A shell vertex's skinning weights are the inverse-distance blend of the
  template weights of its ``knn`` (5) nearest template vertices, matched on position and
  ``normal_weight`` (0.1) times the normal; the inverse distance is of the squared distance
  (GSM's Shepard weights with ``p = 1``), floored at 1e-8.

Shells are rebuilt from the shaped, unposed body every call (so SMPL shape moves them) and posed
by the body's linear blend skinning; their vertex ``i`` always comes from template vertex ``i``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from zoo.errors import ConfigError

from .body import BodyModel, bone_end_weights, bone_segments, closest_on_segments

__all__ = ["ShellConfig", "Shells", "vertex_normals"]


@dataclass(frozen=True)
class ShellConfig:
    outer_offsets: tuple[float, ...] = (0.05, 0.025, 0.0)
    inner_fractions: tuple[float, ...] = (0.5, 1.0)
    shrink: str = "skeleton"
    shrink_scale: float = 0.5
    shrink_offset: float = 0.03
    knn: int = 5
    normal_weight: float = 0.1
    idw_power: float = 1.0

    @property
    def num_shells(self) -> int:
        return len(self.outer_offsets) + len(self.inner_fractions)

    def check(self) -> "ShellConfig":
        if not self.outer_offsets or list(self.outer_offsets) != sorted(self.outer_offsets, reverse=True):
            raise ConfigError(f"outer_offsets must be at least one offset, outermost first, not {self.outer_offsets}")
        if any(not 0 < f <= 1 for f in self.inner_fractions) or \
                list(self.inner_fractions) != sorted(self.inner_fractions):
            raise ConfigError(f"inner_fractions must rise within (0, 1], not {self.inner_fractions}")
        if self.shrink not in ("skeleton", "normal"):
            raise ConfigError(f"shrink must be 'skeleton' or 'normal', not {self.shrink!r}")
        if not 0 <= self.shrink_scale < 1 or self.shrink_offset < 0 or self.knn < 1:
            raise ConfigError("shells need 0 <= shrink_scale < 1, shrink_offset >= 0 and knn >= 1")
        return self


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals ``[B, V, 3]`` of ``verts [B, V, 3]`` (counter-clockwise faces)."""
    a, b, c = (verts[:, faces[:, i]] for i in range(3))
    fn = torch.linalg.cross(b - a, c - a)  # twice the area, outward
    n = torch.zeros_like(verts)
    for i in range(3):
        n = n.index_add(1, faces[:, i], fn)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _closest_on_bones(points: torch.Tensor, bones: torch.Tensor, normals: torch.Tensor | None = None) -> torch.Tensor:
    """For points ``[B, V, 3]`` and bones ``[B, K, 2, 3]``: the closest point on the nearest bone.

    With ``normals [B, V, 3]``, only bone points behind the surface (``(q - p) . n < 0``) count, so a
    bone outside the body near a vertex (a collar bone above the chest) never pulls it outward; a
    vertex with no bone behind it keeps itself (no shrink)."""
    closest = closest_on_segments(points, bones)  # [B, V, K, 3]
    dist = (points[:, :, None] - closest).norm(dim=-1)
    if normals is not None:
        behind = ((closest - points[:, :, None]) * normals[:, :, None]).sum(-1) < 0
        dist = torch.where(behind, dist, torch.full_like(dist, float("inf")))
    k = dist.argmin(-1)
    out = closest.gather(2, k[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    if normals is not None:
        out = torch.where(torch.isinf(dist.min(-1).values)[..., None], points, out)
    return out


class Shells(nn.Module):
    """Shells around ``body`` (see the module docstring); ``tips``: where leaf bones end
    (`bone_end_weights`), used by ``shrink="skeleton"`` only."""

    def __init__(self, body: BodyModel, config: ShellConfig = ShellConfig(), tips: dict | None = None):
        super().__init__()
        self.body, self.config = body, config.check()
        weights, offset = bone_end_weights(body.parents, tips)
        self.register_buffer("bone_end_weights", weights, persistent=False)
        self.register_buffer("bone_end_offset", offset, persistent=False)
        with torch.no_grad():
            rest = self.rest_shells(body.v_template[None], body.rest(None)[1])[0]  # [N, V, 3]
        self.register_buffer("skin_weights", self._idw_weights(rest), persistent=False)  # [N, V, 24]

    @property
    def num_shells(self) -> int:
        return self.config.num_shells

    @property
    def faces(self) -> torch.Tensor:
        return self.body.faces

    def bones(self, joints: torch.Tensor) -> torch.Tensor:
        """Bones ``[B, 24, 2, 3]`` of rest joints ``[B, 24, 3]``."""
        return bone_segments(joints, ends=(self.bone_end_weights, self.bone_end_offset))

    def rest_shells(self, verts: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """Unposed shells ``[B, N, V, 3]`` around the unposed body ``verts [B, V, 3]``."""
        cfg = self.config
        normals = vertex_normals(verts, self.body.faces)
        layers = [verts + o * normals for o in cfg.outer_offsets]
        if cfg.inner_fractions:
            if cfg.shrink == "skeleton":
                axis = _closest_on_bones(verts, self.bones(joints), normals)
                shrunk = axis + cfg.shrink_scale * (verts - axis)
            else:
                shrunk = verts - cfg.shrink_offset * normals
            layers += [verts + f * (shrunk - verts) for f in cfg.inner_fractions]
        return torch.stack(layers, 1)

    def _idw_weights(self, rest: torch.Tensor) -> torch.Tensor:
        cfg, body = self.config, self.body
        tmpl = body.v_template
        normals = vertex_normals(tmpl[None], body.faces)[0]
        ref = torch.cat([tmpl, cfg.normal_weight * normals], -1)  # [V, 6]
        out = []
        for layer in rest:  # one shell at a time bounds the [V, V] distance matrix
            q = torch.cat([layer, cfg.normal_weight * normals], -1)
            d2, idx = [], []
            for chunk in q.split(4096):
                dist = torch.cdist(chunk, ref).square()
                top = dist.topk(min(cfg.knn, len(ref)), dim=1, largest=False)
                d2.append(top.values)
                idx.append(top.indices)
            d2, idx = torch.cat(d2), torch.cat(idx)
            w = d2.clamp_min(1e-8).pow(-cfg.idw_power)
            w = w / w.sum(1, keepdim=True)
            out.append((w[..., None] * body.weights[idx]).sum(1))
        return torch.stack(out)

    def forward(self, pose: torch.Tensor, betas: torch.Tensor | None = None,
                transl: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Posed shells ``[B, N, V, 3]`` for axis-angle ``pose [B, 24, 3]``, with the posed
        ``joints [B, 24, 3]`` and the unposed ``rest`` shells ``[B, N, V, 3]``."""
        tf = self.body.transforms(pose, betas)
        rest = self.rest_shells(tf["vertices"], tf["joints"])
        b, n, v, _ = rest.shape
        posed = torch.stack([self.body.skin(rest[:, s], self.skin_weights[s], tf, transl) for s in range(n)], 1)
        joints = tf["joints"] + tf["moved"] + (0 if transl is None else transl[:, None])
        return {"shells": posed, "joints": joints, "rest": rest}

