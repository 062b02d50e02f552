"""Weight inheritance: a slimmed network's weights sliced from the full network it came from.

A slimmed architecture keeps, per stage, some of the full network's blocks (``blocks[i]``,
their indices in the full network, in order) at a width and head count no larger than the
full one's. Its block ``k`` of stage ``i`` takes the weights of the full network's block
``blocks[i][k]``, and every tensor takes the leading slice of its source (the first channels,
heads, hidden units): the rule of slimmable networks and of the EfficientFormer supernet's
`extract`.

One case grows a tensor: EfficientViT with fewer heads at the same width gives each head more
channels (``width / heads``). There the overlapping leading block is inherited and the rest
keeps the slimmed network's own initialisation. Where per-head channel groups change size,
leading slices do not keep each head's channel group either, so for those actions the
inherited network is a starting point for BatchNorm re-estimation and fine-tuning, not the
full network's function restricted.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from zoo.errors import DataError

__all__ = ["inherit_state"]

_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$")


def inherit_state(full: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                  blocks: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """For every key of `target` (the slimmed network's state dict: names and shapes), the
    leading slice of `full`'s tensor at that key, with ``stages.i.blocks.k.`` read from
    ``stages.i.blocks.{blocks[i][k]}.`` (module docstring). Where the target is larger in a
    dimension, the overlap is inherited and the rest is the target's own value."""
    out = {}
    for key, t in target.items():
        src = key
        m = _BLOCK.match(key)
        if m:
            i, k = int(m.group(1)), int(m.group(2))
            src = f"stages.{i}.blocks.{blocks[i][k]}.{m.group(3)}"
        if src not in full:
            raise DataError(f"cannot inherit {key}: the full network has no {src} (is it the search space's full network?)")
        v = full[src]
        if v.dim() != t.dim():
            raise DataError(f"cannot inherit {key} {tuple(t.shape)} from {src} {tuple(v.shape)}: not the same kind of "
                            "tensor (is it the search space's full network?)")
        overlap = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, v.shape))
        if all(a <= b for a, b in zip(t.shape, v.shape)):
            out[key] = v[overlap].clone()
        else:
            out[key] = t.detach().clone()
            out[key][overlap] = v[overlap]
    return out
