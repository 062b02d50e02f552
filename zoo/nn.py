"""Family-neutral folding for inference, shared by the model families and `zoo.export`.

Folding bakes eval-mode BatchNorm statistics (or a per-channel scale) into the conv or
linear layer next to it, so the result computes the eval-mode function with fewer ops.
`fuse_modules` applies every ``fuse()`` method in a module tree, children first, which lets a
parent fold what its children became (a residual around a depthwise conv folds the identity
into the kernel's centre tap). Nothing here knows about any model family.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    "bn_scale_shift",
    "fuse_conv_bn",
    "fuse_bn_linear",
    "fold_identity_into_dwconv",
    "fold_scale_into_out_channels",
    "fuse_modules",
]


@torch.no_grad()
def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) == x * scale + shift`` per channel in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A Conv2d computing ``bn(conv(x))`` with eval-mode BN statistics."""
    scale, bias = bn_scale_shift(bn)
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    fused.bias.copy_(bias)
    return fused


@torch.no_grad()
def fuse_bn_linear(bn: nn.BatchNorm1d, linear: nn.Linear) -> nn.Linear:
    """A Linear computing ``linear(bn(x))`` with eval-mode BN statistics."""
    scale, shift = bn_scale_shift(bn)
    fused = nn.Linear(linear.in_features, linear.out_features, bias=True,
                      device=linear.weight.device, dtype=linear.weight.dtype)
    fused.weight.copy_(linear.weight * scale[None, :])
    bias = linear.weight @ shift
    if linear.bias is not None:
        bias = bias + linear.bias
    fused.bias.copy_(bias)
    return fused


@torch.no_grad()
def fold_identity_into_dwconv(conv: nn.Conv2d) -> nn.Conv2d | None:
    """``x + conv(x)`` as one conv, for a stride-1 depthwise conv with 'same' padding; else None."""
    k = conv.kernel_size
    if not (
        conv.groups == conv.in_channels == conv.out_channels
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and k[0] % 2 == 1
        and k[1] % 2 == 1
        and conv.padding == (k[0] // 2, k[1] // 2)
        and conv.padding_mode == "zeros"
    ):
        return None
    conv.weight[:, 0, k[0] // 2, k[1] // 2] += 1.0
    return conv


@torch.no_grad()
def fold_scale_into_out_channels(layer: nn.Module, scale: torch.Tensor) -> None:
    """Make a Conv2d/Linear compute ``scale * layer(x)`` (``scale`` per output channel), in place.

    Used to absorb a layer scale (or the attention scale) that follows a fused projection.
    """
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(scale.reshape(shape))
    if layer.bias is not None:
        layer.bias.mul_(scale.reshape(-1))


def fuse_modules(module: nn.Module) -> nn.Module:
    """Replace, children first, every submodule that has ``fuse()`` by what it returns."""
    for name, child in list(module.named_children()):
        fuse_modules(child)
        if hasattr(child, "fuse"):
            setattr(module, name, child.fuse())
    return module
