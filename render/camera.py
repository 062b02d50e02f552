"""Cameras in OpenGL conventions: right-handed eye space looking down ``-z``, ``y`` up,
clip space with ``-w <= x, y, z <= w`` visible, NDC depth ``-1`` at the near plane.

Matrices are ``[4,4]`` (or batched ``[B,4,4]``) acting on column vectors; points are rows,
so :func:`transform` computes ``p @ M^T``.
"""
from __future__ import annotations

import math

import torch

from zoo.errors import RenderError

__all__ = ["perspective", "orthographic", "look_at", "transform", "world_to_clip"]


def perspective(fovy: float, aspect: float = 1.0, near: float = 0.1, far: float = 100.0,
                dtype=torch.float32, device=None) -> torch.Tensor:
    """``gluPerspective``: vertical field of view ``fovy`` in **degrees**; ``[4,4]``."""
    if not (0 < fovy < 180) or aspect <= 0 or not (0 < near < far):
        raise RenderError(f"perspective needs 0 < fovy < 180 degrees, aspect > 0 and "
                          f"0 < near < far; got fovy={fovy}, aspect={aspect}, near={near}, far={far}")
    f = 1.0 / math.tan(math.radians(fovy) / 2)
    m = torch.zeros(4, 4, dtype=dtype, device=device)
    m[0, 0] = f / aspect
    m[1, 1] = f
    m[2, 2] = (far + near) / (near - far)
    m[2, 3] = 2 * far * near / (near - far)
    m[3, 2] = -1.0
    return m


def orthographic(left: float, right: float, bottom: float, top: float, near: float = 0.1,
                 far: float = 100.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """``glOrtho``: the box ``[left,right] x [bottom,top] x [-far,-near]`` maps to NDC; ``[4,4]``."""
    if right == left or top == bottom or far == near:
        raise RenderError("orthographic needs left != right, bottom != top and near != far")
    m = torch.zeros(4, 4, dtype=dtype, device=device)
    m[0, 0] = 2 / (right - left)
    m[1, 1] = 2 / (top - bottom)
    m[2, 2] = -2 / (far - near)
    m[0, 3] = -(right + left) / (right - left)
    m[1, 3] = -(top + bottom) / (top - bottom)
    m[2, 3] = -(far + near) / (far - near)
    m[3, 3] = 1.0
    return m


def look_at(eye, target, up=(0.0, 1.0, 0.0), dtype=torch.float32, device=None) -> torch.Tensor:
    """World-to-eye matrix (``gluLookAt``): ``eye`` at the origin looking down ``-z`` at ``target``.

    ``eye``/``target``/``up`` are ``[3]`` or batched ``[B,3]``; returns ``[4,4]`` or ``[B,4,4]``.
    """
    eye = torch.as_tensor(eye, dtype=dtype, device=device)
    target = torch.as_tensor(target, dtype=dtype, device=device)
    up = torch.as_tensor(up, dtype=dtype, device=device)
    eye, target, up = torch.broadcast_tensors(eye, target, up)
    fwd = target - eye
    side = torch.linalg.cross(fwd, up)
    if (fwd.norm(dim=-1) == 0).any() or (side.norm(dim=-1) < 1e-12).any():
        raise RenderError("look_at needs eye != target and an up vector not parallel to the view")
    fwd = fwd / fwd.norm(dim=-1, keepdim=True)
    side = side / side.norm(dim=-1, keepdim=True)
    true_up = torch.linalg.cross(side, fwd)
    rot = torch.stack([side, true_up, -fwd], dim=-2)  # rows: camera x, y, z axes in world
    m = torch.zeros(*eye.shape[:-1], 4, 4, dtype=dtype, device=device)
    m[..., :3, :3] = rot
    m[..., :3, 3] = -(rot @ eye.unsqueeze(-1)).squeeze(-1)
    m[..., 3, 3] = 1.0
    return m


def transform(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply ``[4,4]``/``[B,4,4]`` to ``[V,3|4]``/``[B,V,3|4]`` points (w = 1 added): ``[..., V, 4]``."""
    if points.shape[-1] == 3:
        points = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    if points.shape[-1] != 4:
        raise RenderError(f"points must end in 3 or 4 coordinates, got {tuple(points.shape)}")
    return points @ matrix.transpose(-1, -2)


def world_to_clip(vertices: torch.Tensor, view: torch.Tensor, proj: torch.Tensor,
                  model: torch.Tensor | None = None) -> torch.Tensor:
    """Clip-space positions ``proj @ view @ model @ v`` for :func:`zoo.render.rasterize`.

    ``vertices [V,3]`` with batched matrices gives ``[B,V,4]`` (instanced mode).
    """
    mvp = proj @ view if model is None else proj @ view @ model
    out = transform(vertices, mvp)
    if out.dim() == 2:
        return out.unsqueeze(0)
    return out
