"""The four differentiable ops, their input checks, and backend dispatch.

See :mod:`zoo.render` for the tensor conventions. Each op takes ``backend="auto" | "torch" |
"nvdiffrast"``; ``auto`` uses nvdiffrast for CUDA tensors when it imports, else torch.
"""
from __future__ import annotations

from typing import Sequence

import torch

from zoo.errors import RenderError

from . import nvdiffrast_backend as nvdr
from .torch_antialias import TopologyHash, antialias_torch, construct_topology_hash
from .torch_interpolate import interpolate_torch
from .torch_raster import rasterize_torch
from .torch_texture import build_mip_torch, texture_torch

__all__ = ["rasterize", "interpolate", "texture", "texture_construct_mip", "antialias",
           "antialias_construct_topology_hash", "resolve_backend"]

BACKENDS = ("auto", "torch", "nvdiffrast")
FILTER_MODES = ("auto", "nearest", "linear", "linear-mipmap-nearest", "linear-mipmap-linear")
BOUNDARY_MODES = ("wrap", "clamp", "zero")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """The backend that will run: ``torch`` or ``nvdiffrast``."""
    if backend not in BACKENDS:
        raise RenderError(f"backend must be one of {BACKENDS}, not {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend == "auto":
        return "nvdiffrast" if on_cuda and nvdr.available() else "torch"
    if backend == "nvdiffrast":
        nvdr.module()  # raises with the install hint when missing
        if not on_cuda:
            raise RenderError("backend='nvdiffrast' needs CUDA tensors; move them with .cuda() "
                              "or use backend='torch'.")
    return backend


def _check_float(name: str, t: torch.Tensor, dims: Sequence[int], last: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise RenderError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise RenderError(f"{name} must be a float tensor, got {t.dtype}; convert with .float()")
    if t.dim() not in dims:
        raise RenderError(f"{name} must have {' or '.join(map(str, dims))} dimensions, "
                          f"got shape {tuple(t.shape)}")
    if last is not None and t.shape[-1] != last:
        raise RenderError(f"{name} must have {last} values in its last dimension, "
                          f"got shape {tuple(t.shape)}")


def _check_tri(tri: torch.Tensor, num_vertices: int, device: torch.device):
    if not isinstance(tri, torch.Tensor) or tri.dtype not in (torch.int32, torch.int64):
        raise RenderError("tri must be an int32 (or int64) tensor of vertex indices, shape [T,3]")
    if tri.dim() != 2 or tri.shape[1] != 3:
        raise RenderError(f"tri must have shape [T,3], got {tuple(tri.shape)}")
    if tri.device != device:
        raise RenderError(f"tri is on {tri.device} but pos is on {device}; put both on one device")
    if tri.numel() and (int(tri.min()) < 0 or int(tri.max()) >= num_vertices):
        raise RenderError(f"tri indexes vertices {int(tri.min())}..{int(tri.max())} but there are "
                          f"{num_vertices}; every index must be in [0, {num_vertices - 1}]")


def _check_resolution(resolution) -> tuple[int, int]:
    try:
        h, w = (int(r) for r in resolution)
    except (TypeError, ValueError):
        raise RenderError(f"resolution must be (height, width), got {resolution!r}") from None
    if h <= 0 or w <= 0 or h > 16384 or w > 16384:
        raise RenderError(f"resolution must be positive and at most 16384, got {(h, w)}")
    return h, w


def _check_ranges(pos: torch.Tensor, ranges, num_tri: int) -> torch.Tensor | None:
    if pos.dim() == 3:
        if ranges is not None:
            raise RenderError("ranges is for range mode (pos [V,4]); with pos [B,V,4] "
                              "(instanced mode) leave it None")
        return None
    if ranges is None:
        raise RenderError("pos [V,4] is range mode and needs ranges [B,2] (first triangle, count) "
                          "per image; for one image pass ranges=torch.tensor([[0, T]]) or use "
                          "pos[None] (instanced mode)")
    if not isinstance(ranges, torch.Tensor) or ranges.dim() != 2 or ranges.shape[1] != 2 \
            or ranges.is_floating_point():
        raise RenderError("ranges must be an int32 tensor of shape [B,2] (first triangle, count)")
    r = ranges.cpu().long()
    if (r < 0).any() or (r[:, 0] + r[:, 1] > num_tri).any():
        raise RenderError(f"ranges must select triangles inside tri (0..{num_tri - 1}), "
                          f"got {r.tolist()}")
    return r.to(pos.device)


def check_raster_inputs(pos: torch.Tensor, tri: torch.Tensor, resolution, ranges):
    """Validate what :func:`rasterize` (and the depth peeler) draw; returns ``(resolution, ranges)``."""
    _check_float("pos", pos, (2, 3), last=4)
    resolution = _check_resolution(resolution)
    _check_tri(tri, pos.shape[-2], pos.device)
    return resolution, _check_ranges(pos, ranges, tri.shape[0])


def nvdr_raster_args(pos: torch.Tensor, tri: torch.Tensor, resolution, ranges) -> tuple:
    """``(context, pos, tri, resolution, ranges)`` in the types nvdiffrast's rasterizers want."""
    return (nvdr.context(pos.device), pos.contiguous().float(), tri.int().contiguous(), resolution,
            None if ranges is None else ranges.int().cpu())


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution, ranges: torch.Tensor | None = None,
              grad_db: bool = True, backend: str = "auto"):
    """Rasterize triangles; returns ``(rast, rast_db)``.

    Args:
        pos: clip-space positions ``[B,V,4]`` (instanced: every image draws all of ``tri``)
            or ``[V,4]`` with ``ranges`` (range mode).
        tri: ``[T,3]`` int32 vertex indices (int64 accepted).
        resolution: ``(height, width)``.
        ranges: ``[B,2]`` int32 (first triangle, count) per image, range mode only.
        grad_db: also return ``rast_db`` (else its last dimension is 0).
        backend: ``auto``, ``torch`` or ``nvdiffrast``.

    Returns:
        rast ``[B,H,W,4]`` = ``(u, v, z/w, triangle_id + 1)``, 0 where empty; ``triangle_id``
        indexes ``tri`` in both modes. rast_db ``[B,H,W,4]`` = ``(du/dX, du/dY, dv/dX, dv/dY)``
        in pixels. Differentiable in ``pos`` through ``u, v`` and ``rast_db``; the torch
        backend also passes gradients through ``z/w`` (nvdiffrast does not).
    """
    resolution, ranges = check_raster_inputs(pos, tri, resolution, ranges)
    if resolve_backend(backend, pos, tri) == "nvdiffrast":
        return nvdr.module().rasterize(*nvdr_raster_args(pos, tri, resolution, ranges), grad_db=grad_db)
    rast, rast_db, _ = rasterize_torch(pos, tri, resolution, ranges, grad_db)
    return rast, rast_db


def _check_rast(rast: torch.Tensor, tri: torch.Tensor):
    _check_float("rast", rast, (4,), last=4)
    if rast.numel() and int(rast[..., 3].max()) > tri.shape[0]:
        raise RenderError(f"rast names triangle {int(rast[..., 3].max()) - 1} but tri has "
                          f"{tri.shape[0]}; pass the tri that rasterize() drew")


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor,
                rast_db: torch.Tensor | None = None, diff_attrs=None, backend: str = "auto"):
    """Interpolate vertex attributes with the barycentrics in ``rast``.

    Args:
        attr: ``[V,A]``, or ``[B,V,A]`` / ``[1,V,A]`` in instanced mode.
        rast, rast_db: outputs of :func:`rasterize`; ``rast_db`` only with ``diff_attrs``.
        tri: the ``[T,3]`` triangles given to :func:`rasterize`.
        diff_attrs: ``None``, ``"all"`` or a list of attribute indices whose pixel
            derivatives to return.

    Returns:
        ``(out [B,H,W,A], out_da [B,H,W,2*D])``: ``out = u*a0 + v*a1 + (1-u-v)*a2``, zero
        on empty pixels; ``out_da[..., 2k:2k+2] = (d/dX, d/dY)`` of the k-th chosen attribute.
    """
    _check_float("attr", attr, (2, 3))
    _check_tri(tri, attr.shape[-2], attr.device)
    _check_rast(rast, tri)
    if attr.dim() == 3 and attr.shape[0] not in (1, rast.shape[0]):
        raise RenderError(f"attr has batch {attr.shape[0]} but rast has {rast.shape[0]}; "
                          "use one batch entry per image, or 1 to share")
    num_attr = attr.shape[-1]
    if diff_attrs is not None:
        if rast_db is None or rast_db.shape[-1] != 4:
            raise RenderError("diff_attrs needs the rast_db from rasterize(..., grad_db=True)")
        diff_attrs = list(range(num_attr)) if diff_attrs == "all" else [int(i) for i in diff_attrs]
        bad = [i for i in diff_attrs if not -num_attr <= i < num_attr]
        if bad:
            raise RenderError(f"diff_attrs {bad} out of range for {num_attr} attributes")
        diff_attrs = [i % num_attr for i in diff_attrs]
    if resolve_backend(backend, attr, rast) == "nvdiffrast":
        dr = nvdr.module()
        return dr.interpolate(attr.contiguous().float(), rast, tri.int().contiguous(),
                              rast_db=rast_db, diff_attrs=diff_attrs)
    return interpolate_torch(attr, rast, tri, rast_db, diff_attrs)


def texture_construct_mip(tex: torch.Tensor, max_mip_level: int | None = None):
    """Mip stack of ``tex [B,H,W,C]`` to pass as ``texture(..., mip=...)`` when ``tex`` is fixed."""
    _check_float("tex", tex, (4,))
    return build_mip_torch(tex, max_mip_level)


def texture(tex: torch.Tensor, uv: torch.Tensor, uv_da: torch.Tensor | None = None,
            mip_level_bias: torch.Tensor | None = None, mip=None, filter_mode: str = "auto",
            boundary_mode: str = "wrap", max_mip_level: int | None = None, backend: str = "auto"):
    """Sample a 2D texture, nvdiffrast's rules (see :mod:`zoo.render.torch_texture`).

    Args:
        tex: ``[B,H,W,C]`` or ``[1,H,W,C]`` (shared by the batch).
        uv: ``[B,h,w,2]`` texture coordinates; ``u`` along width, ``v`` along rows from row 0.
        uv_da: ``[B,h,w,4]`` = ``(du/dX, du/dY, dv/dX, dv/dY)`` (interpolate's ``out_da``),
            which selects the mip level.
        mip_level_bias: ``[B,h,w]`` added to the level.
        mip: a stack from :func:`texture_construct_mip` (torch backend) to reuse.
        filter_mode: ``auto`` (``linear-mipmap-linear`` when ``uv_da`` or a bias is given,
            else ``linear``), ``nearest``, ``linear``, ``linear-mipmap-nearest``,
            ``linear-mipmap-linear``.
        boundary_mode: ``wrap``, ``clamp`` or ``zero``.
        max_mip_level: deepest mip level to build (``None``: down to 1x1).

    Returns:
        ``[B,h,w,C]``; differentiable in ``tex``, ``uv`` and ``uv_da``.
    """
    _check_float("tex", tex, (4,))
    _check_float("uv", uv, (4,), last=2)
    if tex.shape[0] not in (1, uv.shape[0]):
        raise RenderError(f"tex has batch {tex.shape[0]} but uv has {uv.shape[0]}; use 1 to share")
    if filter_mode not in FILTER_MODES:
        raise RenderError(f"filter_mode must be one of {FILTER_MODES}, not {filter_mode!r}")
    if boundary_mode not in BOUNDARY_MODES:
        raise RenderError(f"boundary_mode must be one of {BOUNDARY_MODES} (cube maps are not "
                          f"supported), not {boundary_mode!r}")
    if filter_mode == "auto":
        filter_mode = "linear-mipmap-linear" if (uv_da is not None or mip_level_bias is not None) \
            else "linear"
    if "mipmap" in filter_mode:
        if uv_da is None and mip_level_bias is None:
            raise RenderError(f"filter_mode={filter_mode!r} needs uv_da (from interpolate with "
                              "diff_attrs) or mip_level_bias to choose the mip level")
        if uv_da is not None:
            _check_float("uv_da", uv_da, (4,), last=4)
    if resolve_backend(backend, tex, uv) == "nvdiffrast":
        dr = nvdr.module()
        # A torch mip stack (a list) does not fit nvdiffrast; it builds its own.
        return dr.texture(tex.contiguous(), uv.contiguous(), uv_da=uv_da,
                          mip_level_bias=mip_level_bias,
                          mip=None if isinstance(mip, list) else mip, filter_mode=filter_mode,
                          boundary_mode=boundary_mode, max_mip_level=max_mip_level)
    return texture_torch(tex, uv, uv_da, mip_level_bias, mip, filter_mode, boundary_mode,
                         max_mip_level)


def antialias_construct_topology_hash(tri: torch.Tensor) -> TopologyHash:
    """Edge adjacency for :func:`antialias` (torch backend); build once for a fixed mesh."""
    if not isinstance(tri, torch.Tensor) or tri.dim() != 2 or tri.shape[1] != 3:
        raise RenderError("tri must be an int tensor of shape [T,3]")
    return construct_topology_hash(tri)


def antialias(color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
              topology_hash=None, pos_gradient_boost: float = 1.0, backend: str = "auto"):
    """Analytic antialiasing of silhouette edges (see :mod:`zoo.render.torch_antialias`).

    Args:
        color: ``[B,H,W,C]`` shaded image. rast: :func:`rasterize`'s output for the same
        geometry. pos, tri: the same as given to :func:`rasterize` (instanced or range mode).
        topology_hash: from :func:`antialias_construct_topology_hash` (torch) or nvdiffrast's
        own, to skip rebuilding the edge table. pos_gradient_boost: multiplies the gradient
        that reaches ``pos``.

    Returns:
        ``[B,H,W,C]``; differentiable in ``color`` and ``pos``.
    """
    _check_float("color", color, (4,))
    _check_float("pos", pos, (2, 3), last=4)
    _check_tri(tri, pos.shape[-2], pos.device)
    _check_rast(rast, tri)
    if color.shape[:3] != rast.shape[:3]:
        raise RenderError(f"color {tuple(color.shape)} and rast {tuple(rast.shape)} must share "
                          "[B,H,W]")
    if pos.dim() == 3 and pos.shape[0] != rast.shape[0]:
        raise RenderError(f"pos has batch {pos.shape[0]} but rast has {rast.shape[0]}; pass the "
                          "pos that rasterize() drew")
    if resolve_backend(backend, color, rast, pos) == "nvdiffrast":
        dr = nvdr.module()
        return dr.antialias(color.contiguous(), rast, pos.contiguous().float(),
                            tri.int().contiguous(), topology_hash=topology_hash,
                            pos_gradient_boost=pos_gradient_boost)
    if not isinstance(topology_hash, TopologyHash) or topology_hash.num_triangles != tri.shape[0]:
        topology_hash = construct_topology_hash(tri)
    return antialias_torch(color, rast, pos, tri, topology_hash, pos_gradient_boost)
