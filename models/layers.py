"""Blocks shared by the image families: Conv-BN, residuals, classifier heads, LeViT-style
attention bias tables, each with the ``fuse()`` its deploy form uses.

Folding (``fuse()``) is inference-only: it bakes BatchNorm running statistics into the
conv/linear next to it (`zoo.nn`), so the result computes the eval-mode function with fewer
ops; `zoo.nn.fuse_modules` applies every ``fuse()`` in a tree, children first. The eager-CPU
kernels the deploy forms switch to live in `zoo.models.cpu_kernels`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from zoo.models.cpu_kernels import mul_add
from zoo.nn import bn_scale_shift, fold_identity_into_dwconv, fuse_bn_linear, fuse_conv_bn

__all__ = [
    "ConvNorm",
    "ChannelAffine",
    "NormLinear",
    "Residual",
    "bias_index",
    "resize_bias_tables",
    "timm_converter",
    "densify_bias",
]


class ConvNorm(nn.Sequential):
    """Conv2d followed by BatchNorm2d, and optionally an activation. Keys: ``conv.*``, ``bn.*``
    (timm's ``ConvNorm`` / ``ConvNormAct`` names).

    bias: give the conv a bias (EfficientFormer does; EfficientViT does not).
    bn_weight_init: initial BN gamma; 0 makes a residual branch start as the identity.
    act_layer: activation class applied after the BN (child ``act``), or None.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
        bias: bool = False,
        act_layer: type[nn.Module] | None = None,
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)
        if act_layer is not None:
            self.act = act_layer()

    def fuse(self) -> nn.Module:
        conv = fuse_conv_bn(self.conv, self.bn)
        return nn.Sequential(conv, self.act) if hasattr(self, "act") else conv


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel of ``[B, C, H, W]``: an eval-mode BatchNorm2d with
    nothing to fold into (e.g. after a residual sum), as one op and no running statistics."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.detach().reshape(1, -1, 1, 1).clone())

    @classmethod
    @torch.no_grad()
    def from_bn(cls, bn: nn.BatchNorm2d) -> "ChannelAffine":
        return cls(*bn_scale_shift(bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mul_add(self.shift, x, self.scale)


class NormLinear(nn.Sequential):
    """BatchNorm1d, dropout, Linear: the classifier head. Keys: ``bn.*``, ``linear.*``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02, drop: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        trunc_normal_(self.linear.weight, std=std)
        if bias:
            nn.init.zeros_(self.linear.bias)

    def fuse(self) -> nn.Linear:
        return fuse_bn_linear(self.bn, self.linear)


class Residual(nn.Module):
    """``x + drop_path(m(x))``. Key: ``m.*`` (as the official code and timm name it).

    drop_path: stochastic depth rate, the whole branch dropped per sample in training.
    """

    def __init__(self, m: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.m = m
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.m(x))

    def fuse(self) -> nn.Module:
        if isinstance(self.m, nn.Conv2d):
            folded = fold_identity_into_dwconv(self.m)
            if folded is not None:
                return folded
        return self


def bias_index(resolution: int | tuple[int, int], query_stride: int = 1) -> torch.Tensor:
    """``[Nq, Nk]`` index of each (query, key) pair's absolute offset in a LeViT-style bias table.

    Keys sit on the ``H x W`` grid (``resolution``), queries on every `query_stride`-th point
    of it (EfficientFormerV2's downsampling attention uses 2). The offset ``(|dy|, |dx|)`` is
    numbered ``|dy| * W + |dx|``, so the table has ``H * W`` entries. The official codes number
    offsets in order of first appearance over row-major point pairs; the first query, at the
    origin, meets every offset in exactly this row-major order, so the two agree.
    """
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    k = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    q = torch.stack(
        torch.meshgrid(torch.arange(0, h, query_stride), torch.arange(0, w, query_stride), indexing="ij")
    ).flatten(1)
    off = (q[:, :, None] - k[:, None, :]).abs()
    return off[0] * w + off[1]


def resize_bias_tables(sd: dict, model: nn.Module, antialias: bool) -> dict:
    """Resize the ``*attention_biases`` tables of `sd` whose grid differs from `model`'s.

    A table ``[heads, R*R]`` is a grid over the absolute offsets ``(|dy|, |dx|)`` in row-major
    order (`bias_index`); it is resampled as an ``R x R`` image per head to the model's grid by
    bicubic interpolation with ``align_corners=False`` (`antialias` as the family's reference
    code does). Tables with another number of heads are left for the loader to report.
    """
    target = model.state_dict()
    for k, v in list(sd.items()):
        t = target.get(k)
        if not (k.endswith("attention_biases") and t is not None and v.ndim == 2 and t.ndim == 2):
            continue
        if v.shape == t.shape or v.shape[0] != t.shape[0]:
            continue
        src, dst = round(v.shape[1] ** 0.5), round(t.shape[1] ** 0.5)
        if src * src != v.shape[1] or dst * dst != t.shape[1]:
            continue
        img = v.detach().float().reshape(1, v.shape[0], src, src)
        out = F.interpolate(img, size=(dst, dst), mode="bicubic", align_corners=False, antialias=antialias)
        sd[k] = out.reshape(t.shape).to(v.dtype).contiguous()
    return sd


def timm_converter(antialias: bool):
    """The converter from timm's key layout (which is ours) for a family with LeViT-style bias
    tables: the file's ``attention_bias_idxs`` buffers are dropped (they follow from the grid;
    older timm files saved them) and the model's persistent ones, if any, filled in; tables
    trained at another grid are resized (`resize_bias_tables`, with `antialias` as the family's
    reference code)."""

    def convert(sd: dict, model: nn.Module) -> dict:
        sd = {k: v for k, v in sd.items() if not k.endswith("attention_bias_idxs")}
        sd.update({k: v for k, v in model.state_dict().items() if k.endswith("attention_bias_idxs")})
        return resize_bias_tables(sd, model, antialias=antialias)

    convert.__doc__ = f"timm's layout (ours) -> ours; bias tables resized bicubic, antialias={antialias}."
    return convert


@torch.no_grad()
def densify_bias(module: nn.Module) -> None:
    """Replace ``module.attention_biases[:, module.attention_bias_idxs]`` by a precomputed buffer.

    The table parameter and its index go; ``attention_bias_dense`` (``[heads, Nq, Nk]``) stays,
    so inference does one add instead of a gather per call.
    """
    dense = module.attention_biases[:, module.attention_bias_idxs].detach().clone()
    del module.attention_biases
    if "attention_bias_idxs" in module._buffers:
        del module._buffers["attention_bias_idxs"]
    module.register_buffer("attention_bias_dense", dense)
