"""OpenPCDet's BaseBEVBackbone: strided 2D conv stages, each upsampled back and concatenated.

Names as OpenPCDet's (``blocks.i``, ``deblocks.i``; BatchNorm2d eps 1e-3, momentum 0.01 unless
`bn_momentum` says otherwise, a zoo addition).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["BaseBEVBackbone"]


def _bn(c: int, momentum: float = 0.01) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=momentum)


class BaseBEVBackbone(nn.Module):
    """In ``spatial_features [B, C, H, W]``; out ``spatial_features_2d [B, sum(up_filters), H', W']``
    where ``H' = H / layer_strides[0] * upsample_strides[0]``."""

    def __init__(self, input_channels: int, layer_nums: Sequence[int], layer_strides: Sequence[int],
                 num_filters: Sequence[int], upsample_strides: Sequence[float], num_upsample_filters: Sequence[int],
                 bn_momentum: float = 0.01):
        super().__init__()
        bn = lambda c: _bn(c, bn_momentum)  # noqa: E731
        if not (len(layer_nums) == len(layer_strides) == len(num_filters) == len(upsample_strides)
                == len(num_upsample_filters)):
            raise ValueError("BaseBEVBackbone: LAYER_NUMS, LAYER_STRIDES, NUM_FILTERS, UPSAMPLE_STRIDES and "
                             "NUM_UPSAMPLE_FILTERS need one entry per level")
        c_in = [input_channels, *num_filters[:-1]]
        self.blocks = nn.ModuleList()
        self.deblocks = nn.ModuleList()
        for i, n in enumerate(layer_nums):
            layers = [nn.ZeroPad2d(1), nn.Conv2d(c_in[i], num_filters[i], 3, stride=layer_strides[i], padding=0, bias=False),
                      bn(num_filters[i]), nn.ReLU()]
            for _ in range(n):
                layers += [nn.Conv2d(num_filters[i], num_filters[i], 3, padding=1, bias=False), bn(num_filters[i]), nn.ReLU()]
            self.blocks.append(nn.Sequential(*layers))
            s = upsample_strides[i]
            if s >= 1:
                s = int(s)
                up = nn.ConvTranspose2d(num_filters[i], num_upsample_filters[i], s, stride=s, bias=False)
            else:
                s = int(round(1 / s))
                up = nn.Conv2d(num_filters[i], num_upsample_filters[i], s, stride=s, bias=False)
            self.deblocks.append(nn.Sequential(up, bn(num_upsample_filters[i]), nn.ReLU()))
        self.num_bev_features = sum(num_upsample_filters)

    def forward(self, batch: dict) -> dict:
        x = batch["spatial_features"]
        ups = []
        for block, deblock in zip(self.blocks, self.deblocks):
            x = block(x)
            ups.append(deblock(x))
        batch["spatial_features_2d"] = torch.cat(ups, dim=1) if len(ups) > 1 else ups[0]
        return batch
