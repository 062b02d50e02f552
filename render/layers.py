"""Multi-layer rendering: depth peeling and front-to-back compositing.

Interpenetrating translucent shells (LSV-GAN's layered surfaces) need every surface along a
pixel's ray, nearest first, not only the nearest one. :class:`DepthPeeler` yields those
layers one rasterization at a time, like nvdiffrast's ``DepthPeeler``; :func:`composite`
blends the shaded layers with the "over" operator.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from zoo.errors import RenderError

from . import nvdiffrast_backend as nvdr
from .ops import check_raster_inputs, nvdr_raster_args, resolve_backend
from .torch_raster import TorchFragments, fragments_torch, resolve_fragments, resolve_torch

__all__ = ["DepthPeeler", "depth_peel", "composite"]


class DepthPeeler:
    """Rasterize the same geometry layer after layer, front to back.

    Layer ``k+1`` holds, per pixel, the nearest fragment strictly behind layer ``k``'s depth
    (``z/w`` compared as float32), so coplanar duplicates and the shared edges of a closed
    mesh do not produce extra layers. A pixel empty in one layer stays empty afterwards.
    Use as a context manager or call :meth:`rasterize_next_layer` directly.
    Arguments are those of :func:`zoo.render.rasterize`.
    """

    def __init__(self, pos: torch.Tensor, tri: torch.Tensor, resolution, ranges=None,
                 grad_db: bool = True, backend: str = "auto"):
        self.resolution, self.ranges = check_raster_inputs(pos, tri, resolution, ranges)
        self.pos, self.tri, self.grad_db = pos, tri, grad_db
        self.backend = resolve_backend(backend, pos, tri)
        self._fragments: TorchFragments | None = None
        self._layer = 0
        self._nv = None
        if self.backend == "nvdiffrast":
            self._nv = nvdr.module().DepthPeeler(*nvdr_raster_args(pos, tri, self.resolution, self.ranges),
                                                 grad_db=grad_db)

    def __enter__(self) -> "DepthPeeler":
        if self._nv is not None:
            self._nv.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._nv is not None:
            self._nv.__exit__(*exc)
        self._fragments = None

    def rasterize_next_layer(self):
        """The next layer's ``(rast, rast_db)``, same format as :func:`zoo.render.rasterize`."""
        if self._nv is not None:
            return self._nv.rasterize_next_layer()
        rast, rast_db = self.rasterize_layers(1)
        return rast[0], rast_db[0]

    def _all_fragments(self) -> TorchFragments:
        if self._fragments is None:
            # One coverage pass sorted into layers (the torch backend's A-buffer), instead of
            # one rasterization per layer; the layers are the same.
            self._fragments = fragments_torch(self.pos, self.tri, self.resolution, self.ranges)
        return self._fragments

    def fragments(self, max_layers: int | None = None):
        """Every fragment at once, torch backend only: ``(rast [M, 4], pixel [M], layer [M])``.

        ``rast`` holds each fragment's ``(u, v, z/w, triangle_id + 1)`` as `rasterize` does
        (differentiable in ``pos``), ``pixel`` its index into ``[B*H*W]`` (image-major, row 0
        at the bottom) and ``layer`` its depth layer, the peel that would return it; sorted by
        pixel, then layer. ``max_layers`` keeps only the nearest that many layers. Unlike
        peeling, nothing is dense: the cost follows the number of fragments."""
        if self._nv is not None:
            raise RenderError("fragments() is a torch-backend feature (nvdiffrast peels layer by layer); "
                              "use rasterize_layers(k) or backend='torch'.")
        return resolve_fragments(self.pos, self.tri, self._all_fragments(), self.resolution, max_layers)

    def rasterize_layers(self, num_layers: int):
        """The next ``num_layers`` layers at once: ``(rast [K,B,H,W,4], rast_db [K,B,H,W,4|0])``,
        the same values as that many :meth:`rasterize_next_layer` calls (layers past the
        deepest surface are all zeros). The torch backend resolves them in one pass."""
        k = int(num_layers)
        if k < 1:
            raise RenderError(f"num_layers must be at least 1, got {num_layers}")
        if self._nv is not None:
            out = [self._nv.rasterize_next_layer() for _ in range(k)]
            return torch.stack([r for r, _ in out]), torch.stack([d for _, d in out])
        batch = self.pos.shape[0] if self.pos.dim() == 3 else self.ranges.shape[0]
        keys = self._all_fragments().layers(self._layer, k)  # [K * B*H*W]: layer-major
        self._layer += k
        # Layer j of image b becomes image j*B + b of one resolve; range mode indexes pos directly.
        pos = self.pos.repeat(k, 1, 1) if self.pos.dim() == 3 else self.pos
        rast, rast_db = resolve_torch(pos, self.tri, keys, k * batch, self.resolution, self.grad_db)
        h, w = self.resolution
        return rast.view(k, batch, h, w, 4), rast_db.view(k, batch, h, w, rast_db.shape[-1])


def depth_peel(pos: torch.Tensor, tri: torch.Tensor, resolution, num_layers: int, ranges=None,
               grad_db: bool = True, backend: str = "auto") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``num_layers`` ``(rast, rast_db)`` pairs, nearest surface first (see DepthPeeler)."""
    if int(num_layers) < 1:
        raise RenderError(f"num_layers must be at least 1, got {num_layers}")
    with DepthPeeler(pos, tri, resolution, ranges, grad_db, backend) as peeler:
        for _ in range(int(num_layers)):
            yield peeler.rasterize_next_layer()


def composite(rgba_layers: Sequence[torch.Tensor] | torch.Tensor, premultiplied: bool = False,
              background: torch.Tensor | None = None) -> torch.Tensor:
    """Front-to-back "over" of ``[..., C+1]`` RGBA layers (alpha last), nearest first.

    With transmittance ``T_0 = 1``, ``T_{k+1} = T_k (1 - a_k)``:
    ``color = sum_k T_k * a_k * c_k`` (straight colours, ``premultiplied=False``) or
    ``sum_k T_k * c_k`` (colours already multiplied by alpha), ``alpha = 1 - T_K``.

    Returns ``[..., C+1]`` with the colour **premultiplied** (composited over black), unless
    ``background`` (broadcastable to ``[..., C]``) is given: then the colour is
    ``color + T_K * background``. Alpha is the total coverage either way.
    Layers may be a list or one tensor stacked on dim 0. Differentiable in every input.
    """
    layers = list(rgba_layers.unbind(0)) if isinstance(rgba_layers, torch.Tensor) else list(rgba_layers)
    if not layers:
        raise RenderError("composite needs at least one RGBA layer")
    shape = layers[0].shape
    if shape[-1] < 2 or any(layer.shape != shape for layer in layers):
        raise RenderError("every layer must have the same shape [..., C+1] with alpha last, got "
                          f"{[tuple(layer.shape) for layer in layers]}")
    trans = torch.ones_like(layers[0][..., -1:])
    color = torch.zeros_like(layers[0][..., :-1])
    for layer in layers:
        rgb, alpha = layer[..., :-1], layer[..., -1:]
        color = color + trans * (rgb if premultiplied else alpha * rgb)
        trans = trans * (1 - alpha)
    if background is not None:
        color = color + trans * background
    return torch.cat([color, 1 - trans], dim=-1)
