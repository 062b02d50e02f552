"""EfficientViT M0-M5 (Microsoft): memory-efficient ViT with cascaded group attention.

Liu et al., "EfficientViT: Memory Efficient Vision Transformer with Cascaded Group
Attention", CVPR 2023, arXiv 2305.07027. Official code: microsoft/Cream, EfficientViT/.
Not the MIT EfficientViT.

Architecture, as in the official code:

- patch embedding: four stride-2 3x3 Conv-BN (C/8, C/4, C/2, C channels) with ReLU between,
  so the token grid is ``img_size / 16``;
- three stages; stages 2 and 3 start with a downsampling block (DW conv + FFN residuals,
  patch merging with squeeze-excite and a stride-2 DW conv, DW conv + FFN residuals), the
  token grid going from R to ``(R - 1) // 2 + 1``;
- each EfficientViT block is the sandwich: residual DW 3x3 conv -> residual FFN (ratio 2)
  -> residual cascaded group attention in 7x7 windows -> residual DW conv -> residual FFN;
- cascaded group attention: head i sees its channel split plus head i-1's output; its query
  goes through a depthwise conv of kernel ``kernels[i]``; each head has a LeViT-style bias
  table indexed by the absolute (dy, dx) offset; the concatenated heads go through ReLU and a
  1x1 Conv-BN projection;
- windows: a stage whose grid is larger than the window is zero-padded at the bottom/right to
  a multiple of 7 and partitioned; a grid no larger than the window is one window of its own
  size. The geometry is fixed at construction from `img_size` (any multiple of 16), so the
  graph has static shapes and exports cleanly;
- head: global average pool, BatchNorm1d, Linear.

Module names follow timm's port (``patch_embed.conv1``, ``stages.K.downsample.res1`` ...), so
our key layout is timm's; `convert_official` maps the official release's keys.

Choices the official code leaves open, made configurable here:
- ``drop_path_rate``: stochastic depth, rising linearly from 0 over the blocks, applied to
  every residual branch of a block (the official ``Residual`` supports a rate but never sets
  one; timm's port rejects the argument).

Deploy form (`EfficientVit.reparameterize`): every BatchNorm folded into the conv/linear next
to it, every residual depthwise conv folded into one conv with the identity in its centre
tap, the query scale folded into the query conv, and each head's bias table expanded once
into a dense ``[N, N]`` tensor. Same outputs (to float rounding), no BatchNorm, fewer ops.

Eager float32 CPU inference of the deploy form runs on channels-last token rows
(`zoo.models.nhwc`): every 1x1 conv is one prepacked oneDNN product with its ReLU or residual
sum fused, each window's attention is a few batched products on ``[windows, tokens, C]`` rows
(`CascadedGroupAttention.forward_windows`), and the blocks call their layers directly. A
module with hooks is run through its own forward so the hooks fire; tracing, export,
autograd and other dtypes or devices always take the module path.
"""

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SqueezeExcite
from timm.layers.activations import Sigmoid as TimmSigmoid

from zoo.errors import ConfigError
from zoo.hub import NotThisLayout, WeightEntry, timm_hub_entry
from zoo.models.cpu_kernels import DeployConv2d, can_write_inplace, eager_cpu_inference, nchw_fallback
from zoo.models.image_model import ImageModel, image_cfg
from zoo.models.layers import ConvNorm, NormLinear, Residual, bias_index, densify_bias, timm_converter
from zoo.models.nhwc import hooked, nhwc_applies, run_nhwc
from zoo.registry import IMAGENET_MEAN, IMAGENET_STD, InputSpec, Metric, ModelCard, Paper, register_model

__all__ = ["EfficientVit", "convert_official", "convert_timm"]

INPUT = InputSpec("image", (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, 0.875, "bicubic")


class ConvMlp(nn.Module):
    """1x1 Conv-BN, ReLU, 1x1 Conv-BN (second BN gamma starts at 0). Input/output ``[B, C, H, W]``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = ConvNorm(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))

    def forward_nhwc(self, t: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(t) + add`` on NHWC tensors (`zoo.models.nhwc`): the ReLU fused into the
        first product, the sum (a residual) into the second."""
        mods = self._modules  # direct registry reads: nn.Module.__getattr__ is slow in a hot path
        pw1, act, pw2 = mods["pw1"], mods["act"], mods["pw2"]
        if not (isinstance(pw1, DeployConv2d) and isinstance(pw2, DeployConv2d)):
            return nchw_fallback(self, t, add=add)
        if type(act) is nn.ReLU and not hooked(act):
            h = pw1.forward_nhwc(t, act="relu")
        else:
            h = run_nhwc(act, pw1.forward_nhwc(t))
        return pw2.forward_nhwc(h, add=add)


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention over one ``resolution x resolution`` window.

    Input and output ``[B, dim, R, R]`` with ``R = resolution``. Head i takes channel split
    i (``dim / num_heads`` channels) plus head i-1's output, projects it to query and key
    (`key_dim` each) and value (``attn_ratio * key_dim``), runs a depthwise conv of
    ``kernels[i]`` on the query, and attends with ``softmax(q^T k * key_dim^-0.5 + bias_i)``.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int,
        kernels: Sequence[int],
    ):
        super().__init__()
        if len(kernels) < num_heads:
            raise ValueError(f"need a query kernel per head: {num_heads} heads, kernels {list(kernels)}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim**-0.5
        self.resolution = resolution
        self.qkvs = nn.ModuleList(ConvNorm(dim // num_heads, 2 * key_dim + self.val_dim) for _ in range(num_heads))
        self.dws = nn.ModuleList(
            ConvNorm(key_dim, key_dim, kernels[i], 1, kernels[i] // 2, groups=key_dim) for i in range(num_heads)
        )
        self.proj = nn.Sequential(nn.ReLU(), ConvNorm(self.val_dim * num_heads, dim, bn_weight_init=0.0))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", bias_index(resolution), persistent=False)
        self.deployed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self._forward_deploy(x)
        r, kd, vd = self.resolution, self.key_dim, self.val_dim
        biases = self.attention_biases[:, self.attention_bias_idxs]
        feats_in = x.chunk(self.num_heads, dim=1)
        feats_out = []
        feat = feats_in[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):  # zip: TorchScript indexes no ModuleList
            if i > 0:
                feat = feat + feats_in[i]
            q, k, v = qkv(feat).split([kd, kd, vd], dim=1)
            q = dw(q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = (q.transpose(-2, -1) @ k) * self.scale + biases[i]
            attn = attn.softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).view(-1, vd, r, r)
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, dim=1))

    @torch.jit.unused  # the deploy form is eager and exported, never scripted
    def _forward_deploy(self, x: torch.Tensor) -> torch.Tensor:
        # Same function with the scale inside the query conv and dense per-head bias tensors.
        if x.dim() == 4 and eager_cpu_inference(x, self.qkvs[0].weight):
            b, c, r, _ = x.shape
            y = self.forward_windows(x.permute(0, 2, 3, 1).reshape(b, r * r, c))
            if y is not None:
                return y.view(b, r, r, c).permute(0, 3, 1, 2)
        r, kd, vd = self.resolution, self.key_dim, self.val_dim
        feats_in = x.chunk(self.num_heads, dim=1)
        feats_out = []
        feat = feats_in[0]
        for i in range(self.num_heads):
            if i > 0:
                feat = feat + feats_in[i]
            q, k, v = self.qkvs[i](feat).split([kd, kd, vd], dim=1)
            q = self.dws[i](q).flatten(2)
            attn = torch.matmul(q.transpose(-2, -1), k.flatten(2)) + self.attention_bias_dense[i]
            feat = torch.matmul(v.flatten(2), attn.softmax(dim=-1).transpose(-2, -1)).view(-1, vd, r, r)
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, dim=1))

    def forward_windows(self, xw: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor | None:
        """The deploy form in eager CPU inference on windows of token rows: ``xw [W, N, C]``
        (``W`` windows of ``N = resolution**2`` tokens in row-major order) -> ``forward(x) +
        add`` in the same layout.

        Each head's qkv conv is an ``addmm`` on the token rows, its query conv a batched
        product with the dense depthwise matrix `DeployConv2d` caches, the bias add fused into
        the score product; the ReLU and the output projection run as one oneDNN product with
        the sum fused. The heads run in sequence, so per-op cost is what a 7x7 window costs.
        None where these kernels cannot serve: not deployed, hooks on the convolutions,
        autograd through their weights, or a window over `DeployConv2d.dense_max_tokens`."""
        w_, n, c = xw.shape
        r, kd, vd = self.resolution, self.key_dim, self.val_dim
        mods = self._modules  # direct registry reads: nn.Module.__getattr__ is slow in a hot path
        proj_seq = mods["proj"]
        if not (self.deployed and n == r * r and len(proj_seq) == 2):
            return None
        act, proj = proj_seq._modules.values()
        qkvs, dws = list(mods["qkvs"]._modules.values()), list(mods["dws"]._modules.values())
        if not (
            type(act) is nn.ReLU
            and not hooked(proj_seq, act)
            and all(
                isinstance(m, DeployConv2d) and m._parameters["bias"] is not None and m._nhwc_applies(xw)
                for m in (*qkvs, *dws, proj)
            )
        ):
            return None
        dense = [dw._dense_depthwise(r, r, xw.dtype) for dw in dws]
        if any(d is None for d in dense):
            return None
        biases = self._buffers["attention_bias_dense"]
        rows = xw.reshape(w_ * n, c)
        ch = c // self.num_heads
        feats_out = []
        feat = None
        for i in range(self.num_heads):
            qkv_p, dw_p = qkvs[i]._parameters, dws[i]._parameters
            part = rows[:, i * ch:(i + 1) * ch]
            feat = part if feat is None else part + feat  # [W*N, ch]
            # channel-major [2*kd + vd, W, N], so every product below reads unit-stride rows
            qkv = torch.addmm(qkv_p["bias"].view(-1, 1), qkv_p["weight"].view(-1, ch), feat.t()).view(-1, w_, n)
            q, k, v = qkv.split([kd, kd, vd], dim=0)
            # the query's depthwise conv, per channel: [W, N] @ [N, N]
            q = torch.baddbmm(dw_p["bias"].view(-1, 1, 1), q, dense[i])
            attn = torch.baddbmm(biases[i], q.permute(1, 2, 0), k.transpose(0, 1))
            feat = torch.bmm(attn.softmax(dim=-1), v.permute(1, 2, 0)).view(w_ * n, vd)
            feats_out.append(feat)
        y = torch.cat(feats_out, dim=1).relu_()
        return proj.forward_rows(y, add=None if add is None else add.reshape(w_ * n, c)).view(w_, n, c)

    @torch.no_grad()
    def fuse(self) -> "CascadedGroupAttention":
        """Deploy form; call after the children's Conv-BN pairs are fused (see `fuse_modules`)."""
        if self.deployed:
            return self
        for dw in self.dws:
            dw.weight.mul_(self.scale)
            dw.bias.mul_(self.scale)
        densify_bias(self)
        self.deployed = True
        return self


class LocalWindowAttention(nn.Module):
    """Cascaded group attention applied in non-overlapping windows. ``[B, C, R, R]`` in and out.

    A grid R larger than `window_resolution` is zero-padded at the bottom and right to a
    multiple of it and split into windows; otherwise the whole grid is one window.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int,
        window_resolution: int,
        kernels: Sequence[int],
    ):
        super().__init__()
        self.dim = dim
        self.resolution = resolution
        self.window_resolution = window_resolution
        ws = min(window_resolution, resolution)
        self.pad = (ws - resolution % ws) % ws
        self.num_windows = (resolution + self.pad) // ws
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio, ws, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_windows == 1:
            return self.attn(x)
        c, r, n, p = self.dim, self.resolution, self.num_windows, self.pad
        ws = self.attn.resolution
        if p:
            x = F.pad(x, (0, p, 0, p))
        # [B, C, n*ws, n*ws] -> [B*n*n, C, ws, ws], windows in row-major order
        x = x.view(-1, c, n, ws, n, ws).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, ws, ws)
        x = self.attn(x)
        x = x.view(-1, n, n, c, ws, ws).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, n * ws, n * ws)
        if p:
            x = x[:, :, :r, :r]
        return x

    def forward_nhwc(self, t: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(t) + add`` on NHWC tensors (`zoo.models.nhwc`). The windows are token
        rows ``[B*n*n, ws*ws, C]``; a residual sum (``add is t``) is fused into the output
        projection in window order, before the windows are put back."""
        b, _, _, c = t.shape
        attn = self._modules["attn"]
        ws, n, p, r = attn.resolution, self.num_windows, self.pad, self.resolution
        if n == 1:
            xw = t.reshape(b, ws * ws, c)
        else:
            tp = F.pad(t, (0, 0, 0, p, 0, p)) if p else t
            xw = tp.view(b, n, ws, n, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * n * n, ws * ws, c)
        residual = xw if add is t else None
        y = None if hooked(attn) else attn.forward_windows(xw, residual)
        if y is None:
            y = attn(xw.view(-1, ws, ws, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(xw.shape)
            if residual is not None:
                y = y + residual
        if n == 1:
            y = y.view(b, ws, ws, c)
        else:
            y = y.view(b, n, n, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n * ws, n * ws, c)
            if p:
                y = y[:, :r, :r].contiguous()
        return y if add is None or residual is not None else y + add


class EfficientVitBlock(nn.Module):
    """The sandwich: DW conv, FFN, window attention, DW conv, FFN, each residual."""

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int,
        window_resolution: int,
        kernels: Sequence[int],
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.dw0 = Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0), drop_path)
        self.ffn0 = Residual(ConvMlp(dim, dim * 2), drop_path)
        self.mixer = Residual(
            LocalWindowAttention(dim, key_dim, num_heads, attn_ratio, resolution, window_resolution, kernels),
            drop_path,
        )
        self.dw1 = Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0.0), drop_path)
        self.ffn1 = Residual(ConvMlp(dim, dim * 2), drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))

    def forward_nhwc(self, t: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(t) + add`` on NHWC tensors (`zoo.models.nhwc`), each part called directly."""
        mods = self._modules
        for name in ("dw0", "ffn0", "mixer", "dw1"):
            t = run_nhwc(mods[name], t)
        return run_nhwc(mods["ffn1"], t, add=add)


class PatchMerging(nn.Module):
    """1x1 expand (4x), stride-2 3x3 DW conv, squeeze-excite (ratio 0.25), 1x1 project."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hidden = dim * 4
        self.conv1 = ConvNorm(dim, hidden)
        self.act = nn.ReLU()
        self.conv2 = ConvNorm(hidden, hidden, 3, 2, 1, groups=hidden)
        self.se = SqueezeExcite(hidden, 0.25)
        self.conv3 = ConvNorm(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))

    def forward_nhwc(self, t: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(t) + add`` on NHWC tensors (`zoo.models.nhwc`), both ReLUs fused."""
        mods = self._modules
        conv1, act, conv2, se, conv3 = (mods[k] for k in ("conv1", "act", "conv2", "se", "conv3"))
        if not all(isinstance(m, DeployConv2d) for m in (conv1, conv2, conv3)) or type(act) is not nn.ReLU or hooked(act):
            return nchw_fallback(self, t, add=add)
        h = conv2.forward_nhwc(conv1.forward_nhwc(t, act="relu"), act="relu")
        return conv3.forward_nhwc(_squeeze_excite_nhwc(se, h), add=add)


def _squeeze_excite_nhwc(se: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """timm's `SqueezeExcite` (mean, 1x1 conv, ReLU, 1x1 conv, sigmoid, scale) on a fresh NHWC
    tensor `h`, scaled in place where autograd allows; any other form, or hooks: its forward."""
    mods = se._modules
    fc1, bn, act, fc2, gate = (mods.get(k) for k in ("fc1", "bn", "act", "fc2", "gate"))
    plain = (
        se.__dict__.get("add_maxpool") is False
        and isinstance(bn, nn.Identity)
        and type(act) is nn.ReLU
        and type(gate) in (nn.Sigmoid, TimmSigmoid)
        and isinstance(fc1, DeployConv2d)
        and isinstance(fc2, DeployConv2d)
        and not hooked(se, bn, act, gate)
    )
    if not plain:
        return run_nhwc(se, h)
    gate = fc2.forward_nhwc(fc1.forward_nhwc(h.mean(dim=(1, 2), keepdim=True), act="relu")).sigmoid()
    return h.mul_(gate) if can_write_inplace(h) else h * gate


def _dw_ffn(dim: int) -> nn.Sequential:
    return nn.Sequential(Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim)), Residual(ConvMlp(dim, dim * 2)))


class EfficientVitStage(nn.Module):
    """Optional downsampling (res1, patchmerge, res2) then `depth` EfficientViT blocks."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int,
        window_resolution: int,
        kernels: Sequence[int],
        depth: int,
        downsample: bool,
        drop_path: Sequence[float],
    ):
        super().__init__()
        if downsample:
            self.resolution = (resolution - 1) // 2 + 1
            self.downsample = nn.Sequential(
                OrderedDict(res1=_dw_ffn(in_dim), patchmerge=PatchMerging(in_dim, out_dim), res2=_dw_ffn(out_dim))
            )
        else:
            if in_dim != out_dim:
                raise ValueError(f"a stage without downsampling keeps its width ({in_dim} != {out_dim})")
            self.resolution = resolution
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *(
                EfficientVitBlock(
                    out_dim, key_dim, num_heads, attn_ratio, self.resolution, window_resolution, kernels, drop_path[d]
                )
                for d in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))

    def forward_nhwc(self, t: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(t) + add`` on NHWC tensors (`zoo.models.nhwc`)."""
        mods = self._modules
        return run_nhwc(mods["blocks"], run_nhwc(mods["downsample"], t), add=add)


class PatchEmbedding(nn.Sequential):
    """Four stride-2 3x3 Conv-BN with ReLU between: ``[B, 3, S, S] -> [B, dim, S/16, S/16]``."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = ConvNorm(in_chans, dim // 8, 3, 2, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = ConvNorm(dim // 8, dim // 4, 3, 2, 1)
        self.relu2 = nn.ReLU()
        self.conv3 = ConvNorm(dim // 4, dim // 2, 3, 2, 1)
        self.relu3 = nn.ReLU()
        self.conv4 = ConvNorm(dim // 2, dim, 3, 2, 1)


class EfficientVit(ImageModel, nn.Module):
    """EfficientViT classifier / backbone. Input ``[B, in_chans, img_size, img_size]``.

    Args:
        img_size: input side, a multiple of 16; fixes the window geometry (as the official
            code does) so shapes are static.
        embed_dim, depth, num_heads: per stage.
        key_dim: per-stage query/key width (16 in every released variant).
        window_size: per-stage attention window side.
        kernels: query depthwise-conv kernel per head (heads beyond its length are an error).
        num_classes: classifier outputs; 0 for a backbone returning pooled features.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear from 0 to this over the blocks.

    Outputs: ``forward`` -> ``[B, num_classes]`` logits; ``forward_features`` ->
    ``[B, embed_dim[-1], R, R]`` with ``R`` the last stage's grid (4 at 224).
    """

    # int8 ONNX: its layers are so narrow that a quantize/dequantize pass costs about what the
    # int8 arithmetic saves; only the widest products are quantized, depthwise convs stay float
    int8_rule = {"op_types": ("Conv", "MatMul", "Gemm"), "float_depthwise": True, "min_weights": 32768,
                 "float_activation_matmul": True,
                 "note": "only convolutions and products with at least 32768 weights; depthwise convs and "
                         "attention's activation products float"}

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: Sequence[int] = (64, 128, 192),
        key_dim: Sequence[int] = (16, 16, 16),
        depth: Sequence[int] = (1, 2, 3),
        num_heads: Sequence[int] = (4, 4, 4),
        window_size: Sequence[int] = (7, 7, 7),
        kernels: Sequence[int] = (5, 5, 5, 5),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if not isinstance(img_size, int) or img_size <= 0 or img_size % 16:
            raise ConfigError(f"img_size must be a positive multiple of 16 (got {img_size!r}).")
        n_stages = len(embed_dim)
        if not (len(key_dim) == len(depth) == len(num_heads) == len(window_size) == n_stages):
            raise ConfigError("embed_dim, key_dim, depth, num_heads and window_size need one entry per stage.")
        self.img_size = img_size
        self.fixed_input_size = True
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.deployed = False

        self.patch_embed = PatchEmbedding(in_chans, embed_dim[0])
        resolution = img_size // 16
        rates = torch.linspace(0, drop_path_rate, sum(depth)).tolist()
        stages, self.feature_info, stride, prev = [], [], 16, embed_dim[0]
        for i in range(n_stages):
            attn_ratio = embed_dim[i] / (key_dim[i] * num_heads[i])
            stage = EfficientVitStage(
                prev, embed_dim[i], key_dim[i], num_heads[i], attn_ratio, resolution, window_size[i], kernels,
                depth[i], downsample=i > 0, drop_path=rates[sum(depth[:i]): sum(depth[: i + 1])],
            )
            stride *= 2 if i > 0 else 1
            resolution = stage.resolution
            prev = embed_dim[i]
            stages.append(stage)
            self.feature_info.append(dict(num_chs=embed_dim[i], reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.feature_resolution = resolution
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.head = NormLinear(self.num_features, num_classes, drop=drop_rate) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = image_cfg(
            INPUT, in_chans, img_size, num_classes, first_conv="patch_embed.conv1.conv", classifier="head.linear",
            fixed_input_size=True, pool_size=(self.feature_resolution, self.feature_resolution),
        )

    # --- timm-compatible interface -----------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {k for k in self.state_dict() if "attention_biases" in k}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.\w+\.(\d+)", None)],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.linear if isinstance(self.head, NormLinear) else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ConfigError(f"EfficientVit pools by average only (got global_pool={global_pool!r}).")
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        self.head = NormLinear(self.num_features, num_classes, drop=self.drop_rate) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    stem_name = "patch_embed"
    size_hint = " (its window geometry is fixed; img_size is a multiple of 16)"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self.check_input_size(x)
            if self.deployed and not self.training and nhwc_applies(x):
                # eager CPU inference: the channels-last kernels (zoo.models.nhwc); the features
                # come back as the NCHW view of an NHWC tensor
                return run_nhwc(self.stages, run_nhwc(self.patch_embed, x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.forward_stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --- deploy form (`ImageModel.reparameterize`; see the module docstring) ---------------
    def _fold_for_deploy(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = True  # every ReLU here acts on a fresh intermediate


# ------------------------------------------------------------------------------------------
# Key layouts


# Our keys are timm's ``efficientvit_m*`` keys (older timm files also saved the bias index).
# Bias tables whose window differs from the model's are resized bicubic over the offset grid
# with ``antialias=True`` (timm's ``resize_rel_pos_bias_table_levit``, after TinyViT).
convert_timm = timm_converter(antialias=True)


def convert_official(sd: dict, model: nn.Module) -> dict:
    """Official release keys (``patch_embed.{0,2,4,6}``, ``blocks{1,2,3}.N``, ``.c``/``.l``) to ours.

    In the official layout a stage's downsampling modules are the first three entries of its
    ``blocksK`` Sequential: ``.0`` -> ``downsample.res1``, ``.1`` -> ``downsample.patchmerge``,
    ``.2`` -> ``downsample.res2``, then blocks from ``.3``.
    """
    if not any(k.startswith("blocks1.") for k in sd):
        raise NotThisLayout("not the official layout")
    rename = {"c": "conv", "l": "linear"}
    out = {}
    for key, v in sd.items():
        if key.endswith("attention_bias_idxs"):
            continue
        parts = [rename.get(p, p) for p in key.split(".")]
        if parts[0] == "patch_embed":
            parts[1] = f"conv{int(parts[1]) // 2 + 1}"
        elif parts[0].startswith("blocks"):
            stage = int(parts[0][len("blocks"):]) - 1
            idx = int(parts[1])
            if stage > 0:
                if idx < 3:
                    parts[1:2] = ["downsample", ("res1", "patchmerge", "res2")[idx]]
                else:
                    parts[1:2] = ["blocks", str(idx - 3)]
            else:
                parts[1:2] = ["blocks", str(idx)]
            parts[0:1] = ["stages", str(stage)]
        out[".".join(parts)] = v
    return convert_timm(out, model)


# ------------------------------------------------------------------------------------------
# Registry

_PAPER = Paper(
    title="EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention",
    arxiv="2305.07027",
    code="https://github.com/microsoft/Cream/tree/main/EfficientViT",
)

# name: (embed_dim, depth, num_heads, kernels, paper top-1)
_VARIANTS = {
    "m0": ((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5), 63.2),
    "m1": ((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3), 68.4),
    "m2": ((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3), 70.8),
    "m3": ((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5), 73.4),
    "m4": ((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3), 74.3),
    "m5": ((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3), 77.1),
}

_OFFICIAL_URL = "https://github.com/xinyuliu-jeffrey/EfficientViT_Model_Zoo/releases/download/v1.0/efficientvit_{}.pth"

for _v, (_dims, _depth, _heads, _kernels, _top1) in _VARIANTS.items():
    register_model(
        ModelCard(
            name=f"efficientvit_{_v}",
            family="efficientvit",
            task="image-classification",
            paper=_PAPER,
            builder=EfficientVit,
            config=dict(
                img_size=224,
                num_classes=1000,
                embed_dim=_dims,
                key_dim=(16, 16, 16),
                depth=_depth,
                num_heads=_heads,
                window_size=(7, 7, 7),
                kernels=_kernels,
            ),
            input=INPUT,
            feature_out_indices=(0, 1, 2),
            metrics={"imagenet_top1": Metric(_top1, "%", "ImageNet-1k val", "paper Table 1 (arXiv 2305.07027)")},
            weights={
                "r224_in1k": timm_hub_entry(f"efficientvit_{_v}", "r224_in1k", "mit", "ImageNet-1k, 224px"),
                "official": WeightEntry(
                    "official", _OFFICIAL_URL.format(_v), format="pytorch", layout="official", license="mit",
                    description="ImageNet-1k, 224px, the official release (state dict under 'model')",
                ),
            },
            default_tag="r224_in1k",
            layouts={"zoo": convert_timm, "timm": convert_timm, "official": convert_official},
            head_keys=("head.linear.",),
            license="mit",
            description="Sandwich-layout ViT with cascaded group attention in 7x7 windows.",
        )
    )
