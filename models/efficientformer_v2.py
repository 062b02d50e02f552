"""EfficientFormerV2 S0/S1/S2/L (Snap): ViTs at MobileNet size and speed.

Li et al., "Rethinking Vision Transformers for MobileNet Size and Speed", ICCV 2023,
arXiv 2212.08059. Official code: snap-research/EfficientFormer, ``models/efficientformer_v2.py``.

Architecture, as in the official code (all tensors ``[B, C, H, W]``):

- stem: two stride-2 3x3 Conv-BN-GELU (C/2 then C channels), grid ``ceil(img_size / 4)``;
- four stages; stages 2-3 start with a stride-2 3x3 Conv-BN; stage 4 starts with that conv
  plus an ``Attention2dDownsample`` branch (queries from a stride-2 depthwise conv plus a
  stride-2 subsampling, keys/values at full resolution, 8 heads of key dim 16);
- every block has an FFN: 1x1 Conv-BN-GELU, 3x3 depthwise Conv-BN-GELU, 1x1 Conv-BN, with a
  per-block expansion ratio, residual with layer scale;
- the last `num_vit` blocks of stages 3 and 4 put an ``Attention2d`` before the FFN: 8 heads
  of key dim 32 and value dim 128 from 1x1 Conv-BN projections, a LeViT bias table, talking
  heads (1x1 convs across heads before and after the softmax), a 3x3 depthwise Conv-BN on the
  values added to the output, GELU and a 1x1 Conv-BN projection. In stage 3 the attention
  runs on a stride-2 depthwise Conv-BN of its input and is upsampled back (bilinear);
- head: BatchNorm, global mean, a classifier and a distillation classifier averaged at
  inference.

Module names follow timm's port (``stem.conv1.conv``, ``stages.K.blocks.J.mlp.fc1.bn``,
``token_mixer.q.conv``, ``ls1.gamma``), so our key layout is timm's. timm has no converter
from the official release's layout; `convert_official` is ours.

Choices the official code leaves open, made configurable here:

- ``img_size``: attention grids follow the input size, and weights trained at another size
  get their bias tables resized at load: bicubic over the offset grid, ``align_corners=False``,
  no antialiasing (the interpolation the official detection backbone uses; it resizes the
  expanded ``[N, N]`` bias at run time, we resize the table once, which keeps the offset
  geometry and keeps bicubic out of exported graphs).
- ``drop_path_rate``: linear over all blocks, as the official code.

Deploy form (`EfficientFormerV2.reparameterize`): every BatchNorm folded into its conv (stem,
FFNs, downsampling, stride conv, q/k/v/local-value/output projections), layer scales folded
into the conv before them, the attention scale folded into the query conv, bias tables
expanded once and passed through the first talking-head conv (``th1(a + b) = th1(a) + W b``),
the stride-2 attention's bilinear upsampling done as two small matrix products, the final
BatchNorm (after a residual sum, nothing to fold into) turned into a per-channel affine, and
the two classifiers merged. Neither the official code nor timm has one. In eager float32 CPU
inference the deployed attentions run on token rows (``Attention2d._forward_rows``) with the
block's residual sum fused into the output projection; traced, exported or with hooks inside
they run the module path above.
"""

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale2d

from zoo.errors import ConfigError
from zoo.hub import NotThisLayout, WeightEntry, timm_hub_entry
from zoo.models.efficientformer import INPUT, DistilledClassifier, merge_heads
from zoo.models.cpu_kernels import DeployConv2d, DeploySequential, act_name, add_, eager_cpu_inference, hooked
from zoo.models.image_model import image_cfg
from zoo.models.layers import ChannelAffine, ConvNorm, bias_index, densify_bias, timm_converter
from zoo.nn import fold_scale_into_out_channels
from zoo.registry import Metric, ModelCard, Paper, register_model

__all__ = ["EfficientFormerV2", "convert_official", "convert_timm"]


def _conv_norm(in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
               act_layer: type[nn.Module] | None = None) -> ConvNorm:
    """Conv (with bias, as the official code) + BN (+ act), 'same'-style padding ``k // 2``."""
    return ConvNorm(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=True, act_layer=act_layer)


def _fused_conv(m: nn.Module) -> nn.Conv2d:
    """The conv of a fused `ConvNorm` (a Conv2d, or ``Sequential(conv, act)``)."""
    return m[0] if isinstance(m, nn.Sequential) else m


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> token rows ``[B*H*W, C]`` (a view of a channels-last map)."""
    b, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(b * h * w, c)


def _map(rows: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """Token rows ``[B*H*W, C]`` -> the ``[B, C, H, W]`` map with channels-last strides (a view)."""
    return rows.view(b, h, w, rows.shape[-1]).permute(0, 3, 1, 2)


def _rows_path_applies(module: nn.Module, x: torch.Tensor, add: torch.Tensor, side_in: int, side_out: int,
                       convs: Sequence[nn.Module]) -> bool:
    """The deployed attention's token-row path may serve ``module(x) + add``: `x` and `add` are
    the grids it was built for (``side_in``, ``side_out``), eager float32 CPU inference, every
    projection a `DeployConv2d` its channels-last kernels serve, and no hook anywhere inside
    `module` (the path calls no child module but its convs)."""
    if module.training or not module.deployed or x.dim() != 4 or add.dim() != 4:
        return False
    if x.shape[2:] != (side_in, side_in) or add.shape != (x.shape[0], convs[-1].out_channels, side_out, side_out):
        return False
    if not all(isinstance(c, DeployConv2d) for c in convs) or not eager_cpu_inference(x, convs[0].weight):
        return False
    return all(c._nhwc_applies(x) for c in convs) and not hooked(*module.modules())


def _heads_residual(out: torch.Tensor, o: torch.Tensor, heads: int) -> torch.Tensor:
    """``out [B*N, heads*d] += o [B, heads, N, d]`` rearranged to rows, in place; returns `out`."""
    b, _, n, d = o.shape
    out.view(b, n, heads, d).add_(o.permute(0, 2, 1, 3))
    return out


def _project_rows(module: nn.Module, out: torch.Tensor, add: torch.Tensor, b: int, side: int) -> torch.Tensor:
    """``module.proj(module.act(out)) + add`` for the attention rows ``out [B*side^2, h*d]`` (a
    fresh buffer the GELU overwrites), the sum fused into the projection; the ``[B, C, side,
    side]`` map with channels-last strides."""
    act = module.act
    out = torch._C._nn.gelu_(out, approximate=act.approximate) if isinstance(act, nn.GELU) else act(out)
    return _map(module.proj.forward_rows(out, add=_rows(add)), b, side, side)


class Attention2d(nn.Module):
    """Multi-head attention with talking heads and a local value conv, on ``[B, dim, H, W]``.

    With ``stride=2`` the attention runs on a stride-2 depthwise Conv-BN of the input (grid
    ``ceil(R / 2)``) and its output is upsampled x2 (bilinear, ``align_corners=False``), so the
    output is ``[B, dim, 2 * ceil(R / 2), ...]``, i.e. R for even R, as in the official code.
    """

    def __init__(self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4,
                 resolution: int = 7, act_layer: type[nn.Module] = nn.GELU, stride: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        if stride is not None:
            resolution = math.ceil(resolution / stride)
            self.stride_conv = _conv_norm(dim, dim, 3, stride, groups=dim)
            self.upsample = nn.Upsample(scale_factor=stride, mode="bilinear")
        else:
            self.stride_conv = None
            self.upsample = None
        self.resolution = resolution
        self.N = resolution * resolution
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        kh = key_dim * num_heads
        self.q = _conv_norm(dim, kh)
        self.k = _conv_norm(dim, kh)
        self.v = _conv_norm(dim, self.dh)
        self.v_local = _conv_norm(self.dh, self.dh, 3, groups=self.dh)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
        self.act = act_layer()
        self.proj = _conv_norm(self.dh, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, self.N))
        self.register_buffer("attention_bias_idxs", bias_index(resolution), persistent=False)
        self.deployed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        h, n = self.num_heads, self.N
        q = self.q(x).reshape(b, h, -1, n).transpose(-2, -1)
        k = self.k(x).reshape(b, h, -1, n)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(b, h, -1, n).transpose(-2, -1)
        if self.deployed:
            attn = self._deploy_scores(q, k)
        else:
            attn = (q @ k) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
            attn = self.talking_head1(attn)
        attn = self.talking_head2(attn.softmax(dim=-1))
        x = (attn @ v).transpose(2, 3).reshape(b, self.dh, self.resolution, self.resolution) + v_local
        if self.upsample is not None:
            x = self.upsample(x)
        return self.proj(self.act(x))

    @torch.jit.unused  # the deploy form is eager and exported, never scripted
    def _deploy_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # th1(s * qk + bias) with s in q and th1's weight applied to the bias once at fuse.
        return self.talking_head1(q @ k) + self.attention_bias_dense

    @torch.jit.unused
    def forward_add(self, x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        """``self(x) + add`` (`add` the output's shape). In eager CPU inference of the deploy form
        the attention runs on token rows (`_forward_rows`), with the sum fused into the output
        projection's product."""
        side = self.resolution * (1 if self.upsample is None else int(self.upsample.scale_factor))  # in and out
        if _rows_path_applies(self, x, add, side, side, (self.q, self.k, self.v, self.proj)):
            return self._forward_rows(x, add)
        return add_(self(x), add)

    def _forward_rows(self, x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        """The deploy form on token rows ``[B*N, C]``: the projections are row products, the
        heads strided views of them (no layout copies), the first talking head and the dense
        bias one ``addmm``, the local value conv's fresh output the buffer the heads are summed
        into, the bilinear upsampling PyTorch's channels-last kernel on those rows, GELU in
        place. Returns ``[B, dim, R_out, R_out]`` with channels-last strides."""
        b = x.shape[0]
        h, n, r = self.num_heads, self.N, self.resolution
        xs = x if self.stride_conv is None else self.stride_conv(x)
        t = _rows(xs)
        q = self.q.forward_rows(t).view(b, n, h, -1).permute(0, 2, 1, 3)  # [B, h, N, kd]
        k = self.k.forward_rows(t).view(b, n, h, -1).permute(0, 2, 3, 1)  # [B, h, kd, N]
        v = self.v.forward_rows(t)  # [B*N, h*d]
        out = _rows(self.v_local(_map(v, b, r, r)))  # a fresh [B*N, h*d]: the heads are added into it
        w1 = self.talking_head1.weight.view(h, h)
        bias = self.attention_bias_dense.view(h, n * n)
        scores = torch.matmul(q, k).view(b, h, n * n)
        if b == 1:
            attn = torch.addmm(bias, w1, scores[0]).view(1, h, n, n)
        else:
            attn = torch.matmul(w1, scores).add_(bias).view(b, h, n, n)
        attn = attn.softmax(dim=-1).view(b, h, n * n)
        w2, b2 = self.talking_head2.weight.view(h, h), self.talking_head2.bias.view(h, 1)
        attn = (torch.addmm(b2, w2, attn[0]) if b == 1 else torch.matmul(w2, attn).add_(b2)).view(b, h, n, n)
        out = _heads_residual(out, torch.matmul(attn, v.view(b, n, h, -1).permute(0, 2, 1, 3)), h)
        ro = r
        if self.upsample is not None:  # PyTorch's channels-last bilinear kernel, on the rows' own memory
            ro = r * self.upsample.scale_factor
            out = _rows(F.interpolate(_map(out, b, r, r), scale_factor=self.upsample.scale_factor, mode="bilinear",
                                      align_corners=False))
        return _project_rows(self, out, add, b, ro)

    @torch.no_grad()
    def fuse(self) -> "Attention2d":
        """Deploy form; children (Conv-BN pairs) must already be fused (see `fuse_modules`)."""
        if self.deployed:
            return self
        q = _fused_conv(self.q)
        fold_scale_into_out_channels(q, torch.full((q.out_channels,), self.scale))
        densify_bias(self)
        w = self.talking_head1.weight.view(self.num_heads, self.num_heads)
        dense = torch.einsum("gh,hqk->gqk", w, self.attention_bias_dense) + self.talking_head1.bias.view(-1, 1, 1)
        self.attention_bias_dense = dense.contiguous()
        self.talking_head1.bias = None
        if self.upsample is not None:
            self.upsample = MatmulUpsample(self.resolution, int(self.upsample.scale_factor)).to(dense)
        self.deployed = True
        return self


class MatmulUpsample(nn.Module):
    """``nn.Upsample(scale_factor, mode="bilinear")`` (``align_corners=False``) of an ``R x R``
    input as two small matrix products, ``U @ x @ U^T`` with ``U`` ``[R*s, R]``.

    Bilinear resampling is separable; ``U`` is built by resampling the identity with PyTorch's
    own linear interpolation, so the weights are exactly PyTorch's. Used by the deploy form:
    on the CPU ``upsample_bilinear2d`` copies its input through a slow layout change, which
    two small products avoid.
    """

    def __init__(self, resolution: int, scale_factor: int):
        super().__init__()
        eye = torch.eye(resolution).unsqueeze(0)  # [1, R (channels), R (length)]
        u = F.interpolate(eye, scale_factor=scale_factor, mode="linear", align_corners=False)[0].T
        self.register_buffer("u", u.contiguous())  # [R * s, R]
        self.register_buffer("ut", u.T.contiguous())
        self.scale_factor = scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.u, x), self.ut)


class LocalGlobalQuery(nn.Module):
    """Queries at half resolution: stride-2 depthwise 3x3 conv + stride-2 subsampling, then 1x1 Conv-BN."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.pool = nn.AvgPool2d(1, 2, 0)
        self.local = nn.Conv2d(in_dim, in_dim, 3, stride=2, padding=1, groups=in_dim)
        self.proj = _conv_norm(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.local(x) + self.pool(x))


class Attention2dDownsample(nn.Module):
    """Attention from an ``R x R`` grid to its ``ceil(R / 2)`` subsampling. ``[B, dim, R, R]`` -> ``[B, out_dim, R', R']``."""

    def __init__(self, dim: int, key_dim: int = 16, num_heads: int = 8, attn_ratio: float = 4, resolution: int = 7,
                 out_dim: int | None = None, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.resolution = resolution
        self.resolution2 = math.ceil(resolution / 2)
        self.N = resolution * resolution
        self.N2 = self.resolution2 * self.resolution2
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.out_dim = out_dim or dim
        kh = key_dim * num_heads
        self.q = LocalGlobalQuery(dim, kh)
        self.k = _conv_norm(dim, kh)
        self.v = _conv_norm(dim, self.dh)
        self.v_local = _conv_norm(self.dh, self.dh, 3, 2, groups=self.dh)
        self.act = act_layer()
        self.proj = _conv_norm(self.dh, self.out_dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, self.N))
        self.register_buffer("attention_bias_idxs", bias_index(resolution, query_stride=2), persistent=False)
        self.deployed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.num_heads
        q = self.q(x).reshape(b, h, -1, self.N2).transpose(-2, -1)
        k = self.k(x).reshape(b, h, -1, self.N)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(b, h, -1, self.N).transpose(-2, -1)
        if self.deployed:
            attn = self._deploy_scores(q, k)
        else:
            attn = (q @ k) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(2, 3).reshape(b, self.dh, self.resolution2, self.resolution2) + v_local
        return self.proj(self.act(x))

    @torch.jit.unused  # the deploy form is eager and exported, never scripted
    def _deploy_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q @ k + self.attention_bias_dense

    @torch.jit.unused
    def forward_add(self, x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        """``self(x) + add`` (`add` the output's shape); in eager CPU inference of the deploy form
        on token rows, as `Attention2d.forward_add`."""
        if _rows_path_applies(self, x, add, self.resolution, self.resolution2, (self.k, self.v, self.q.proj, self.proj)):
            return self._forward_rows(x, add)
        return add_(self(x), add)

    def _forward_rows(self, x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        """The deploy form on token rows (see `Attention2d._forward_rows`); the queries' local
        conv output takes the stride-2 subsampling in place, the scores and the dense bias are
        one ``baddbmm`` at batch 1. Returns ``[B, out_dim, R', R']``, channels-last strides."""
        b = x.shape[0]
        h, n, n2, r2 = self.num_heads, self.N, self.N2, self.resolution2
        local = self.q.local(x).add_(x[:, :, ::2, ::2])  # q.pool (AvgPool2d(1, 2)) is this subsampling
        q = self.q.proj.forward_rows(_rows(local)).view(b, n2, h, -1).permute(0, 2, 1, 3)  # [B, h, N2, kd]
        t = _rows(x)
        k = self.k.forward_rows(t).view(b, n, h, -1).permute(0, 2, 3, 1)  # [B, h, kd, N]
        v = self.v.forward_rows(t)  # [B*N, h*d]
        out = _rows(self.v_local(_map(v, b, self.resolution, self.resolution)))  # fresh [B*N2, h*d]
        if b == 1:
            attn = torch.baddbmm(self.attention_bias_dense, q[0], k[0]).unsqueeze(0)
        else:
            attn = torch.matmul(q, k).add_(self.attention_bias_dense)
        attn = attn.softmax(dim=-1)
        out = _heads_residual(out, torch.matmul(attn, v.view(b, n, h, -1).permute(0, 2, 1, 3)), h)
        return _project_rows(self, out, add, b, r2)

    @torch.no_grad()
    def fuse(self) -> "Attention2dDownsample":
        if self.deployed:
            return self
        q = _fused_conv(self.q.proj)
        fold_scale_into_out_channels(q, torch.full((q.out_channels,), self.scale))
        densify_bias(self)
        self.deployed = True
        return self


class Downsample(nn.Module):
    """Stride-2 3x3 Conv-BN, plus an `Attention2dDownsample` branch when `use_attn`."""

    def __init__(self, in_chs: int, out_chs: int, resolution: int, use_attn: bool, act_layer: type[nn.Module]):
        super().__init__()
        self.conv = _conv_norm(in_chs, out_chs, 3, 2)
        self.attn = Attention2dDownsample(in_chs, resolution=resolution, out_dim=out_chs, act_layer=act_layer) if use_attn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.attn is None:
            return out
        # forward_add is eager-only (jit.unused): the scripted training form takes the plain sum
        return self.attn.forward_add(x, out) if self.attn.deployed else self.attn(x) + out


class ConvMlpWithNorm(nn.Module):
    """FFN: 1x1 Conv-BN-GELU, 3x3 depthwise Conv-BN-GELU, 1x1 Conv-BN. Keys ``fc1``, ``mid``, ``fc2``.

    ``[B, dim, H, W]`` in and out.
    """

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = _conv_norm(dim, hidden, act_layer=act_layer)
        self.mid = _conv_norm(hidden, hidden, 3, groups=hidden, act_layer=act_layer)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = _conv_norm(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.mid(self.fc1(x)))))

    @torch.jit.unused  # the deploy form is eager and exported, never scripted
    def forward_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + self(x)``. In eager CPU inference of the deploy form (each Conv-BN fused, no
        hooks), the GELUs run fused into their convs' oneDNN kernels and the residual sum
        into the last 1x1 conv's product, which saves a pass over each activation map."""
        convs = self._deployed_convs()
        if convs is None or not eager_cpu_inference(x, convs[0].weight):
            return add_(self(x), x)
        fc1, mid, fc2, act1, act2 = convs
        return fc2.forward_add(mid.forward_act(fc1.forward_act(x, act1), act2), x)

    def _deployed_convs(self):
        """``(fc1, mid, fc2, act1, act2)`` when the fused path applies, else None."""
        fc1, mid, fc2 = self.fc1, self.mid, self.fc2
        if self.training or not (isinstance(fc1, DeploySequential) and isinstance(mid, DeploySequential)
                                 and isinstance(fc2, DeployConv2d) and len(fc1) == len(mid) == 2):
            return None
        act1, act2 = act_name(fc1[1]), act_name(mid[1])
        if (act1 is None or act2 is None or not isinstance(fc1[0], DeployConv2d) or not isinstance(mid[0], DeployConv2d)
                or hooked(self, fc1, mid, fc2, fc1[0], fc1[1], mid[0], mid[1], self.drop1, self.drop2)):
            return None
        return fc1[0], mid[0], fc2, act1, act2


class EfficientFormerV2Block(nn.Module):
    """Optional attention (residual, layer scale), then the FFN (residual, layer scale)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-5, resolution: int = 7,
                 stride: int | None = None, use_attn: bool = True):
        super().__init__()
        if use_attn:
            self.token_mixer = Attention2d(dim, resolution=resolution, act_layer=act_layer, stride=stride)
            self.ls1 = LayerScale2d(dim, layer_scale_init_value)
            self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        else:
            self.token_mixer = self.ls1 = self.drop_path1 = None
        self.mlp = ConvMlpWithNorm(dim, int(dim * mlp_ratio), act_layer, drop)
        self.ls2 = LayerScale2d(dim, layer_scale_init_value)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.deployed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_mixer is not None:
            if self.deployed and not self.training:
                x = self._mixer_residual(x)
            else:
                x = add_(self.drop_path1(self.ls1(self.token_mixer(x))), x)
        if self.deployed and not self.training:  # ls2 folded into fc2, drop path off in eval
            return self.mlp.forward_residual(x)
        return add_(self.drop_path2(self.ls2(self.mlp(x))), x)

    @torch.jit.unused  # the deploy form is eager and exported, never scripted
    def _mixer_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + token_mixer(x)`` of the deploy form (ls1 folded into the projection, drop path
        off in eval), through the attention's token-row path where it applies."""
        if hooked(self.ls1, self.drop_path1):
            return add_(self.drop_path1(self.ls1(self.token_mixer(x))), x)
        return self.token_mixer.forward_add(x, x)

    @torch.no_grad()
    def fuse(self) -> "EfficientFormerV2Block":
        if isinstance(self.ls2, LayerScale2d):
            fold_scale_into_out_channels(_fused_conv(self.mlp.fc2), self.ls2.gamma)
            self.ls2 = nn.Identity()
        if isinstance(self.ls1, LayerScale2d):
            fold_scale_into_out_channels(_fused_conv(self.token_mixer.proj), self.ls1.gamma)
            self.ls1 = nn.Identity()
        self.deployed = True
        return self


class Stem4(nn.Sequential):
    """Two stride-2 3x3 Conv-BN-act. Keys ``conv1.{conv,bn}``, ``conv2.{conv,bn}``."""

    def __init__(self, in_chs: int, out_chs: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.conv1 = _conv_norm(in_chs, out_chs // 2, 3, 2, act_layer=act_layer)
        self.conv2 = _conv_norm(out_chs // 2, out_chs, 3, 2, act_layer=act_layer)


class EfficientFormerV2Stage(nn.Module):
    """Optional downsampling, then `depth` blocks; with `use_attn`, the last `num_vit` have attention."""

    def __init__(self, dim: int, dim_out: int, depth: int, resolution: int, downsample: bool, downsample_attn: bool,
                 block_stride: int | None, use_attn: bool, num_vit: int, mlp_ratio: Sequence[float],
                 drop: float, drop_path: Sequence[float], layer_scale_init_value: float, act_layer: type[nn.Module]):
        super().__init__()
        if downsample:
            self.downsample = Downsample(dim, dim_out, resolution, downsample_attn, act_layer)
            resolution = math.ceil(resolution / 2)
        else:
            self.downsample = nn.Identity()
        self.resolution = resolution
        self.blocks = nn.Sequential(*[
            EfficientFormerV2Block(
                dim_out, mlp_ratio[i], act_layer, drop, drop_path[i], layer_scale_init_value, resolution,
                block_stride, use_attn=use_attn and i >= depth - num_vit,
            )
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class EfficientFormerV2(DistilledClassifier, nn.Module):
    """EfficientFormerV2 classifier / backbone. Input ``[B, in_chans, img_size, img_size]``.

    Args:
        img_size: input side; fixes the attention grids (``ceil(img_size / 16)`` and ``/ 32``).
        depths, embed_dims: per stage.
        mlp_ratios: per stage, one ratio or one per block (the searched expansion ratios).
        num_vit: how many of the last blocks of stages 3 and 4 have attention.
        attn_stages: stage indices whose blocks may have attention (3 and 4: ``(2, 3)``).
        downsample_attn_stages: stages whose downsampling has the attention branch (``(3,)``).
        stride_attn_stages: stages whose attention runs at stride 2 (``(2,)``).
        layer_scale_init_value: initial layer scale.
        num_classes: classifier outputs; 0 for a backbone returning pooled features.
        distillation: keep the distillation classifier ``head_dist`` (the released weights have it).
        drop_rate: dropout before the classifiers; proj_drop_rate: dropout in the FFNs.
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks.

    Outputs: ``forward`` -> ``[B, num_classes]``; ``forward_features`` -> ``[B, C, H, W]``
    after the final BatchNorm (7x7 at 224).
    """

    int8_rule = {"op_types": ("Conv", "MatMul", "Gemm"), "float_activation_matmul": True,
                 "note": "convolutions and products with weights; attention's activation products, norms, GELU "
                         "and softmax float"}

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 2, 6, 4),
        embed_dims: Sequence[int] = (32, 48, 96, 176),
        mlp_ratios: Sequence[float | Sequence[float]] = (4, 4, (4, 3, 3, 3, 4, 4), (4, 3, 3, 4)),
        num_vit: int = 2,
        attn_stages: Sequence[int] = (2, 3),
        downsample_attn_stages: Sequence[int] = (3,),
        stride_attn_stages: Sequence[int] = (2,),
        layer_scale_init_value: float = 1e-5,
        distillation: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if not isinstance(img_size, int) or img_size < 32:
            raise ConfigError(f"img_size must be an int of at least 32 (got {img_size!r}).")
        n = len(depths)
        if len(embed_dims) != n or len(mlp_ratios) != n:
            raise ConfigError("depths, embed_dims and mlp_ratios need one entry per stage.")
        ratios = []
        for i, r in enumerate(mlp_ratios):
            r = tuple(r) if isinstance(r, Sequence) else (r,) * depths[i]
            if len(r) != depths[i]:
                raise ConfigError(f"stage {i} has {depths[i]} blocks but {len(r)} MLP ratios.")
            ratios.append(r)
        for i in stride_attn_stages:
            grid = math.ceil(img_size / 2 ** (i + 2))
            if i in attn_stages and num_vit and grid % 2:
                raise ConfigError(
                    f"img_size={img_size} gives stage {i + 1} an odd grid ({grid}), which its stride-2 attention "
                    "cannot upsample back to; use a multiple of 32."
                )
        self.img_size = img_size
        self.fixed_input_size = True
        self.head_on_tokens = False
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.distilled_training = False
        self.grad_checkpointing = False
        self.deployed = False

        act_layer = nn.GELU
        self.stem = Stem4(in_chans, embed_dims[0], act_layer)
        resolution = math.ceil(img_size / 4)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, self.feature_info, prev, stride = [], [], embed_dims[0], 4
        for i in range(n):
            stage = EfficientFormerV2Stage(
                prev, embed_dims[i], depths[i], resolution, downsample=i > 0,
                downsample_attn=i in downsample_attn_stages, block_stride=2 if i in stride_attn_stages else None,
                use_attn=i in attn_stages, num_vit=num_vit, mlp_ratio=ratios[i], drop=proj_drop_rate,
                drop_path=rates[sum(depths[:i]): sum(depths[: i + 1])],
                layer_scale_init_value=layer_scale_init_value, act_layer=act_layer,
            )
            resolution = stage.resolution
            stride *= 2 if i > 0 else 1
            stages.append(stage)
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f"stages.{i}"))
            prev = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.feature_resolution = resolution
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.distillation = distillation
        self._make_heads(num_classes)
        self.pretrained_cfg = image_cfg(
            INPUT, in_chans, img_size, num_classes, first_conv="stem.conv1.conv",
            classifier=("head", "head_dist") if distillation else "head", fixed_input_size=True,
            pool_size=(resolution, resolution),
        )

    # --- deploy form (`ImageModel.reparameterize`; see the module docstring) ---------------
    def _fold_for_deploy(self) -> None:
        if isinstance(self.norm, nn.BatchNorm2d):  # follows a residual sum: nothing to fold into
            self.norm = ChannelAffine.from_bn(self.norm)
        merge_heads(self)


# ------------------------------------------------------------------------------------------
# Key layouts


# Our keys are timm's ``efficientformerv2_*`` keys; bias tables resized bicubic, no antialiasing.
convert_timm = timm_converter(antialias=False)


_MLP = {"fc1": "fc1.conv", "norm1": "fc1.bn", "mid": "mid.conv", "mid_norm": "mid.bn", "fc2": "fc2.conv", "norm2": "fc2.bn"}
_SEQ = {"0": "conv", "1": "bn"}
_PROJ = {"1": "conv", "2": "bn"}  # the official projection is Sequential(act, conv, bn)


def _rename_attention(parts: list[str]) -> list[str]:
    """Official ``Attention4D`` / ``Attention4DDownsample`` sub-keys -> ours (``parts`` after the module)."""
    head = parts[0]
    if head in ("q", "k", "v", "v_local", "stride_conv"):
        if head == "q" and parts[1] in ("local", "proj"):  # LGQuery
            if parts[1] == "local":  # Sequential(conv)
                return ["q", "local", parts[-1]]
            return ["q", "proj", _SEQ[parts[2]], parts[-1]]
        return [head, _SEQ[parts[1]], parts[-1]]
    if head == "proj":
        return ["proj", _PROJ[parts[1]], parts[-1]]
    return parts


def convert_official(sd: dict, model: nn.Module) -> dict:
    """Official release keys to ours (timm has no such converter).

    - ``patch_embed.{0,1,3,4}`` -> ``stem.conv1.{conv,bn}``, ``stem.conv2.{conv,bn}``;
    - ``network.{0,2,4,6}.J`` -> ``stages.{0..3}.blocks.J``; ``network.{1,3,5}`` ->
      ``stages.{1,2,3}.downsample``, whose ``proj/norm`` (or ``conv/bn`` with attention) become
      ``conv.{conv,bn}``;
    - Sequential indices to names: ``q.0/.1`` -> ``q.conv/.bn`` (same for k, v, v_local,
      stride_conv, LGQuery's ``proj``), ``q.local.0`` -> ``q.local``, ``proj.1/.2`` ->
      ``proj.conv/.bn`` (its ``.0`` is the activation);
    - MLP: ``fc1, norm1, mid, mid_norm, fc2, norm2`` -> ``fc1.conv, fc1.bn, mid.conv, mid.bn,
      fc2.conv, fc2.bn``;
    - ``layer_scale_N`` ``[C, 1, 1]`` -> ``lsN.gamma`` ``[C]``; ``dist_head`` -> ``head_dist``;
      the ``attention_bias_idxs`` buffers are dropped (they follow from the grid).
    """
    if not any(k.startswith("network.") for k in sd):
        raise NotThisLayout("not the official layout")
    stem = {"0": ["conv1", "conv"], "1": ["conv1", "bn"], "3": ["conv2", "conv"], "4": ["conv2", "bn"]}
    out = {}
    for key, v in sd.items():
        if key.endswith("attention_bias_idxs"):
            continue
        parts = key.split(".")
        if parts[0] == "patch_embed":
            parts = ["stem", *stem[parts[1]], parts[-1]]
        elif parts[0] == "network":
            idx = int(parts[1])
            if idx % 2 == 0:
                stage, block, rest = idx // 2, parts[2], parts[3:]
                prefix = ["stages", str(stage), "blocks", block]
                if rest[0].startswith("layer_scale_"):
                    parts, v = prefix + [f"ls{rest[0][-1]}", "gamma"], v.reshape(-1)
                elif rest[0] == "mlp":
                    parts = prefix + ["mlp", *_MLP[rest[1]].split("."), rest[-1]]
                elif rest[0] == "token_mixer":
                    parts = prefix + ["token_mixer", *_rename_attention(rest[1:])]
                else:
                    parts = prefix + rest
            else:
                prefix = ["stages", str((idx + 1) // 2), "downsample"]
                rest = parts[2:]
                if rest[0] in ("proj", "conv"):
                    parts = prefix + ["conv", "conv", rest[-1]]
                elif rest[0] in ("norm", "bn"):
                    parts = prefix + ["conv", "bn", rest[-1]]
                elif rest[0] == "attn":
                    parts = prefix + ["attn", *_rename_attention(rest[1:])]
                else:
                    raise NotThisLayout(f"{key} is no key of the official layout")
        elif parts[0] == "dist_head":
            parts[0] = "head_dist"
        out[".".join(parts)] = v
    return convert_timm(out, model)


# ------------------------------------------------------------------------------------------
# Registry

_PAPER = Paper(
    title="Rethinking Vision Transformers for MobileNet Size and Speed",
    arxiv="2212.08059",
    code="https://github.com/snap-research/EfficientFormer",
)

# name: (embed_dims, depths, num_vit, per-block expansion ratios of stages 3 and 4,
#        drop_path_rate used in training, top-1, iPhone 12 ms, release page or Drive file)
_VARIANTS = {
    "s0": ((32, 48, 96, 176), (2, 2, 6, 4), 2, ((4, 3, 3, 3, 4, 4), (4, 3, 3, 4)), 0.0, 75.7, 0.9,
           "https://drive.google.com/file/d/1PXb7b9pv9ZB4cfkRkYEdwgWuVwvEiazq/view"),
    "s1": ((32, 48, 120, 224), (3, 3, 9, 6), 2, ((4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)), 0.0, 79.0, 1.1,
           "https://drive.google.com/file/d/1EKe1vt-3mG7iceVIMaET_DyISzVTJMn8/view"),
    "s2": ((32, 64, 144, 288), (4, 4, 12, 8), 4,
           ((4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4)), 0.02, 81.6, 1.6,
           "https://drive.google.com/file/d/1gjbFyB5T_yAkmzHNuXEljqScYVQZafMQ/view"),
    "l": ((40, 80, 192, 384), (5, 5, 15, 10), 6,
          ((4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 4, 3, 3, 3, 3, 4, 4, 4)), 0.1, 83.3, 2.7,
          "https://github.com/snap-research/EfficientFormer#models"),
}

for _v, (_dims, _depths, _vit, (_r3, _r4), _dpr, _top1, _ms, _page) in _VARIANTS.items():
    register_model(
        ModelCard(
            name=f"efficientformerv2_{_v}",
            family="efficientformer",
            task="image-classification",
            paper=_PAPER,
            builder=EfficientFormerV2,
            config=dict(img_size=224, num_classes=1000, depths=_depths, embed_dims=_dims,
                        mlp_ratios=(4, 4, _r3, _r4), num_vit=_vit, drop_path_rate=_dpr),
            input=INPUT,
            feature_out_indices=(0, 1, 2, 3),
            metrics={
                "imagenet_top1": Metric(_top1, "%", "ImageNet-1k val", "paper Table 2 (arXiv 2212.08059)"),
                "iphone12_ms": Metric(_ms, "ms", "iPhone 12, CoreML, batch 1", "paper Table 2 (arXiv 2212.08059)"),
            },
            weights={
                "snap_dist_in1k": timm_hub_entry(f"efficientformerv2_{_v}", "snap_dist_in1k", "apache-2.0",
                                                 "ImageNet-1k with distillation, 224px"),
                "official": WeightEntry(
                    "official", f"manual:{_page}", filename=f"eformer_{_v}_450.pth", format="pytorch",
                    layout="official", license="apache-2.0",
                    description="ImageNet-1k, 450 epochs, the official release (state dict under 'model')",
                ),
            },
            default_tag="snap_dist_in1k",
            layouts={"zoo": convert_timm, "timm": convert_timm, "official": convert_official},
            head_keys=("head.", "head_dist."),
            license="apache-2.0",
            description="Searched hybrid: DW-conv FFNs everywhere, talking-head attention in stages 3-4.",
        )
    )
