"""Differentiable rasterization (installed as ``zoo.render``): nvdiffrast's four ops, two backends.

Conventions (nvdiffrast's, stated once here):

- **Positions** are clip-space float32 ``[B,V,4]`` (instanced mode: every image draws all of
  ``tri``) or ``[V,4]`` with ``ranges [B,2]`` = (first triangle, count) per image (range
  mode). **Triangles** are int32 ``[T,3]`` vertex indices.
- **Pixels**: ``rast[b, y, x]`` covers NDC ``[-1 + 2x/W, -1 + 2(x+1)/W]`` horizontally and
  likewise vertically; its sample is the pixel **centre**, ``x + 0.5``. Row 0 is the
  **bottom** of the image (NDC ``y = -1``): flip rows (``img.flip(1)``) to save a picture.
- **rast** ``[B,H,W,4]`` = ``(u, v, z/w, triangle_id + 1)``, all zeros where no triangle
  covers the pixel. ``u, v`` are perspective-correct barycentrics of vertices 0 and 1
  (vertex 2 gets ``1 - u - v``); ``triangle_id`` indexes ``tri`` (in range mode too) and is
  stored as a float, exact up to 2^24 triangles.
- **Coverage**: vertices are snapped to 1/16 pixel before the coverage test (nvdiffrast's
  cudaraster; the torch backend does the same, see :mod:`.torch_raster`), so a pixel
  centre within about 1/32 pixel of an edge follows the snapped edge; a sample exactly on
  a shared edge goes to one triangle only. ``u, v`` are clamped to ``[0, 1]`` and ``z/w``
  to ``[-1, 1]`` on output; gradients are those of the unclamped values.
- **Visibility**: the smallest ``z/w`` wins (ties to the lower triangle index on the torch
  backend). Both faces are drawn (no culling). Triangles crossing the near plane
  (``z = -w``) are clipped, as is everything beyond the far plane (``z = w``).
- **rast_db** ``[B,H,W,4]`` = ``(du/dX, du/dY, dv/dX, dv/dY)`` in pixel units.
- **Textures** ``[B,H,W,C]``, ``uv = (0,0)`` at texel row 0, column 0's outer corner.

Backends: ``torch`` (any device, the reference; see :mod:`.torch_raster`) and ``nvdiffrast``
(CUDA tensors, ``pip install -e ".[nvdiffrast]"``). ``backend="auto"`` picks nvdiffrast for
CUDA tensors when it imports, torch otherwise. The torch backend is differentiable in
vertex positions (through the barycentrics, their pixel derivatives, ``z/w`` and, in
:func:`antialias`, silhouette edges), attributes and textures.
"""
if __name__ != "zoo.render":  # the folder is importable from the repo root; one copy only
    raise ImportError(f"{__name__!r} is zoo's render/ folder imported under its bare name, which would make a "
                      "second copy of every module in it; import zoo.render instead.")

from .camera import look_at, orthographic, perspective, transform, world_to_clip
from .layers import DepthPeeler, composite, depth_peel
from .meshes import capsule, quad
from .nvdiffrast_backend import available as nvdiffrast_available
from .ops import (antialias, antialias_construct_topology_hash, interpolate, rasterize,
                  resolve_backend, texture, texture_construct_mip)

__all__ = [
    "rasterize", "interpolate", "texture", "texture_construct_mip", "antialias",
    "antialias_construct_topology_hash", "DepthPeeler", "depth_peel", "composite",
    "perspective", "orthographic", "look_at", "transform", "world_to_clip",
    "quad", "capsule", "nvdiffrast_available", "resolve_backend",
]
