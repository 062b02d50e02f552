"""`reparameterize(model)`: the inference form of a model, same outputs, fewer ops."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from zoo.nn import fuse_conv_bn

__all__ = ["reparameterize"]


@torch.no_grad()
def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the deploy form of `model` in eval mode (a copy unless `inplace`).

    A model with its own ``reparameterize()`` method (every zoo image model) uses it. Any
    other model gets the generic fallback: inside each ``nn.Sequential``, a ``Conv2d``
    immediately followed by a ``BatchNorm2d`` of matching width is folded into one conv.
    Only that adjacency is folded, because there the BN provably sees the conv's output and
    nothing else.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if callable(getattr(model, "reparameterize", None)):
        out = model.reparameterize()
        return (out if isinstance(out, nn.Module) else model).eval()
    _fold_sequential_conv_bn(model)
    return model


def _fold_sequential_conv_bn(module: nn.Module) -> None:
    for child in module.children():
        _fold_sequential_conv_bn(child)
    if not isinstance(module, nn.Sequential):
        return
    names = list(module._modules)
    i = 0
    while i < len(names) - 1:
        a, b = module._modules[names[i]], module._modules[names[i + 1]]
        if (
            isinstance(a, nn.Conv2d)
            and isinstance(b, nn.BatchNorm2d)
            and b.num_features == a.out_channels
            and b.affine
            and b.track_running_stats
            and b.running_mean is not None
        ):
            module._modules[names[i]] = fuse_conv_bn(a, b)
            module._modules[names[i + 1]] = nn.Identity()
            i += 2
        else:
            i += 1
