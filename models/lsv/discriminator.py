"""The LSV-GAN discriminator: StyleGAN2's residual discriminator (Karras et al., arXiv 1912.04958),
conditioned on the camera and the pose by projection (Miyato and Koyama, arXiv 1802.05637, as
StyleGAN2-ADA and EG3D condition theirs), written from the papers in plain PyTorch.

Layout, as the paper's "resnet" discriminator: a 1x1 ``from_rgb`` at the input resolution, then
one block per halving, each two 3x3 convolutions (the second downsampling: the ``[1, 3, 3, 1]``
low-pass filter, then stride 2) beside a 1x1 downsampling skip without bias, the two summed and
scaled by ``sqrt(0.5)``; at 4x4 the epilogue: minibatch standard deviation (groups of
``mbstd_group`` samples, ``mbstd_channels`` extra channels), a 3x3 convolution, a fully
connected layer over the 4x4 map, and the output layer. Every layer has an equalised learning
rate; activations are leaky ReLU (0.2) with gain sqrt 2. Channels at resolution ``r`` are
``min(channel_base / r, channel_max)``.

Conditioning: the label ``c [B, c_dim]`` (the camera's 16 extrinsics and 9 intrinsics, the
pose's 72 axis-angles and the 10 shape values: 107 in all) goes through a small mapping network
to ``cmap [B, cmap_dim]``; the output is ``(out(x) * cmap).sum(1) / sqrt(cmap_dim)`` with
``out(x) [B, cmap_dim]``. With ``c_dim = 0`` the output layer has one unit.

Choices of this project (config): ``mapping_layers`` (StyleGAN2-ADA uses 8; the small model
fewer), the input channels (3: RGB over the data's background; 4 adds the alpha).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.models.lsv.generator import FullyConnected, _blur, _lowpass

__all__ = ["DiscriminatorConfig", "Discriminator", "LABEL_DIM"]

_GAIN = math.sqrt(2)
LABEL_DIM = 16 + 9 + 72 + 10  # c2w, intrinsics, pose, betas


@dataclass(frozen=True)
class DiscriminatorConfig:
    resolution: int = 256
    in_channels: int = 3
    c_dim: int = LABEL_DIM
    channel_base: int = 16384
    channel_max: int = 512
    cmap_dim: int | None = None  # default: the channels at 4x4
    mapping_layers: int = 8
    mbstd_group: int = 4
    mbstd_channels: int = 1
    conv_clamp: float | None = 256.0

    def check(self) -> "DiscriminatorConfig":
        r = self.resolution
        if r < 8 or r & (r - 1):
            raise ConfigError(f"the discriminator's resolution must be a power of two of at least 8, not {r}")
        return self

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)


class Conv2d(nn.Module):
    """Equalised-learning-rate convolution; ``down``: low-pass filter then stride 2."""

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool = True, activation: bool = True,
                 down: bool = False, conv_clamp: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.weight_gain = 1 / math.sqrt(cin * kernel * kernel)
        self.activation, self.down, self.kernel, self.conv_clamp = activation, down, kernel, conv_clamp
        self.register_buffer("filter", _lowpass(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_gain
        if self.down:
            # filter, then a strided convolution: StyleGAN2's downsampling convolution
            p = (self.kernel + 1) // 2  # so that the output is exactly half the input
            x = F.conv2d(_blur(x, self.filter / 4, (p, p, p, p)), w, stride=2)
        else:
            x = F.conv2d(x, w, padding=self.kernel // 2)
        if self.bias is not None:
            x = x + self.bias[None, :, None, None]
        if self.activation:
            x = F.leaky_relu(x, 0.2) * _GAIN
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return x


class DiscriminatorBlock(nn.Module):
    """Two 3x3 convolutions (the second halves the size) plus a 1x1 downsampling skip."""

    def __init__(self, cin: int, cout: int, conv_clamp: float | None):
        super().__init__()
        self.conv0 = Conv2d(cin, cin, 3, conv_clamp=conv_clamp)
        self.conv1 = Conv2d(cin, cout, 3, down=True, conv_clamp=conv_clamp)
        self.skip = Conv2d(cin, cout, 1, bias=False, activation=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


def minibatch_std(x: torch.Tensor, group: int, channels: int) -> torch.Tensor:
    """Append ``channels`` maps of the within-group standard deviation ``[B, C + channels, H, W]``
    (groups of ``min(group, B)`` samples, as StyleGAN2; ``B`` must divide into them)."""
    b, c, h, w = x.shape
    g = min(group, b)
    if b % g:
        raise ConfigError(f"a batch of {b} does not split into minibatch-std groups of {g}")
    y = x.reshape(g, -1, channels, c // channels, h, w)
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()  # [B/g, F, C/F, H, W]
    y = y.mean(dim=(2, 3, 4))[:, :, None, None]  # [B/g, F, 1, 1]
    y = y.repeat(g, 1, h, w)
    return torch.cat([x, y], 1)


class Discriminator(nn.Module):
    """``D(images [B, in_channels, R, R] in [0, 1], c [B, c_dim]) -> logits [B]`` (module docstring).
    Images are mapped to ``[-1, 1]`` inside."""

    def __init__(self, cfg: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        self.config = cfg = cfg.check()
        log2 = int(math.log2(cfg.resolution))
        res = [2 ** i for i in range(log2, 2, -1)]  # input resolution down to 8
        self.from_rgb = Conv2d(cfg.in_channels, cfg.channels(res[0]), 1, conv_clamp=cfg.conv_clamp)
        self.blocks = nn.ModuleList(DiscriminatorBlock(cfg.channels(r), cfg.channels(r // 2), cfg.conv_clamp)
                                    for r in res)
        c4 = cfg.channels(4)
        self.cmap_dim = (cfg.cmap_dim or c4) if cfg.c_dim else 0
        if cfg.c_dim:
            dims = [cfg.c_dim] + [self.cmap_dim] * cfg.mapping_layers
            self.mapping = nn.Sequential(*[FullyConnected(a, b, activation=True) for a, b in zip(dims[:-1], dims[1:])])
        self.conv = Conv2d(c4 + cfg.mbstd_channels, c4, 3, conv_clamp=cfg.conv_clamp)
        self.fc = FullyConnected(c4 * 16, c4, activation=True)
        self.out = FullyConnected(c4, self.cmap_dim or 1)

    def forward(self, images: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if images.dim() != 4 or images.shape[1:] != (cfg.in_channels, cfg.resolution, cfg.resolution):
            raise ConfigError(f"the discriminator takes [B, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}] "
                              f"images, not {tuple(images.shape)}")
        x = self.from_rgb(images * 2 - 1)
        for block in self.blocks:
            x = block(x)
        if cfg.mbstd_channels:
            x = minibatch_std(x, cfg.mbstd_group, cfg.mbstd_channels)
        x = self.fc(self.conv(x).flatten(1))
        x = self.out(x)
        if not self.cmap_dim:
            return x[:, 0]
        if c is None or c.shape != (images.shape[0], cfg.c_dim):
            raise ConfigError(f"the discriminator is conditioned on labels [B, {cfg.c_dim}]; got "
                              f"{None if c is None else tuple(c.shape)}")
        cmap = self.mapping(c.to(x.dtype))
        return (x * cmap).sum(1) / math.sqrt(self.cmap_dim)
