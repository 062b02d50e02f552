"""Rendering textured shells: depth peeling, per-layer RGBA lookup, front-to-back compositing,
antialiasing. Built on `zoo.render` (the torch backend on CPU, nvdiffrast on CUDA).

Conventions:

- ``shells [B, N, V, 3]`` world positions (N layers sharing ``faces [F, 3]``), ``uv [Vt, 2]`` and
  ``uv_faces [F, 3]`` (face ``f`` reads its texture coordinates through ``uv_faces[f]``; ``uv =
  (0, 0)`` at texel row 0, column 0's outer corner, `zoo.render`'s rule).
- ``textures [B, N, 4, T, T]``: straight (not premultiplied) RGBA per layer, colour and alpha in
  ``[0, 1]``.
- ``mvp [B, C, 4, 4]``: C cameras per sample, world to OpenGL clip space (`zoo.render.camera`).
- Output ``[B, C, H, W, 4]``: colour and coverage alpha, **row 0 at the top** (saved as is).
  Without ``background`` the colour is premultiplied (composited over black); with one it is
  ``colour + (1 - alpha) * background``.

Every surface along a pixel's ray is a fragment: the front and back of each shell, and of each
part where parts overlap (up to 24 per pixel on the mannequin's five shells seen from the front,
50 from the side). On the torch backend every fragment is composited (``num_layers=None``, the
default): one coverage pass yields them all (`zoo.render.DepthPeeler.fragments`), and only
covered pixels are laid out, one row of depth layers each, so the cost follows the fragment
count. ``num_layers=K`` keeps the nearest K. nvdiffrast peels layer by layer, K of them
(default ``4 N``, which reaches the body surface behind one crossing limb: a ray through a limb
crosses ``2 N`` of its fragments first).
The lookup is bilinear with clamped edges
in the fragment's own layer texture: written here because `zoo.render.texture` samples one
texture per image, while here the layer changes from pixel to pixel (no mip-mapping, a choice:
textures are about as dense as the pixels). Antialiasing (`zoo.render.antialias`, on by default)
runs once on the composite against the nearest layer's silhouettes, which is what carries
gradients to the outline of the body.
"""
from __future__ import annotations

import torch

from zoo.errors import RenderError
from zoo.render import DepthPeeler, antialias as aa_edges, composite, look_at, perspective, transform

__all__ = ["render_shells", "layer_triangles", "sample_layer_textures", "orbit_cameras", "opencv_to_clip",
           "orbit_opencv"]


def layer_triangles(faces: torch.Tensor, num_layers: int, num_vertices: int) -> torch.Tensor:
    """All layers' triangles ``[N F, 3]`` int32 into the layers' stacked vertices ``[N V]``."""
    offsets = num_vertices * torch.arange(num_layers, device=faces.device)
    return (faces[None].long() + offsets[:, None, None]).reshape(-1, 3).int()


def sample_layer_textures(textures: torch.Tensor, image_sample: torch.Tensor, layer: torch.Tensor,
                          uv: torch.Tensor) -> torch.Tensor:
    """Bilinear RGBA lookups ``[P, 4]``, clamped at the edges.

    ``textures [B, N, 4, T, T]``; per lookup ``p``: its sample ``image_sample [P]``, its layer
    ``layer [P]`` and its coordinates ``uv [P, 2]``. Differentiable in textures and uv."""
    b, n, c, t, t2 = textures.shape
    flat = textures.permute(0, 1, 3, 4, 2).reshape(-1, c)  # [B N T T, 4]
    base = (image_sample * n + layer) * (t * t2)
    x = uv[:, 0] * t2 - 0.5
    y = uv[:, 1] * t - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    xs = (x0.clamp(0, t2 - 1), (x0 + 1).clamp(0, t2 - 1))
    ys = (y0.clamp(0, t - 1), (y0 + 1).clamp(0, t - 1))

    def at(yi, xi):
        return flat.index_select(0, base + yi * t2 + xi)

    top = at(ys[0], xs[0]) * (1 - fx) + at(ys[0], xs[1]) * fx
    bottom = at(ys[1], xs[0]) * (1 - fx) + at(ys[1], xs[1]) * fx
    return top * (1 - fy) + bottom * fy


def _check(shells, faces, uv, uv_faces, textures, mvp):
    if shells.dim() != 4 or shells.shape[-1] != 3:
        raise RenderError(f"shells must be [B, N, V, 3], not {tuple(shells.shape)}")
    b, n = shells.shape[:2]
    if textures.dim() != 5 or tuple(textures.shape[:3]) != (b, n, 4):
        raise RenderError(f"textures must be [B, N, 4, T, T] = [{b}, {n}, 4, T, T] for these shells, "
                          f"not {tuple(textures.shape)}")
    if mvp.dim() != 4 or mvp.shape[0] != b or tuple(mvp.shape[2:]) != (4, 4):
        raise RenderError(f"mvp must be [B, C, 4, 4] with B = {b}, not {tuple(mvp.shape)}")
    if uv_faces.shape != faces.shape or uv.dim() != 2 or uv.shape[1] != 2:
        raise RenderError(f"uv must be [Vt, 2] and uv_faces match faces {tuple(faces.shape)}; got "
                          f"{tuple(uv.shape)} and {tuple(uv_faces.shape)}")


def render_shells(shells: torch.Tensor, faces: torch.Tensor, uv: torch.Tensor, uv_faces: torch.Tensor,
                  textures: torch.Tensor, mvp: torch.Tensor, resolution, num_layers: int | None = None,
                  background: torch.Tensor | None = None, antialias: bool = True, backend: str = "auto",
                  topology_hash=None) -> torch.Tensor:
    """Render textured shells to ``[B, C, H, W, 4]`` (see the module docstring for every convention).

    Differentiable in ``shells`` (hence in the pose that made them), ``textures`` and ``mvp``.
    ``topology_hash``: `zoo.render.antialias_construct_topology_hash` of `layer_triangles`, to
    skip rebuilding it when the mesh is fixed.
    """
    _check(shells, faces, uv, uv_faces, textures, mvp)
    b, n, v, _ = shells.shape
    c = mvp.shape[1]
    h, w = (int(r) for r in resolution)
    if num_layers is not None and int(num_layers) < 1:
        raise RenderError(f"num_layers must be at least 1, got {num_layers}")
    f = faces.shape[0]
    tri = layer_triangles(faces, n, v)
    uv_tri = uv_faces.long().repeat(n, 1)
    pos = transform(shells.reshape(b, 1, n * v, 3), mvp).reshape(b * c, n * v, 4)
    with DepthPeeler(pos, tri, (h, w), grad_db=False, backend=backend) as peeler:
        if peeler.backend == "torch":
            frag, pix, rank = peeler.fragments(num_layers)
            first, _ = peeler.rasterize_next_layer()
        else:
            k = 4 * n if num_layers is None else int(num_layers)
            rast, _ = peeler.rasterize_layers(k)  # [K, B C, H, W, 4]
            first = rast[0]
            flat = rast.reshape(k, -1, 4)
            rank, pix = (flat[..., 3] > 0).nonzero().unbind(1)
            frag = flat[rank, pix]
    tid = frag[:, 3].long() - 1  # float ids are exact below 2^24 triangles
    bary = frag[:, :2]
    corners = uv[uv_tri[tid]]  # [M, 3, 2]
    uv_frag = bary[:, :1] * corners[:, 0] + bary[:, 1:] * corners[:, 1] + (1 - bary.sum(1, keepdim=True)) * corners[:, 2]
    rgba = sample_layer_textures(textures, pix // (h * w) // c, tid // f, uv_frag)
    out = _composite_fragments(rgba, pix, rank, b * c * h * w, background).reshape(b * c, h, w, 4)
    if antialias:
        out = aa_edges(out.contiguous(), first, pos, tri, topology_hash=topology_hash, backend=backend)
    return out.flip(1).reshape(b, c, h, w, 4)


def _composite_fragments(rgba: torch.Tensor, pix: torch.Tensor, rank: torch.Tensor, num_pixels: int,
                         background: torch.Tensor | None) -> torch.Tensor:
    """`zoo.render.composite` of straight-alpha fragments ``rgba [M, 4]`` at pixels ``pix [M]`` with
    depth layers ``rank [M]``: ``[num_pixels, 4]``. Only covered pixels are laid out, one row of
    depth layers each (empty layers are transparent)."""
    covered, row = torch.unique(pix, return_inverse=True)
    depth = int(rank.max()) + 1 if rank.numel() else 1
    grid = torch.zeros(depth, len(covered), 4, dtype=rgba.dtype, device=rgba.device).index_put((rank, row), rgba)
    empty = torch.zeros(4, dtype=rgba.dtype, device=rgba.device)
    if background is not None:
        empty[:3] = background
    return empty.expand(num_pixels, 4).index_put((covered,), composite(grid, background=background))


def orbit_cameras(num_views: int, distance: float = 2.6, elevation: float = 0.0, fov: float = 40.0,
                  target=(0.0, 0.9, 0.0), start: float = 0.0, near: float = 0.1, far: float = 10.0,
                  dtype=torch.float32) -> torch.Tensor:
    """``num_views`` cameras ``[C, 4, 4]`` (world to clip) evenly around the vertical axis through
    ``target``, ``distance`` away, ``elevation`` degrees up, the first at azimuth ``start``
    degrees (0 looks at the body's front, from ``+z``); ``fov`` is vertical, in degrees."""
    if num_views < 1:
        raise RenderError(f"num_views must be at least 1, got {num_views}")
    az = torch.deg2rad(torch.tensor(start, dtype=torch.float64) + torch.arange(num_views) * 360.0 / num_views)
    el = torch.deg2rad(torch.tensor(float(elevation), dtype=torch.float64))
    tgt = torch.tensor(target, dtype=torch.float64)
    eye = tgt + distance * torch.stack([torch.sin(az) * torch.cos(el), torch.sin(el).expand_as(az),
                                        torch.cos(az) * torch.cos(el)], -1)
    view = look_at(eye, tgt.expand_as(eye), dtype=torch.float64)
    return (perspective(fov, 1.0, near, far, dtype=torch.float64) @ view).to(dtype)


# OpenCV's camera axes (x right, y down, z forward) against OpenGL's eye axes (x right, y up, z back)
_CV_TO_GL = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def opencv_to_clip(c2w: torch.Tensor, intrinsics: torch.Tensor, near: float = 0.1, far: float = 10.0) -> torch.Tensor:
    """World-to-clip ``[..., 4, 4]`` (this renderer's OpenGL convention) for EG3D-style cameras:
    ``c2w [..., 4, 4]`` camera-to-world in OpenCV's axes and ``intrinsics [..., 3, 3]`` normalised
    by the image size (principal point from the top-left, ``y`` down). The image this renders has
    row 0 at the top, where OpenCV's ``v = 0`` is."""
    dtype = c2w.dtype
    c2w, k = c2w.double(), intrinsics.double()
    w2c = torch.linalg.inv(c2w)
    eye = _CV_TO_GL.to(c2w.device) @ w2c
    fx, fy, cx, cy, skew = k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2], k[..., 0, 1]
    proj = torch.zeros(*k.shape[:-2], 4, 4, dtype=torch.float64, device=k.device)
    # x_ndc = 2u - 1 and y_ndc = 1 - 2v with u = (fx X + s Y) / Z + cx, v = fy Y / Z + cy in OpenCV's
    # camera (X, Y, Z) = (x, -y, -z) of the eye space, and w = -z
    proj[..., 0, 0], proj[..., 0, 1], proj[..., 0, 2] = 2 * fx, -2 * skew, 1 - 2 * cx
    proj[..., 1, 1], proj[..., 1, 2] = 2 * fy, 2 * cy - 1
    proj[..., 2, 2], proj[..., 2, 3] = (far + near) / (near - far), 2 * far * near / (near - far)
    proj[..., 3, 2] = -1.0
    return (proj @ eye).to(dtype)


def orbit_opencv(azimuth: torch.Tensor, elevation: torch.Tensor, distance: float, fov: float,
                 target=(0.0, 0.9, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """EG3D-style cameras looking at ``target`` from ``azimuth``/``elevation`` (radians, ``[M]``;
    azimuth 0 looks at the body's front from ``+z``): ``c2w [M, 4, 4]`` (OpenCV axes) and
    normalised ``K [M, 3, 3]`` for a vertical field of view ``fov`` degrees."""
    az, el = azimuth.double(), elevation.double()
    tgt = torch.tensor(target, dtype=torch.float64)
    eye = tgt + distance * torch.stack([torch.sin(az) * torch.cos(el), torch.sin(el), torch.cos(az) * torch.cos(el)], -1)
    w2c_gl = look_at(eye, tgt.expand_as(eye), dtype=torch.float64)
    c2w = torch.linalg.inv(_CV_TO_GL @ w2c_gl)
    f = 0.5 / torch.tan(torch.deg2rad(torch.tensor(fov / 2, dtype=torch.float64)))
    k = torch.tensor([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]], dtype=torch.float64).expand(len(az), 3, 3).clone()
    return c2w.float(), k.float()
