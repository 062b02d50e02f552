"""The RGBA texture generator: a StyleGAN2-style mapping network and modulated-convolution
synthesis network (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN",
arXiv 1912.04958), written from the paper in plain PyTorch (no custom CUDA ops), producing one
RGBA texture per shell layer.

What follows the paper: the latent is normalised by its second moment; the mapping is a stack
of fully connected layers with equalised learning rate and a 0.01 learning-rate multiplier; a
running mean ``w_avg`` of ``w`` gives truncation ``w_avg + psi (w - w_avg)`` on the first
``truncation_cutoff`` styles, and style mixing swaps in a second latent's styles from a random
layer on (``style_mixing``). Synthesis starts from a learned 4x4 constant; each resolution
doubles with a modulated 3x3 convolution that upsamples (transposed convolution, then the
``[1, 3, 3, 1]`` low-pass filter), a second modulated convolution, per-pixel noise with a learned
strength, a bias and a leaky ReLU (slope 0.2, gain sqrt 2); the output is the sum of each
resolution's unmodulated-by-demodulation 1x1 "toRGB" outputs, upsampled by the same filter
(StyleGAN2's skip generator). Weight demodulation divides each output channel by the norm of its
style-scaled weights.

The modulated convolution has two equal forms (`ModulatedConv2d`): ``fused`` (per-sample
weights as one grouped convolution) and the non-fused (scale the input by the style, convolve
with the shared weight, scale the output by the demodulation coefficients), which exports to
ONNX and CoreML with static weights.

Choices of this project, each config: the output has ``4 * num_layers`` channels read as
``[B, N, 4, T, T]`` RGBA and squashed by a sigmoid into ``[0, 1]`` (StyleGAN's output is
unbounded); ``noise_mode`` is ``random`` while training and ``const`` (fixed buffers) otherwise,
so a seed always gives the same textures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ConfigError

__all__ = ["GeneratorConfig", "TextureGenerator", "MappingNetwork", "SynthesisNetwork", "ModulatedConv2d",
           "upsample2d"]

_LRELU_GAIN = math.sqrt(2)


@dataclass(frozen=True)
class GeneratorConfig:
    num_layers: int = 5  # shells, each an RGBA texture
    resolution: int = 256  # texture size, a power of two >= 8
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    channel_base: int = 16384
    channel_max: int = 512
    w_avg_beta: float = 0.995
    conv_clamp: float | None = 256.0
    fused_modconv: bool = True

    def check(self) -> "GeneratorConfig":
        r = self.resolution
        if r < 8 or r & (r - 1):
            raise ConfigError(f"the texture size must be a power of two of at least 8, not {r}")
        if self.num_layers < 1 or self.z_dim < 1 or self.w_dim < 1 or self.mapping_layers < 1:
            raise ConfigError("num_layers, z_dim, w_dim and mapping_layers must be positive")
        return self

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)


def _lowpass(device=None, dtype=torch.float32) -> torch.Tensor:
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device, dtype=dtype)
    f = f[:, None] * f[None, :]
    return f / f.sum()


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Double ``x [B, C, H, W]``: zeros between samples, then the FIR ``f [4, 4]`` at gain 4
    (StyleGAN2's ``upfirdn2d`` with ``up=2``). Written as one depthwise transposed convolution at
    stride 2 (equal for a symmetric filter), which keeps every tensor at rank 4 for CoreML."""
    c = x.shape[1]
    return F.conv_transpose2d(x, (f * 4).to(x.dtype)[None, None].expand(c, 1, 4, 4), stride=2, padding=1, groups=c)


def _blur(x: torch.Tensor, f: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    c = x.shape[1]
    return F.conv2d(F.pad(x, pad), (f * 4).to(x.dtype)[None, None].expand(c, 1, 4, 4), groups=c)


class FullyConnected(nn.Module):
    """Equalised-learning-rate linear layer (weights stored ``/ lr_multiplier``, scaled at run time)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_multiplier: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, 0.2) * _LRELU_GAIN if self.activation else x


class MappingNetwork(nn.Module):
    """``z [B, z_dim]`` -> ``w [B, num_ws, w_dim]`` (one ``w`` broadcast to every style)."""

    def __init__(self, cfg: GeneratorConfig, num_ws: int):
        super().__init__()
        self.num_ws, self.w_avg_beta = num_ws, cfg.w_avg_beta
        dims = [cfg.z_dim] + [cfg.w_dim] * cfg.mapping_layers
        self.layers = nn.ModuleList(FullyConnected(a, b, lr_multiplier=cfg.mapping_lr_multiplier, activation=True)
                                    for a, b in zip(dims[:-1], dims[1:]))
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: torch.Tensor, psi: float = 1.0, truncation_cutoff: int | None = None,
                update_w_avg: bool = False) -> torch.Tensor:
        x = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        for layer in self.layers:
            x = layer(x)
        if update_w_avg:
            self.w_avg.copy_(x.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        ws = x[:, None].repeat(1, self.num_ws, 1)
        if psi != 1:
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cut] = self.w_avg.lerp(ws[:, :cut], psi)
        return ws


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution (see the module docstring), optionally upsampling by 2."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel: int, demodulate: bool = True,
                 up: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.demodulate, self.up, self.padding = demodulate, up, kernel // 2
        self.register_buffer("filter", _lowpass())

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool = True) -> torch.Tensor:
        b, c_in, h, wd = x.shape
        styles = self.affine(w) * self.weight_gain  # [B, C_in]
        weight = self.weight  # [C_out, C_in, k, k]
        dcoefs = None
        if self.demodulate:
            dcoefs = ((weight[None] * styles[:, None, :, None, None]).square().sum((2, 3, 4)) + 1e-8).rsqrt()
        if fused:
            wt = weight[None] * styles[:, None, :, None, None]
            if dcoefs is not None:
                wt = wt * dcoefs[:, :, None, None, None]
            c_out = wt.shape[1]
            xg = x.reshape(1, b * c_in, h, wd)
            if self.up:
                wt = wt.transpose(1, 2).reshape(b * c_in, c_out, *wt.shape[3:])
                y = F.conv_transpose2d(xg, wt, stride=2, groups=b)
            else:
                y = F.conv2d(xg, wt.reshape(b * c_out, c_in, *wt.shape[3:]), padding=self.padding, groups=b)
            y = y.reshape(b, c_out, *y.shape[2:])
        else:
            xs = x * styles[:, :, None, None]
            y = F.conv_transpose2d(xs, weight.transpose(0, 1), stride=2) if self.up else \
                F.conv2d(xs, weight, padding=self.padding)
            if dcoefs is not None:
                y = y * dcoefs[:, :, None, None]
        if self.up:  # a 3x3 transposed convolution at stride 2 gives 2H+1; the filter trims to 2H
            y = _blur(y, self.filter, (1, 1, 1, 1))
        return y


class SynthesisLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool,
                 conv_clamp: float | None):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, w_dim, 3, up=up)
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.resolution, self.conv_clamp = resolution, conv_clamp

    def forward(self, x, w, noise_mode: str, fused: bool):
        x = self.conv(x, w, fused)
        if noise_mode == "random":
            x = x + torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device,
                                dtype=x.dtype) * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        x = F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * _LRELU_GAIN
        return x if self.conv_clamp is None else x.clamp(-self.conv_clamp, self.conv_clamp)


class ToRGBA(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, w_dim, 1, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.conv_clamp = conv_clamp

    def forward(self, x, w, fused: bool):
        x = self.conv(x, w, fused) + self.bias[None, :, None, None]
        return x if self.conv_clamp is None else x.clamp(-self.conv_clamp, self.conv_clamp)


class SynthesisBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: GeneratorConfig, resolution: int, img_channels: int):
        super().__init__()
        self.first = in_channels == 0
        if self.first:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, cfg.w_dim, resolution, True, cfg.conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, cfg.w_dim, resolution, False, cfg.conv_clamp)
        self.torgb = ToRGBA(out_channels, img_channels, cfg.w_dim, cfg.conv_clamp)
        self.num_conv = 1 if self.first else 2
        self.register_buffer("filter", _lowpass())

    def forward(self, x, img, ws, noise_mode: str, fused: bool):
        i = 0
        if self.first:
            x = self.const[None].repeat(ws.shape[0], 1, 1, 1)  # a copy: a view of a parameter confuses flop counting
        else:
            x = self.conv0(x, ws[:, 0], noise_mode, fused)
            i = 1
        x = self.conv1(x, ws[:, i], noise_mode, fused)
        y = self.torgb(x, ws[:, i + 1], fused)
        img = y if img is None else upsample2d(img, self.filter) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """``ws [B, num_ws, w_dim]`` -> ``[B, 4 N, T, T]`` pre-activation RGBA."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.resolutions = [2 ** i for i in range(2, int(math.log2(cfg.resolution)) + 1)]
        blocks, prev = [], 0
        for res in self.resolutions:
            ch = cfg.channels(res)
            blocks.append(SynthesisBlock(prev, ch, cfg, res, 4 * cfg.num_layers))
            prev = ch
        self.blocks = nn.ModuleList(blocks)
        self.num_ws = sum(b.num_conv for b in blocks) + 1

    def forward(self, ws, noise_mode: str = "const", fused: bool = True):
        x = img = None
        i = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, i:i + block.num_conv + 1], noise_mode, fused)
            i += block.num_conv
        return img


class TextureGenerator(nn.Module):
    """``z [B, z_dim]`` -> RGBA textures ``[B, N, 4, T, T]`` in ``[0, 1]`` (module docstring)."""

    def __init__(self, cfg: GeneratorConfig = GeneratorConfig()):
        super().__init__()
        self.config = cfg.check()
        self.synthesis = SynthesisNetwork(cfg)
        self.mapping = MappingNetwork(cfg, self.synthesis.num_ws)

    @property
    def num_ws(self) -> int:
        return self.synthesis.num_ws

    def style_mixing(self, z: torch.Tensor, ws: torch.Tensor, prob: float, psi: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """With probability ``prob`` per batch, styles from a random layer on come from a second
        latent (StyleGAN2's mixing regularisation; ``generator`` seeds the draws)."""
        if prob <= 0 or torch.rand([], generator=generator) >= prob:
            return ws
        cutoff = int(torch.randint(1, self.num_ws, [], generator=generator))
        z2 = torch.randn(z.shape, generator=generator).to(z)
        ws = ws.clone()
        ws[:, cutoff:] = self.mapping(z2, psi)[:, cutoff:]
        return ws

    def synthesize(self, ws: torch.Tensor, noise_mode: str | None = None, fused: bool | None = None) -> torch.Tensor:
        """Textures ``[B, N, 4, T, T]`` from styles ``ws [B, num_ws, w_dim]``."""
        noise_mode = ("random" if self.training else "const") if noise_mode is None else noise_mode
        if noise_mode not in ("random", "const", "none"):
            raise ConfigError(f"noise_mode must be 'random', 'const' or 'none', not {noise_mode!r}")
        fused = self.config.fused_modconv if fused is None else fused
        img = self.synthesis(ws, noise_mode, fused)
        b, _, t, _ = img.shape
        return torch.sigmoid(img).reshape(b, self.config.num_layers, 4, t, t)

    def forward(self, z: torch.Tensor, psi: float = 1.0, truncation_cutoff: int | None = None,
                noise_mode: str | None = None, fused: bool | None = None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.config.z_dim:
            raise ConfigError(f"z must be [B, {self.config.z_dim}], not {tuple(z.shape)}")
        ws = self.mapping(z, psi, truncation_cutoff, update_w_avg=self.training)
        return self.synthesize(ws, noise_mode, fused)
