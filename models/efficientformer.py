"""EfficientFormer L1/L3/L7 (Snap): a dimension-consistent ViT at MobileNet speed.

Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", NeurIPS 2022,
arXiv 2206.01191. Official code: snap-research/EfficientFormer, ``models/efficientformer.py``.

Architecture, as in the official code:

- stem: two stride-2 3x3 Conv-BN-ReLU (C/2 then C channels), token grid ``img_size / 4``;
- four stages; stages 2-4 start with a stride-2 3x3 Conv-BN downsampling;
- Meta4D block (``MetaBlock2d``, on ``[B, C, H, W]``):
  ``x + ls1 * (avgpool3x3(x) - x)`` (pooling with ``count_include_pad=False``), then
  ``x + ls2 * (Conv1x1-BN -> GELU -> Conv1x1-BN)(x)``, MLP ratio 4;
- the last `num_vit` blocks of stage 4 are Meta3D blocks (``MetaBlock1d``) on the flattened
  ``[B, N, C]`` tokens: pre-LayerNorm 8-head attention (key dim 32, value dim 128) with a
  LeViT bias table over the token grid, and a pre-LayerNorm linear GELU MLP, both with layer
  scale; a ``Flat`` module sits in the Sequential where the layout changes;
- head: LayerNorm, token mean, a classifier and a distillation classifier whose logits are
  averaged at inference (both returned in distillation training).

Module names follow timm's port (``stem.conv1``, ``stages.K.downsample.conv``,
``stages.K.blocks.J.ls1.gamma``, ``head_dist``), so our key layout is timm's, including the
persistent ``attention_bias_idxs`` buffer timm keeps; `convert_official` maps the release's.

Choices the official code leaves open, made configurable here:

- ``img_size``: timm fixes the attention grid at 7x7; here it follows the input size
  (``ceil(img_size / 32)``) and weights trained at another size get their bias tables
  resized when they load (`convert_timm`): bicubic over the offset grid, ``align_corners=False``,
  no antialiasing, as the official detection backbone interpolates its biases. (That backbone
  interpolates the expanded ``[N, N]`` bias at run time; resizing the table once at load keeps
  bicubic out of the exported graph, which CoreML rejects, and keeps the offset geometry.)
- ``drop_path_rate``: linear over all blocks, as the official code.

Deploy form (`EfficientFormer.reparameterize`): every BatchNorm folded into its conv, each
layer scale folded into the projection before it (MLP output convs, attention output
linears), the pooling mixer computed as ``(1 - ls1) * x + ls1 * pool(x)`` (in eager CPU
inference with the box sum as a depthwise conv; in traced and exported graphs with both
scales as 1x1 depthwise convs, which onnxruntime keeps in its NCHWc layout), the attention
scale folded into the query weights, bias tables expanded once into dense tensors, and the two
classifiers merged into one linear (their average). Neither the official code nor timm has one.
"""

import re
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, LayerScale, LayerScale2d, Mlp, trunc_normal_

from zoo.errors import ConfigError
from zoo.hub import NotThisLayout, WeightEntry, timm_hub_entry
from zoo.models.cpu_kernels import add_, can_write_inplace, graph_capture, mul_add
from zoo.models.image_model import ImageModel, image_cfg
from zoo.models.layers import bias_index, densify_bias, timm_converter
from zoo.nn import fold_scale_into_out_channels, fuse_conv_bn
from zoo.registry import IMAGENET_MEAN, IMAGENET_STD, InputSpec, Metric, ModelCard, Paper, register_model

__all__ = ["DistilledClassifier", "EfficientFormer", "convert_official", "convert_timm", "merge_heads"]

INPUT = InputSpec("image", (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, 0.95, "bicubic")


def conv_grid(size: int, halvings: int) -> int:
    """Side of the grid after `halvings` stride-2, 3x3, padding-1 convs: ``ceil`` each time."""
    for _ in range(halvings):
        size = (size + 1) // 2
    return size


class Attention(nn.Module):
    """Multi-head self-attention with a LeViT bias table, on ``[B, N, dim]`` tokens.

    ``N = resolution^2``. The fused ``qkv`` output is laid out per head as
    ``[q (key_dim), k (key_dim), v (attn_ratio * key_dim)]``, as in the official code.
    """

    def __init__(self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4, resolution: int = 7):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim**-0.5
        self.resolution = resolution
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(num_heads * self.val_dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        # Persistent, as in timm and the official code, so state dicts have the same keys.
        self.register_buffer("attention_bias_idxs", bias_index(resolution))
        self.deployed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).permute(0, 2, 1, 3).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3
        )
        if self.deployed:
            attn = self._deploy_scores(q, k)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)

    @torch.jit.unused  # the deploy form is eager and exported, never scripted
    def _deploy_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``q k^T + bias`` with the scale folded into q and the dense bias, in one product."""
        b, _, n, _ = q.shape
        return torch.baddbmm(
            self.attention_bias_dense.expand(b, -1, -1, -1).reshape(b * self.num_heads, n, n),
            q.reshape(b * self.num_heads, n, -1),
            k.reshape(b * self.num_heads, n, -1).transpose(1, 2),
        ).view(b, self.num_heads, n, n)

    @torch.no_grad()
    def fuse(self) -> "Attention":
        if self.deployed:
            return self
        per_head = 2 * self.key_dim + self.val_dim
        scale = torch.ones(self.num_heads, per_head)
        scale[:, : self.key_dim] = self.scale  # the query rows of each head
        fold_scale_into_out_channels(self.qkv, scale.flatten().to(self.qkv.weight))
        densify_bias(self)
        self.deployed = True
        return self


class Pooling(nn.Module):
    """PoolFormer's token mixer: ``avgpool(x) - x`` (3x3, stride 1, ``count_include_pad=False``)."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class ConvMlpWithNorm(nn.Module):
    """1x1 Conv-BN -> GELU -> 1x1 Conv-BN on ``[B, C, H, W]``. Keys ``fc1, norm1, fc2, norm2``."""

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm2(self.fc2(self.drop(self.act(self.norm1(self.fc1(x)))))))

    def fuse(self) -> nn.Sequential:
        return nn.Sequential(fuse_conv_bn(self.fc1, self.norm1), self.act, fuse_conv_bn(self.fc2, self.norm2))


class MetaBlock2d(nn.Module):
    """Meta4D: pooling mixer and conv MLP, each residual with layer scale. ``[B, C, H, W]``.

    resolution: the grid side this block sees in the model (used by the deploy form only).
    """

    def __init__(self, dim: int, pool_size: int = 3, mlp_ratio: float = 4.0, act_layer: type[nn.Module] = nn.GELU,
                 drop: float = 0.0, drop_path: float = 0.0, layer_scale_init_value: float = 1e-5,
                 resolution: int | None = None):
        super().__init__()
        self.token_mixer = Pooling(pool_size)
        self.ls1 = LayerScale2d(dim, layer_scale_init_value)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = ConvMlpWithNorm(dim, int(dim * mlp_ratio), act_layer, drop)
        self.ls2 = LayerScale2d(dim, layer_scale_init_value)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.pool_size = pool_size
        self.resolution = resolution
        self.deployed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self._forward_deploy(x)
        x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))

    @torch.jit.unused  # the deploy form is eager and exported, never scripted
    def _forward_deploy(self, x: torch.Tensor) -> torch.Tensor:
        if graph_capture():
            return self._forward_export(x)
        # x + g * (pool(x) - x) == (1 - g) * x + g/k^2 * boxsum(x) * k^2/count, the box sum a
        # depthwise conv (faster than avg_pool2d on the CPU).
        q = self.pool_conv(x)
        if can_write_inplace(q):
            x = q.mul_(self._recount(x)).addcmul_(x, self.keep)
        else:
            x = mul_add(x * self.keep, q, self._recount(x))
        return add_(self.mlp(x), x)

    def _forward_export(self, x: torch.Tensor) -> torch.Tensor:
        """The exported graph: ``g * avgpool(x) + (1 - g) * x`` with both per-channel scales as
        1x1 depthwise convs. Every op then runs in onnxruntime's blocked NCHWc layout (a
        ``[1, 1, H, W]`` recount or a per-channel Mul would leave it, costing a reorder each
        way per block), and the residual sum fuses into the MLP's last conv."""
        k, dim = self.pool_size, x.shape[1]
        pooled = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
        x = F.conv2d(pooled, self.gain_dw, groups=dim) + F.conv2d(x, self.keep_dw, groups=dim)
        return self.mlp(x) + x

    def _recount(self, x: torch.Tensor) -> torch.Tensor:
        """``k^2 / count`` per position (count: window cells inside the image), ``[1, 1, H, W]``."""
        if self.recount.shape[-2:] == x.shape[-2:]:
            return self.recount
        return _recount(x.shape[-2], x.shape[-1], self.pool_size).to(x)

    @torch.no_grad()
    def fuse(self) -> "MetaBlock2d":
        """Deploy form; the MLP must already be fused (children first, see `fuse_modules`)."""
        if self.deployed:
            return self
        g1 = self.ls1.gamma.detach()
        k = self.pool_size
        dim = g1.numel()
        self.pool_conv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False).to(g1)
        self.pool_conv.weight.copy_((g1 / (k * k)).view(-1, 1, 1, 1).expand(-1, 1, k, k))
        self.register_buffer("keep", (1 - g1).view(1, -1, 1, 1).clone())
        # the export form's weights: derived, so kept out of the state dict
        self.register_buffer("gain_dw", g1.view(-1, 1, 1, 1).clone(), persistent=False)
        self.register_buffer("keep_dw", (1 - g1).view(-1, 1, 1, 1).clone(), persistent=False)
        r = self.resolution or 1
        self.register_buffer("recount", _recount(r, r, k).to(g1))
        fold_scale_into_out_channels(self.mlp[-1], self.ls2.gamma)
        self.ls1 = self.ls2 = nn.Identity()
        del self.token_mixer
        self.deployed = True
        return self


def _recount(h: int, w: int, k: int) -> torch.Tensor:
    ones = torch.ones(1, 1, h, w)
    count = F.conv2d(ones, torch.ones(1, 1, k, k), padding=k // 2)
    return (k * k) / count


class MetaBlock1d(nn.Module):
    """Meta3D: pre-LN attention and pre-LN linear MLP, each residual with layer scale. ``[B, N, C]``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-5, resolution: int = 7,
                 key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = Attention(dim, key_dim, num_heads, attn_ratio, resolution)
        self.ls1 = LayerScale(dim, layer_scale_init_value)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.ls2 = LayerScale(dim, layer_scale_init_value)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    @torch.no_grad()
    def fuse(self) -> "MetaBlock1d":
        if isinstance(self.ls1, LayerScale):
            fold_scale_into_out_channels(self.token_mixer.proj, self.ls1.gamma)
            fold_scale_into_out_channels(self.mlp.fc2, self.ls2.gamma)
            self.ls1 = self.ls2 = nn.Identity()
        return self


class Flat(nn.Module):
    """``[B, C, H, W]`` -> ``[B, H*W, C]`` tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class Downsample(nn.Module):
    """Stride-2 3x3 Conv-BN between stages. Keys ``conv``, ``norm``."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))

    def fuse(self) -> nn.Conv2d:
        return fuse_conv_bn(self.conv, self.norm)


class Stem4(nn.Sequential):
    """Two stride-2 3x3 Conv-BN-ReLU. Keys ``conv1, norm1, conv2, norm2``."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs // 2, 3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(out_chs // 2)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs // 2, out_chs, 3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU()

    def fuse(self) -> nn.Sequential:
        return nn.Sequential(fuse_conv_bn(self.conv1, self.norm1), self.act1, fuse_conv_bn(self.conv2, self.norm2), self.act2)


class EfficientFormerStage(nn.Module):
    """Optional downsampling, then `depth` blocks of which the last `num_vit` are Meta3D."""

    def __init__(self, dim: int, dim_out: int, depth: int, downsample: bool, num_vit: int, resolution: int,
                 pool_size: int, mlp_ratio: float, drop: float, drop_path: Sequence[float], layer_scale_init_value: float,
                 grid: int | None = None):
        """resolution: the attention grid (of the last stage); grid: this stage's grid side."""
        super().__init__()
        self.downsample = Downsample(dim, dim_out) if downsample else nn.Identity()
        blocks: list[nn.Module] = []
        if num_vit >= depth > 0:
            blocks.append(Flat())
        for i in range(depth):
            remaining = depth - i - 1
            if num_vit > remaining:
                blocks.append(MetaBlock1d(dim_out, mlp_ratio, drop=drop, drop_path=drop_path[i],
                                          layer_scale_init_value=layer_scale_init_value, resolution=resolution))
            else:
                blocks.append(MetaBlock2d(dim_out, pool_size, mlp_ratio, drop=drop, drop_path=drop_path[i],
                                          layer_scale_init_value=layer_scale_init_value, resolution=grid))
                if num_vit and num_vit == remaining:
                    blocks.append(Flat())
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class DistilledClassifier(ImageModel):
    """The classifier interface both EfficientFormer generations share (a mixin over
    `ImageModel`).

    Expects ``stem``, ``stages``, ``num_features``, ``head_drop``, ``distillation``,
    ``distilled_training``, ``deployed`` and ``pretrained_cfg``.
    Heads: ``head`` and, with distillation, ``head_dist``; their logits are averaged at
    inference and returned as a pair in distillation training.
    """

    def _make_heads(self, num_classes: int) -> None:
        def linear() -> nn.Module:
            if num_classes <= 0:
                return nn.Identity()
            layer = nn.Linear(self.num_features, num_classes)
            trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
            return layer

        self.head = linear()
        self.head_dist = linear() if self.distillation else None

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {k for k, _ in self.named_parameters() if "attention_biases" in k}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self):
        return (self.head, self.head_dist) if self.head_dist is not None else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ConfigError(f"{type(self).__name__} pools by average only (got global_pool={global_pool!r}).")
        if self.deployed:
            raise ConfigError("reset_classifier() on a reparameterized model: reset it before reparameterize().")
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        self._make_heads(num_classes)
        self.head.train(self.training)
        if self.head_dist is not None:
            self.head_dist.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Tokens ``[B, N, C]`` or maps ``[B, C, H, W]`` -> mean -> classifier(s)."""
        # tokens [B, N, C] after attention blocks, maps otherwise: known at build time, so no
        # branch on the tensor (fx traces this)
        x = x.mean(dim=1) if self.head_on_tokens else x.mean(dim=(2, 3))
        x = self.head_drop(x)
        if pre_logits:
            return x
        if self.head_dist is None:
            return self.head(x)
        cls, dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return cls, dist
        return (cls + dist) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

    size_hint = " (its attention grids are fixed)"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # the message needs Python; a scripted model has no check
            self.check_input_size(x)
        return self.norm(self.forward_stages(self.stem(x)))

    def _fold_for_deploy(self) -> None:
        merge_heads(self)


class EfficientFormer(DistilledClassifier, nn.Module):
    """EfficientFormer (V1) classifier / backbone. Input ``[B, in_chans, img_size, img_size]``.

    Args:
        img_size: input side; fixes the attention grid ``ceil(img_size / 32)``.
        depths, embed_dims: per stage (the slimming search picks these).
        num_vit: how many of the last stage's blocks are Meta3D (attention) blocks.
        mlp_ratios: hidden / width ratio of every MLP (4 in the released models).
        pool_size: pooling mixer window.
        downsamples: per stage, whether it starts with a stride-2 Conv-BN (default: all but the first).
        layer_scale_init_value: initial layer scale.
        num_classes: classifier outputs; 0 for a backbone returning pooled features.
        distillation: keep the distillation classifier ``head_dist`` (the released weights have it).
        drop_rate: dropout before the classifiers; proj_drop_rate: dropout in the MLPs.
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks.

    Outputs: ``forward`` -> ``[B, num_classes]`` (the mean of the two classifiers; in training
    with ``set_distilled_training(True)`` the pair ``(cls, dist)``); ``forward_features`` ->
    ``[B, N, embed_dims[-1]]`` normalised tokens when ``num_vit > 0``, else ``[B, C, H, W]``.
    """

    # int8 ONNX (zoo.export.quantize_onnx): every dense convolution and matrix product with
    # per-channel weights; the pooling mixer's 1x1 depthwise scales (on the residual stream,
    # with nothing to gain from int8), norms, GELU and softmax stay float
    int8_rule = {"op_types": ("Conv", "MatMul", "Gemm"), "float_depthwise": True, "float_activation_matmul": True,
                 "note": "dense convolutions and products with weights; the mixer's depthwise scales, attention's "
                         "activation products, norms, GELU and softmax float"}

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 2, 6, 4),
        embed_dims: Sequence[int] = (48, 96, 224, 448),
        num_vit: int = 1,
        mlp_ratios: float = 4.0,
        pool_size: int = 3,
        downsamples: Sequence[bool] | None = None,
        layer_scale_init_value: float = 1e-5,
        distillation: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if not isinstance(img_size, int) or img_size < 32:
            raise ConfigError(f"img_size must be an int of at least 32 (got {img_size!r}).")
        if len(depths) != len(embed_dims):
            raise ConfigError("depths and embed_dims need one entry per stage.")
        if not 0 <= num_vit <= depths[-1]:
            raise ConfigError(f"num_vit must be between 0 and the last stage's depth {depths[-1]} (got {num_vit}).")
        downsamples = tuple(downsamples) if downsamples is not None else (False,) + (True,) * (len(depths) - 1)
        for i in range(len(depths)):
            if not downsamples[i] and embed_dims[i] != (embed_dims[i - 1] if i else embed_dims[0]):
                raise ConfigError(f"stage {i} changes width without downsampling; set downsamples[{i}]=True.")
        self.img_size = img_size
        self.fixed_input_size = num_vit > 0  # only the attention blocks fix the grid
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_vit = num_vit
        self.head_on_tokens = num_vit > 0
        self.drop_rate = drop_rate
        self.distilled_training = False
        self.grad_checkpointing = False
        self.deployed = False

        self.stem = Stem4(in_chans, embed_dims[0])
        halvings = 2 + sum(bool(d) for d in downsamples)
        self.resolution = conv_grid(img_size, halvings)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, self.feature_info, prev, stride = [], [], embed_dims[0], 4
        for i, depth in enumerate(depths):
            stride *= 2 if downsamples[i] else 1
            stages.append(EfficientFormerStage(
                prev, embed_dims[i], depth, downsamples[i], num_vit if i == len(depths) - 1 else 0,
                self.resolution, pool_size, mlp_ratios, proj_drop_rate,
                rates[sum(depths[:i]): sum(depths[: i + 1])], layer_scale_init_value,
                grid=conv_grid(img_size, 2 + sum(bool(d) for d in downsamples[: i + 1])),
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f"stages.{i}"))
            prev = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        # Without attention blocks the features stay [B, C, H, W]: the same LayerNorm over channels.
        self.norm = nn.LayerNorm(self.num_features) if num_vit else LayerNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.distillation = distillation
        self._make_heads(num_classes)
        self.apply(self._init_weights)
        self.pretrained_cfg = image_cfg(
            INPUT, in_chans, img_size, num_classes, first_conv="stem.conv1",
            classifier=("head", "head_dist") if distillation else "head", fixed_input_size=self.fixed_input_size,
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)



@torch.no_grad()
def merge_heads(model: nn.Module) -> None:
    """Replace ``head`` and ``head_dist`` by one linear computing their average, in place."""
    head, dist = model.head, model.head_dist
    if dist is None or not isinstance(head, nn.Linear):
        return
    merged = nn.Linear(head.in_features, head.out_features, device=head.weight.device, dtype=head.weight.dtype)
    merged.weight.copy_((head.weight + dist.weight) / 2)
    merged.bias.copy_((head.bias + dist.bias) / 2)
    model.head, model.head_dist = merged, None


# ------------------------------------------------------------------------------------------
# Key layouts


# Our keys are timm's ``efficientformer_l*`` keys; the persistent bias index buffers are the
# model's (they follow from the grid) and tables are resized bicubic, without antialiasing.
convert_timm = timm_converter(antialias=False)


def convert_official(sd: dict, model: nn.Module) -> dict:
    """Official release keys to ours.

    ``patch_embed.{0,1,3,4}`` -> ``stem.{conv1,norm1,conv2,norm2}``; ``network.{0,2,4,6}.J`` ->
    ``stages.{0,1,2,3}.blocks.J``; ``network.{1,3,5}.{proj,norm}`` ->
    ``stages.{1,2,3}.downsample.{conv,norm}``; ``layer_scale_N`` -> ``lsN.gamma``;
    ``dist_head`` -> ``head_dist``.
    """
    if not any(k.startswith("network.") for k in sd):
        raise NotThisLayout("not the official layout")
    stem = {"0": "conv1", "1": "norm1", "3": "conv2", "4": "norm2"}
    out = {}
    for key, v in sd.items():
        parts = key.split(".")
        if parts[0] == "patch_embed":
            parts[1] = stem[parts[1]]
            parts[0] = "stem"
        elif parts[0] == "network":
            idx = int(parts[1])
            if idx % 2 == 0:
                parts[:2] = ["stages", str(idx // 2), "blocks"]
            else:
                parts[:3] = ["stages", str((idx + 1) // 2), "downsample", {"proj": "conv", "norm": "norm"}[parts[2]]]
        elif parts[0] == "dist_head":
            parts[0] = "head_dist"
        key = re.sub(r"\blayer_scale_(\d)$", r"ls\1.gamma", ".".join(parts))
        out[key] = v
    return convert_timm(out, model)


# ------------------------------------------------------------------------------------------
# Registry

_PAPER = Paper(
    title="EfficientFormer: Vision Transformers at MobileNet Speed",
    arxiv="2206.01191",
    code="https://github.com/snap-research/EfficientFormer",
)

# name: (embed_dims, depths, num_vit, top-1, iPhone 12 ms, Google Drive id of the 300-epoch release)
_VARIANTS = {
    "l1": ((48, 96, 224, 448), (3, 2, 6, 4), 1, 79.2, 1.6, "1wtEmkshLFEYFsX5YhBttBOGYaRvDR7nu"),
    "l3": ((64, 128, 320, 512), (4, 4, 12, 6), 4, 82.4, 3.0, "1OyyjKKxDyMj-BcfInp4GlDdwLu3hc30m"),
    "l7": ((96, 192, 384, 768), (6, 6, 18, 8), 8, 83.3, 7.0, "1cVw-pctJwgvGafeouynqWWCwgkcoFMM5"),
}

for _v, (_dims, _depths, _vit, _top1, _ms, _drive) in _VARIANTS.items():
    register_model(
        ModelCard(
            name=f"efficientformer_{_v}",
            family="efficientformer",
            task="image-classification",
            paper=_PAPER,
            builder=EfficientFormer,
            config=dict(img_size=224, num_classes=1000, depths=_depths, embed_dims=_dims, num_vit=_vit),
            input=INPUT,
            feature_out_indices=4,
            metrics={
                "imagenet_top1": Metric(_top1, "%", "ImageNet-1k val", "paper Table 1 (arXiv 2206.01191)"),
                "iphone12_ms": Metric(_ms, "ms", "iPhone 12, CoreML, batch 1", "paper Table 1 (arXiv 2206.01191)"),
            },
            weights={
                "snap_dist_in1k": timm_hub_entry(f"efficientformer_{_v}", "snap_dist_in1k", "apache-2.0",
                                                 "ImageNet-1k with distillation, 224px"),
                "official": WeightEntry(
                    "official", f"manual:https://drive.google.com/file/d/{_drive}/view",
                    filename=f"efficientformer_{_v}_300d.pth", format="pytorch", layout="official",
                    license="apache-2.0",
                    description="ImageNet-1k, 300 epochs, the official release on Google Drive (state dict under 'model')",
                ),
            },
            default_tag="snap_dist_in1k",
            layouts={"zoo": convert_timm, "timm": convert_timm, "official": convert_official},
            head_keys=("head.", "head_dist."),
            license="apache-2.0",
            description="Pooling-mixer conv stages and a few attention blocks at the end; MobileNet-speed ViT.",
        )
    )
