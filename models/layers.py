"""Layers shared by the image families, and the deploy-time folding they support.

Folding (``fuse()``) is inference-only: it bakes BatchNorm running statistics into the
preceding (or following, for `NormLinear`) conv/linear weights, so the result computes the
eval-mode function with fewer ops. `fuse_modules` applies every ``fuse()`` in a tree,
children first, which lets a parent fold what its children became (e.g. a residual around a
depthwise conv folds the identity into the kernel's centre tap).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

__all__ = [
    "ConvNorm",
    "bias_index",
    "resize_bias_tables",
    "densify_bias",
    "fold_scale_into_out_channels",
    "DeployConv2d",
    "DeployLinear",
    "nchw_fallback",
    "KernelCache",
    "kernel_cache",
    "prepacked_linear",
    "onednn_applies",
    "use_deploy_kernels",
    "NormLinear",
    "Residual",
    "fuse_conv_bn",
    "fuse_bn_linear",
    "fold_identity_into_dwconv",
    "fuse_modules",
    "ChannelAffine",
    "mul_add",
    "add_",
    "can_write_inplace",
    "DeployGELU",
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


@torch.no_grad()
def fold_scale_into_out_channels(layer: nn.Module, scale: torch.Tensor) -> None:
    """Make a Conv2d/Linear compute ``scale * layer(x)`` (``scale`` per output channel), in place.

    Used to absorb a layer scale (or the attention scale) that follows a fused projection.
    """
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(scale.reshape(shape))
    if layer.bias is not None:
        layer.bias.mul_(scale.reshape(-1))


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


def fuse_modules(module: nn.Module) -> nn.Module:
    """Replace, children first, every submodule that has ``fuse()`` by what it returns."""
    for name, child in list(module.named_children()):
        fuse_modules(child)
        if hasattr(child, "fuse"):
            setattr(module, name, child.fuse())
    return module



def _graph_capture() -> bool:
    """True while tracing, scripting, compiling or exporting: then only standard ops are used."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def can_write_inplace(t: torch.Tensor) -> bool:
    """True when eager inference may overwrite `t` (a fresh intermediate): no graph capture and
    no autograd history to keep. Deploy forms use it to allocate fewer large buffers, which on
    the CPU costs page faults (PyTorch's CPU allocator does not cache)."""
    return not _graph_capture() and not (torch.is_grad_enabled() and t.requires_grad)


def eager_cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when a deploy-form fast path may run: eager mode (no tracing, scripting, compiling
    or exporting), a CPU input, and no autograd graph to record through `x` or `weight`."""
    return x.is_cpu and can_write_inplace(x) and not (torch.is_grad_enabled() and weight.requires_grad)


def add_(branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + branch``, written into `branch` (a fresh intermediate) when `can_write_inplace`."""
    return branch.add_(x) if can_write_inplace(branch) and branch.shape == x.shape else x + branch


class DeployGELU(nn.GELU):
    """`nn.GELU` that overwrites its input (a fresh intermediate) in eager inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if can_write_inplace(x):
            return torch._C._nn.gelu_(x, approximate=self.approximate)
        return super().forward(x)


def mul_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a + b * c``: one fused ``addcmul`` in eager mode; plain mul and add in captured graphs,
    because CoreML has no ``addcmul``."""
    return a + b * c if _graph_capture() else torch.addcmul(a, b, c)


def _onednn_ops_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, n) for n in ("_convolution_pointwise", "_reorder_convolution_weight",
                                  "_linear_pointwise", "_reorder_linear_weight"))


# PyTorch's own fused oneDNN inference ops (the ones its compiler emits for frozen CPU graphs).
# They are private, so every use is guarded by this flag and falls back to the public ops.
_ONEDNN = _onednn_ops_available()
if _ONEDNN:  # resolved once: each ``torch.ops`` attribute lookup costs about a microsecond
    _LINEAR = torch.ops.mkldnn._linear_pointwise.default
    _LINEAR_ADD = torch.ops.mkldnn._linear_pointwise.binary
    _CONV = torch.ops.mkldnn._convolution_pointwise.default


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the oneDNN kernels with prepacked weights may serve this call: the ops exist
    in this PyTorch build and both tensors are float32 (the one dtype the paths are tested for)."""
    return _ONEDNN and x.dtype == torch.float32 and weight.dtype == torch.float32


class KernelCache(dict):
    """Tensors derived from one layer's weight for its fast kernels (prepacked oneDNN weights,
    dense depthwise matrices), keyed by what they depend on besides the weight (input rows or
    shape, layout, dtype). Each entry remembers the weight it was built from (the tensor, its
    storage and its version counter) and is rebuilt when any of these changed, so in-place
    edits, ``.data`` swaps, new Parameters and moves are all seen.

    Not parameters or buffers: never in the state dict, never exported. A deepcopy or pickle of
    the layer starts with an empty cache (prepacked oneDNN tensors cannot be copied), and at
    most `max_entries` keys are kept per layer.
    """

    max_entries = 4

    def __deepcopy__(self, memo) -> "KernelCache":
        return type(self)()

    def __reduce__(self):
        return type(self), ()

    def get_or_build(self, key, weight: torch.Tensor, build):
        """The tensor cached under `key`, built by ``build()`` (under no_grad) if missing or if
        `weight` is not what it was built from; a build returning None is not cached. Inference
        tensors keep no version counter, so for them only the tensor and storage are compared."""
        entry = self.get(key)
        version = -1 if weight.is_inference() else weight._version
        if entry is None or entry[0] is not weight or entry[1] != version or entry[2] != weight.data_ptr():
            if entry is None and len(self) >= self.max_entries:
                self.clear()
            with torch.no_grad():
                value = build()
            if value is None:  # nothing to cache: the caller has no fast form for this key
                return None
            entry = self[key] = (weight, version, weight.data_ptr(), value)
        return entry[3]


def kernel_cache(module: nn.Module) -> KernelCache:
    """`module`'s `KernelCache`, created on first use (kept out of the module's registries)."""
    cache = module.__dict__.get("_kernel_cache")
    if cache is None:
        cache = module.__dict__["_kernel_cache"] = KernelCache()
    return cache


def prepacked_linear(
    layer: nn.Module, x: torch.Tensor, tag: str, act: str = "none", add: torch.Tensor | None = None
) -> torch.Tensor:
    """``act(x @ W.T + layer.bias) + add`` through oneDNN for ``x [..., in]``, where ``W [out,
    in]`` is `layer`'s weight (a Linear's, or a 1x1 conv's ``[out, in, 1, 1]``), reordered once
    per number of rows of `x` and kept in `layer`'s `KernelCache` under `tag`. `act` is
    ``"none"`` or ``"relu"``, fused; `add` (the output's shape, only without an `act`) is
    fused too. Call only where `eager_cpu_inference` and `onednn_applies` hold."""
    rows = x.numel() // x.shape[-1]
    params = layer._parameters
    weight = params["weight"]
    packed = kernel_cache(layer).get_or_build(
        (tag, rows), weight,
        lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach().reshape(weight.shape[0], -1), rows))
    if add is not None:
        return _LINEAR_ADD(x, add.contiguous(), packed, params["bias"], "add")
    return _LINEAR(x, packed, params["bias"], act, [], "")


def _is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor stored channels-last (and not also plain contiguous, as when H = W = 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class DeployConv2d(nn.Conv2d):
    """An `nn.Conv2d` (same parameters, same function) with faster eager CPU kernels.

    Small ViTs run hundreds of small convolutions, where the stock ``F.conv2d`` spends tens of
    microseconds per call reordering the weight into oneDNN's blocked layout whatever the
    arithmetic (measured on 2 cores: a 3x3 depthwise conv on 192 x 14 x 14, 56 us stock
    against 34 us with the weight prepacked once). In eager float32 inference on the CPU this
    module instead computes

    - a 1x1, stride-1, ungrouped conv of more than `onednn_rows_min_macs` multiply-adds on a
      channels-last input as one oneDNN product of its ``[B*H*W, Ci]`` rows with the weight
      prepacked, bias fused; the output is channels-last too, so chains stay in that layout;
    - such a conv at batch 1 on an NCHW input as one oneDNN product ``W @ X``
      (``X = x.view(Ci, H*W)``), then the bias, giving NCHW; both oneDNN products are 1.5-2x
      MKL's ``addmm`` at 2-30M MACs (2 cores, AVX-512);
    - a smaller 1x1 conv, or one at batch > 1 of at most `matmul_max_macs` multiply-adds per
      image or `matmul_max_input` input values, as ``torch.matmul`` / ``addmm``;
    - a stride-1 depthwise conv with 'same' zero padding on a grid of at most
      `dense_max_tokens` positions as one batched product with a dense per-channel
      ``[H*W, H*W]`` matrix built from the kernel (capped at `dense_max_bytes` per layer);
    - any other conv through oneDNN with its weight reordered once for the input's shape
      (``torch.ops.mkldnn._convolution_pointwise``), which returns channels-last memory.

    So in eager inference a deploy-form model passes channels-last (NCHW-shaped, NHWC-strided)
    tensors between many layers: values are the same, but code outside the model should use
    ``reshape``, not ``view``, on features it takes from one.

    Derived weights live in the layer's `KernelCache`. Anything else, and always while
    tracing, scripting, compiling or exporting, on other devices or dtypes, or when autograd
    needs the weights, is the plain ``nn.Conv2d`` forward.
    """

    dense_max_tokens = 49
    dense_max_bytes = 256 << 10
    matmul_max_macs = 8_000_000
    matmul_max_input = 20480
    onednn_matmul_min_macs = 2_000_000
    onednn_rows_min_macs = 1_000_000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not eager_cpu_inference(x, self.weight):
            return super().forward(x)
        y = self._forward_fast(x)
        return super().forward(x) if y is None else y

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fast paths, or None where the stock convolution is the only choice."""
        b, c, h, w = x.shape
        onednn = onednn_applies(x, self.weight)
        if self._is_pointwise():
            macs = c * self.out_channels * h * w
            weight = self.weight.view(self.out_channels, c)
            if onednn and macs > self.onednn_rows_min_macs and _is_channels_last(x):
                # Rows in, rows out: [B*H*W, Ci] @ W.T with the weight prepacked, bias fused;
                # the result is the NCHW tensor with channels-last strides, as oneDNN convs give.
                y = prepacked_linear(self, x.permute(0, 2, 3, 1).reshape(b * h * w, c), "rows")
                return y.view(b, h, w, self.out_channels).permute(0, 3, 1, 2)
            if b == 1 and onednn and macs > self.onednn_matmul_min_macs:
                # linear(A, B) = A @ B.T: the weight is the left operand, the activation (as its
                # transpose, a free view) the right one, so the product lands in NCHW.
                y = torch.ops.mkldnn._linear_pointwise(weight, x.reshape(c, h * w).t(), None, "none", [], "")
                if self.bias is not None:
                    y.add_(self.bias.view(-1, 1))
                return y.view(1, self.out_channels, h, w)
            if macs <= self.matmul_max_macs or c * h * w <= self.matmul_max_input:
                if b == 1:
                    xs = x.reshape(c, h * w)
                    y = torch.addmm(self.bias.view(-1, 1), weight, xs) if self.bias is not None else weight @ xs
                else:
                    y = torch.matmul(weight, x.reshape(b, c, h * w))
                    if self.bias is not None:
                        y = y + self.bias.view(1, -1, 1)
                return y.view(b, self.out_channels, h, w)
        dense = self._dense_depthwise(h, w, x.dtype)
        if dense is not None:
            n = h * w
            xs = x.reshape(c, 1, n) if b == 1 else x.reshape(b, c, n).transpose(0, 1)
            bias = self.bias.view(c, 1, 1) if self.bias is not None else None
            y = torch.baddbmm(bias, xs, dense) if bias is not None else torch.bmm(xs, dense)
            return y.view(1, c, h, w) if b == 1 else y.transpose(0, 1).reshape(b, c, h, w)
        if onednn and self.padding_mode == "zeros" and isinstance(self.padding, tuple):
            return self._onednn_conv(x)
        return None

    def _onednn_conv(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        channels_last = _is_channels_last(x)
        params = self._parameters
        weight = params["weight"]

        def build() -> tuple:
            args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            return torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach().contiguous(memory_format=layout), *args, list(x.shape)), args

        packed, args = kernel_cache(self).get_or_build(("conv", x.shape, channels_last), weight, build)
        return _CONV(x, packed, params["bias"], *args, act, [], "")

    # --- channels-last inference (see `zoo.models.nhwc`) --------------------------------
    def forward_nhwc(self, t: torch.Tensor, act: str = "none", add: torch.Tensor | None = None) -> torch.Tensor:
        """``act(conv(t)) + add`` on an NHWC tensor ``t [B, H, W, Ci]``, returning a contiguous
        NHWC ``[B, Ho, Wo, Co]``; `act` is ``"none"`` or ``"relu"``, `add` (NHWC, the output's
        shape) is only allowed without one.

        A 1x1 stride-1 ungrouped conv is a product of the ``[B*H*W, Ci]`` rows (`forward_rows`);
        other convs go through oneDNN with the activation fused; both read and write NHWC, so
        a chain of layers never changes layout. Outside float32 eager CPU inference with
        oneDNN, or with hooks on this layer, it is this module's own forward, NCHW in and out,
        with the activation and sum applied after it."""
        if act not in ("none", "relu") or (add is not None and act != "none"):
            raise ValueError(f"forward_nhwc takes act 'none' or 'relu', and add only without one (got {act!r})")
        if not self._nhwc_applies(t):
            return nchw_fallback(self, t, act, add)
        b, h, w, c = t.shape
        if self._is_pointwise():
            m = b * h * w
            y = self.forward_rows(t.reshape(m, c), act, None if add is None else add.reshape(m, self.out_channels))
            return y.view(b, h, w, self.out_channels)
        if self.padding_mode != "zeros" or not isinstance(self.padding, tuple):
            return nchw_fallback(self, t, act, add)
        y = self._onednn_conv(t.permute(0, 3, 1, 2), act).permute(0, 2, 3, 1)
        return y if add is None else y.add_(add)

    def forward_rows(self, x: torch.Tensor, act: str = "none", add: torch.Tensor | None = None) -> torch.Tensor:
        """A 1x1 stride-1 ungrouped conv on token rows: ``act(x @ W.T + bias) + add`` for
        ``x [M, Ci]`` and ``add [M, Co]``, as `forward_nhwc`; call only where `_nhwc_applies`.

        Above `onednn_rows_min_macs` multiply-adds, one oneDNN product with the weight
        prepacked for M rows and the activation or the sum fused into it; below, MKL's
        ``addmm`` (oneDNN's fixed cost per call is larger than such a product)."""
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        if x.shape[0] * weight.numel() > self.onednn_rows_min_macs:
            return prepacked_linear(self, x, "rows", act, add)
        weight = weight.view(self.out_channels, -1).t()
        y = torch.addmm(bias, x, weight) if bias is not None else x @ weight
        if act == "relu":
            y.relu_()
        return y if add is None else y.add_(add)

    def _is_pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded, ungrouped conv: a product of token rows."""
        return self.kernel_size == (1, 1) and self.groups == 1 and self.stride == (1, 1) and self.padding == (0, 0)

    def _nhwc_applies(self, t: torch.Tensor) -> bool:
        """The channels-last kernels may serve this call: a float32 CPU input and weight,
        oneDNN, no hooks on this layer, and no autograd through the weight."""
        w = self._parameters["weight"]
        return (
            t.is_cpu
            and onednn_applies(t, w)
            and not (self._forward_hooks or self._forward_pre_hooks)
            and not (w.requires_grad and torch.is_grad_enabled())
        )

    def _dense_depthwise(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor | None:
        """``[C, H*W, H*W]``: this stride-1 'same' depthwise conv on an ``H x W`` grid as one
        matrix per channel (row q: the response to a unit impulse at q), or None where it has
        no dense form within `dense_max_tokens` and `dense_max_bytes` (part of the cache key,
        so changing them takes effect)."""
        weight = self._parameters["weight"]
        key = ("dense", h, w, dtype, self.dense_max_tokens, self.dense_max_bytes)
        return kernel_cache(self).get_or_build(key, weight, lambda: self._build_dense(weight, h, w, dtype))

    def _build_dense(self, weight: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor | None:
        k = self.kernel_size
        c = self.in_channels
        n = h * w
        if not (
            self.groups == c == self.out_channels
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.padding == (k[0] // 2, k[1] // 2)
            and self.padding_mode == "zeros"
            and n <= self.dense_max_tokens
            and c * n * n * weight.element_size() <= self.dense_max_bytes
        ):
            return None
        impulses = torch.eye(n, dtype=dtype).view(n, 1, h, w).expand(n, c, h, w)
        resp = F.conv2d(impulses, weight.to(dtype), None, 1, self.padding, 1, c)
        return resp.reshape(n, c, n).transpose(0, 1).contiguous()  # [C, q, p]


def nchw_fallback(module: nn.Module, t: torch.Tensor, act: str = "none", add: torch.Tensor | None = None) -> torch.Tensor:
    """``act(module(x)) + add`` for an NHWC tensor ``t [B, H, W, C]`` through `module`'s own
    forward (its hooks fire): ``x`` is the NCHW view of `t`; the result is contiguous NHWC."""
    y = module(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    if act == "relu":
        y = F.relu(y)
    if add is not None:
        y = y + add
    return y.contiguous()


class DeployLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same function) whose eager float32 CPU inference runs
    oneDNN's matrix product with the weight prepacked once per number of input rows (about 2x
    MKL's ``addmm`` at EfficientFormer's token MLP sizes on 2 cores). Otherwise, and always
    while tracing or exporting or when autograd needs the weight, the plain forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0 or not (eager_cpu_inference(x, self.weight) and onednn_applies(x, self.weight)):
            return super().forward(x)
        return prepacked_linear(self, x, "linear")


def use_deploy_kernels(module: nn.Module) -> nn.Module:
    """Turn every plain `nn.Conv2d` in `module` into a `DeployConv2d`, every `nn.Linear` into a
    `DeployLinear` and every `nn.GELU` into a `DeployGELU`, in place (same parameters, same
    function). Only for modules whose GELUs act on fresh intermediates (true of every family
    here)."""
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = DeployConv2d
        elif type(m) is nn.Linear:
            m.__class__ = DeployLinear
        elif type(m) is nn.GELU:
            m.__class__ = DeployGELU
    return module
