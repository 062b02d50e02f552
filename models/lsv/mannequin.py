"""A procedural skinned mannequin on SMPL's 24-joint tree, so the layered surfaces run and are
tested without SMPL (whose licence keeps it out of this repository).

The body is 15 closed capsules (head, neck, torso, and per side upper arm, forearm, hand,
thigh, shin, foot) in SMPL's rest T-pose and axes: metres, ``y`` up, facing ``+z``, the body's
left on ``+x``, feet on ``y = 0`` (a choice: SMPL's own origin is near the pelvis). Each capsule
is its own chart in one UV atlas, packed in shelves with the same texel density everywhere and
a margin between charts, so bilinear lookups never bleed from one part into another.

Skinning weights are smooth: a vertex's weight for joint ``k`` falls off as a Gaussian of its
distance to ``k``'s bone (the segment from the joint to its child, or to the tip of a hand,
foot or head), relative to its nearest bone, with weights under 1e-3 dropped. Limbs therefore
blend across their joints and are rigid away from them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zoo.errors import ConfigError
from zoo.render import capsule

from .body import SMPL_JOINTS, BodyModel, bone_segments, closest_on_segments

__all__ = ["MANNEQUIN_JOINTS", "MANNEQUIN_TIPS", "Mannequin", "build_mannequin"]

# Rest joint positions [24, 3] in SMPL's order and axes (a 1.75 m figure, arms out).
MANNEQUIN_JOINTS = (
    (0.0, 0.95, 0.0), (0.09, 0.88, 0.0), (-0.09, 0.88, 0.0), (0.0, 1.06, 0.0),
    (0.10, 0.50, 0.0), (-0.10, 0.50, 0.0), (0.0, 1.18, 0.0), (0.10, 0.09, -0.01),
    (-0.10, 0.09, -0.01), (0.0, 1.26, 0.0), (0.10, 0.03, 0.11), (-0.10, 0.03, 0.11),
    (0.0, 1.47, 0.0), (0.07, 1.40, 0.0), (-0.07, 1.40, 0.0), (0.0, 1.56, 0.0),
    (0.19, 1.42, 0.0), (-0.19, 1.42, 0.0), (0.45, 1.42, 0.0), (-0.45, 1.42, 0.0),
    (0.69, 1.42, 0.0), (-0.69, 1.42, 0.0), (0.77, 1.42, 0.0), (-0.77, 1.42, 0.0),
)
# Where the bones of leaf joints end (head top, toe tips, finger tips).
MANNEQUIN_TIPS = {15: (0.0, 1.75, 0.0), 10: (0.10, 0.03, 0.17), 11: (-0.10, 0.03, 0.17),
         22: (0.85, 1.42, 0.0), 23: (-0.85, 1.42, 0.0)}


@dataclass(frozen=True)
class _Part:
    name: str
    start: tuple  # capsule axis end points (the hemisphere centres)
    end: tuple
    radius: float
    depth_scale: float = 1.0  # squash along z (a flatter torso)


def _parts() -> list[_Part]:
    j = MANNEQUIN_JOINTS
    parts = [_Part("head", (0.0, 1.62, 0.01), (0.0, 1.68, 0.01), 0.095),
             _Part("neck", (0.0, 1.38, 0.0), (0.0, 1.56, 0.0), 0.05),  # its foot sinks into the torso
             _Part("torso", (0.0, 0.98, 0.0), (0.0, 1.30, 0.0), 0.15, 0.65)]
    for side, (hip, knee, ankle, foot, sh, el, wr, hand) in (
            ("left", (1, 4, 7, 10, 16, 18, 20, 22)), ("right", (2, 5, 8, 11, 17, 19, 21, 23))):
        parts += [_Part(f"{side}_upper_arm", j[sh], j[el], 0.05),
                  _Part(f"{side}_forearm", j[el], j[wr], 0.04),
                  _Part(f"{side}_hand", j[wr], MANNEQUIN_TIPS[hand], 0.035),
                  _Part(f"{side}_thigh", j[hip], j[knee], 0.075),
                  _Part(f"{side}_shin", j[knee], j[ankle], 0.055),
                  _Part(f"{side}_foot", j[ankle], MANNEQUIN_TIPS[foot], 0.04)]
    return parts


def _capsule_chart(part: _Part, segments: int, rings: int):
    """One part's vertices ``[V, 3]``, faces ``[F, 3]``, chart uv ``[Vt, 2]`` in ``[0,1]^2`` (u around,
    v along the profile) and uv faces ``[F, 3]``; also the chart's size in metres (around, along).

    The mesh is `zoo.render.capsule` (rings evenly spaced along the profile, poles last), squashed
    along ``z`` by ``depth_scale`` and turned from ``+y`` onto the part's axis."""
    r, start, end = part.radius, torch.tensor(part.start), torch.tensor(part.end)
    length = float((end - start).norm())
    total = math.pi * r + length  # the profile: two quarter circles and the straight part
    s = torch.arange(1, rings + 1, dtype=torch.float64) * total / (rings + 1)  # capsule's ring spacing
    local, faces = capsule(r, length, segments, rings, dtype=torch.float64)
    local = local * torch.tensor([1.0, 1.0, part.depth_scale], dtype=torch.float64)
    axis = (end - start).double() / max(length, 1e-12)
    rot = _rotation_between(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), axis)
    verts = local @ rot.T + ((start + end) / 2).double()
    faces = faces.long()
    i = torch.arange(segments)
    # uv: a (segments + 1) x rings grid (the seam column is duplicated) plus one pole uv per segment
    cols = segments + 1
    uv_grid = torch.stack(torch.meshgrid(torch.arange(cols, dtype=torch.float64) / segments,
                                         s / total, indexing="xy"), -1).reshape(-1, 2)  # [rings * cols, 2]
    mid = (torch.arange(segments, dtype=torch.float64) + 0.5) / segments
    uv_top = torch.stack([mid, torch.zeros_like(mid)], 1)
    uv_bottom = torch.stack([mid, torch.ones_like(mid)], 1)
    uv = torch.cat([uv_grid, uv_top, uv_bottom])
    j1 = i + 1  # the seam: the last column's right neighbour is the duplicated column
    t0, b0 = rings * cols, rings * cols + segments
    uv_faces = [torch.stack([t0 + i, i, j1], 1)]
    for k in range(rings - 1):
        a, b, c, d = k * cols + i, k * cols + j1, (k + 1) * cols + i, (k + 1) * cols + j1
        uv_faces += [torch.stack([a, c, d], 1), torch.stack([a, d, b], 1)]
    lc = (rings - 1) * cols
    uv_faces.append(torch.stack([b0 + i, lc + j1, lc + i], 1))
    around = 2 * math.pi * r * (1 + part.depth_scale) / 2
    return verts.float(), faces, uv.float(), torch.cat(uv_faces), (around, total)


def _rotation_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The rotation ``[3, 3]`` taking unit vector ``a`` to unit vector ``b`` (about ``z`` when opposite)."""
    v, c = torch.linalg.cross(a, b), float(a @ b)
    if c < -1 + 1e-9:
        return torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=a.dtype))
    k = torch.tensor([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]], dtype=a.dtype)
    return torch.eye(3, dtype=a.dtype) + k + k @ k / (1 + c)


def _pack_charts(sizes: list[tuple[float, float]], margin: float) -> tuple[list[tuple[float, float]], float]:
    """Shelf-pack rectangles (width, height) into the unit square at one common scale.

    Returns each chart's lower-left corner and the scale (atlas units per metre), the largest
    found by bisection that fits with ``margin`` atlas units around every chart."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i][1])

    def place(scale):
        corners, x, y, shelf = [None] * len(sizes), margin, margin, 0.0
        for i in order:
            w, h = sizes[i][0] * scale, sizes[i][1] * scale
            if x + w + margin > 1:
                x, y, shelf = margin, y + shelf + margin, 0.0
            if x + w + margin > 1 or y + h + margin > 1:
                return None
            corners[i] = (x, y)
            x, shelf = x + w + margin, max(shelf, h)
        return corners

    lo, hi = 0.0, 1.0 / max(max(s) for s in sizes)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if place(mid) is not None else (lo, mid)
    return place(lo), lo


@dataclass
class Mannequin:
    """The mannequin's `BodyModel` and its UV atlas: ``uv [Vt, 2]`` and ``uv_faces [F, 3]`` (face
    ``f`` of ``body.faces`` reads its texture through ``uv_faces[f]``), ``part [F]`` (the part of
    each face) and ``part_names``."""

    body: BodyModel
    uv: torch.Tensor
    uv_faces: torch.Tensor
    part: torch.Tensor
    part_names: tuple[str, ...]


def build_mannequin(segments: int = 12, rings: int = 10, torso_segments: int = 20, torso_rings: int = 16,
                    atlas_margin: float = 4 / 256, falloff: float = 0.035) -> Mannequin:
    """The procedural mannequin (module docstring). ``segments``/``rings`` are each limb capsule's
    resolution (the torso and head use ``torso_*``); the defaults give 2,230 vertices and 4,400 triangles.
    ``atlas_margin``: empty atlas space around each chart; ``falloff``: the skinning Gaussian's
    width in metres (larger blends more across joints)."""
    if min(segments, torso_segments) < 3 or min(rings, torso_rings) < 2 or falloff <= 0 or not 0 <= atlas_margin < 0.1:
        raise ConfigError("the mannequin needs segments >= 3, rings >= 2, falloff > 0 and 0 <= atlas_margin < 0.1")
    parts = _parts()
    charts = [_capsule_chart(p, torso_segments if p.name in ("torso", "head") else segments,
                             torso_rings if p.name in ("torso", "head") else rings) for p in parts]
    corners, scale = _pack_charts([c[4] for c in charts], atlas_margin)
    verts, faces, uvs, uv_faces, part = [], [], [], [], []
    nv = nt = 0
    for k, ((v, f, uv, uf, size), corner) in enumerate(zip(charts, corners)):
        verts.append(v)
        faces.append(f + nv)
        uvs.append(torch.tensor(corner) + uv * torch.tensor(size) * scale)
        uv_faces.append(uf + nt)
        part.append(torch.full((len(f),), k))
        nv, nt = nv + len(v), nt + len(uv)
    v_template = torch.cat(verts)
    joints = torch.tensor(MANNEQUIN_JOINTS)
    bones = bone_segments(joints, tips=MANNEQUIN_TIPS)
    d = (v_template[:, None] - closest_on_segments(v_template, bones)).norm(dim=-1)  # [V, 24]
    w = torch.exp(-((d - d.min(1, keepdim=True).values) / falloff) ** 2)
    w = torch.where(w < 1e-3, torch.zeros_like(w), w)
    w = w / w.sum(1, keepdim=True)
    body = BodyModel(v_template, torch.cat(faces), w, joints=joints)
    return Mannequin(body, torch.cat(uvs).float(), torch.cat(uv_faces), torch.cat(part), tuple(p.name for p in parts))


assert len(MANNEQUIN_JOINTS) == len(SMPL_JOINTS)
