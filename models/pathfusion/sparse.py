"""Sparse 3D convolution in plain PyTorch: the layers OpenPCDet's voxel backbones use from spconv
(`SubMConv3d`, `SparseConv3d`, `SparseInverseConv3d`, `SparseSequential`), with spconv 2.x's
weight layout and output-site rules, on any device and with autograd.

Written here because spconv's CPU build cannot run backward (its kernels are CUDA) and gave wrong
sites for strided convolution on unsorted input; spconv stays usable as an optional accelerator,
never the reference.

A `SparseTensor` holds ``features [N, C]`` and ``indices [N, 4]`` int32 as ``(batch, z, y, x)``
on a grid of ``spatial_shape = (D, H, W)``. Convolution is correlation, as `torch.nn.functional.
conv3d`: output site ``q`` sums ``W[o] @ x[q * stride - padding + o]`` over kernel offsets ``o``
(a submanifold convolution keeps its input sites and centres the kernel on them). Each layer
builds a rule book once per `indice_key` and reuses it: for every kernel offset, the (output
row, input row) pairs it joins. Then, offset by offset, it gathers the pairs' input rows,
multiplies them by the offset's weight and adds them into their output rows. An output row has
at most one pair per offset, so a site's sum runs over the offsets in a fixed order and does
not depend on the order of the input rows; the backward runs the same way from the other side.

Weights are stored as spconv 2.x stores them: ``[C_out, kD, kH, kW, C_in]``. Checkpoints from
spconv 1.x (``[kD, kH, kW, C_in, C_out]``) and 2.0/2.1 (``[kD, kH, kW, C_out, C_in]``) load
through `convert_spconv_weight`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from zoo.errors import ConfigError, WeightsError

__all__ = [
    "SparseTensor", "SparseModule", "SubMConv3d", "SparseConv3d", "SparseInverseConv3d",
    "SparseSequential", "convert_spconv_weight",
]


def _triple(v) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 3:
        raise ConfigError(f"expected an int or three ints, got {v}")
    return v


@dataclass
class _Rules:
    """A rule book: the (output row, input row) pairs of every kernel offset, and the sites.

    ``out_rows`` and ``in_rows`` ``[P]`` int64 hold the pairs offset by offset (``counts[k]``
    pairs for offset ``k``, in the weight's flattening order); an output row appears at most
    once per offset."""

    out_rows: torch.Tensor
    in_rows: torch.Tensor
    counts: list
    out_indices: torch.Tensor  # [M_out, 4] int32
    out_shape: tuple[int, int, int]
    in_indices: torch.Tensor  # [N_in, 4]
    in_shape: tuple[int, int, int]
    kernel: tuple[int, int, int]
    _inverse: "_Rules | None" = field(default=None, repr=False)

    def inverse(self) -> "_Rules":
        """The rule book of the transposed convolution: the same pairs, outputs and inputs swapped."""
        if self._inverse is None:
            self._inverse = _Rules(self.in_rows, self.out_rows, self.counts, self.in_indices, self.in_shape,
                                   self.out_indices, self.out_shape, self.kernel)
        return self._inverse

    def segments(self):
        """``(offset, start, end)`` of each offset's pairs that has any."""
        start = 0
        for k, c in enumerate(self.counts):
            if c:
                yield k, start, start + c
            start += c


@dataclass
class SparseTensor:
    """Active sites of a batched 3D grid: ``features [N, C]``, ``indices [N, 4]`` int32
    ``(batch, z, y, x)``, ``spatial_shape (D, H, W)``, ``batch_size``; `rules` caches neighbour
    tables by indice key and travels with the tensors a network derives from this one."""

    features: torch.Tensor
    indices: torch.Tensor
    spatial_shape: Sequence[int]
    batch_size: int
    rules: dict = field(default_factory=dict)

    def __post_init__(self):
        self.spatial_shape = tuple(int(s) for s in self.spatial_shape)
        if self.features.dim() != 2 or self.indices.dim() != 2 or self.indices.shape[1] != 4:
            raise ConfigError(f"SparseTensor needs features [N, C] and indices [N, 4], got "
                              f"{tuple(self.features.shape)} and {tuple(self.indices.shape)}")
        if self.features.shape[0] != self.indices.shape[0]:
            raise ConfigError(f"{self.features.shape[0]} feature rows for {self.indices.shape[0]} sites")

    def replace_feature(self, features: torch.Tensor) -> "SparseTensor":
        return SparseTensor(features, self.indices, self.spatial_shape, self.batch_size, self.rules)

    def dense(self, channels_first: bool = True) -> torch.Tensor:
        """``[B, C, D, H, W]`` (or ``[B, D, H, W, C]``), zero at inactive sites."""
        c = self.features.shape[1]
        out = self.features.new_zeros((self.batch_size, *self.spatial_shape, c))
        i = self.indices.long()
        out[i[:, 0], i[:, 1], i[:, 2], i[:, 3]] = self.features
        return out.permute(0, 4, 1, 2, 3).contiguous() if channels_first else out

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> "SparseTensor":
        """Sites where ``x [B, C, D, H, W]`` is non-zero in any channel."""
        b, _, *shape = x.shape
        active = (x != 0).any(dim=1)
        idx = active.nonzero()
        feats = x.permute(0, 2, 3, 4, 1)[active]
        return cls(feats, idx.int(), shape, b)


def _padded_keys(indices: torch.Tensor, shape, margin) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Row-major keys of ``(batch, z, y, x)`` on the grid padded by `margin` on every side, and
    the padded shape: a neighbour up to `margin` away never wraps into another row or sample, so
    neighbour keys are the site's key plus a constant and need no bounds check."""
    i = indices.long()
    d, h, w = (s + 2 * m for s, m in zip(shape, margin))
    keys = ((i[:, 0] * d + i[:, 1] + margin[0]) * h + i[:, 2] + margin[1]) * w + i[:, 3] + margin[2]
    return keys, (d, h, w)


def site_keys(indices: torch.Tensor, shape) -> torch.Tensor:
    """Row-major keys ``[N]`` int64 of sites ``(batch, z, y, x)`` on a grid of `shape`."""
    return _padded_keys(indices, shape, (0, 0, 0))[0]


def sites_from_keys(keys: torch.Tensor, shape) -> torch.Tensor:
    """The sites ``[N, 4]`` int32 ``(batch, z, y, x)`` of row-major keys on a grid of `shape`."""
    d, h, w = shape
    return torch.stack([keys // (d * h * w), (keys // (h * w)) % d, (keys // w) % h, keys % w], 1).int()


def unique_sites(indices: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct sites of ``indices [N, 4]`` in key order, and each row's place among them."""
    keys, inverse = torch.unique(site_keys(indices, shape), sorted=True, return_inverse=True)
    return sites_from_keys(keys, shape).to(indices.dtype), inverse


def _offsets(kernel, device) -> torch.Tensor:
    """Kernel offsets ``[K, 3]`` in (kd, kh, kw) row-major order, the weight's flattening order."""
    g = torch.meshgrid(*(torch.arange(k, device=device) for k in kernel), indexing="ij")
    return torch.stack([x.reshape(-1) for x in g], dim=1)


def _subm_rules(x: SparseTensor, kernel) -> _Rules:
    """Pairs of a submanifold convolution. Offsets ``k`` and ``K - 1 - k`` are mirror images (a
    site pairs with its neighbour at ``+o`` exactly when the neighbour pairs with it at ``-o``),
    so only the first half is looked up and the centre pairs every site with itself."""
    shape = x.spatial_shape
    n = x.indices.shape[0]
    dev = x.indices.device
    half = [k // 2 for k in kernel]
    keys, (_, h, w) = _padded_keys(x.indices, shape, half)
    sorted_keys, order = keys.sort()
    offs = _offsets(kernel, dev) - torch.tensor(half, device=dev)
    n_off = offs.shape[0]
    deltas = (offs[: n_off // 2, 0] * h + offs[: n_off // 2, 1]) * w + offs[: n_off // 2, 2]
    query = sorted_keys[None, :] + deltas[:, None]  # [K/2, N], each row ascending: cache-friendly search
    pos = torch.searchsorted(sorted_keys, query).clamp_max_(max(n - 1, 0))
    hit = sorted_keys[pos] == query if n else torch.zeros_like(query, dtype=torch.bool)
    kk, ss = hit.nonzero(as_tuple=True)
    first_out, first_in = order[ss], order[pos[kk, ss]]
    first_counts = hit.sum(1).tolist()
    centre = torch.arange(n, device=dev)
    # the mirrored half: offset K-1-k holds offset k's pairs swapped, offsets taken in ascending order
    starts = [0]
    for c in first_counts:
        starts.append(starts[-1] + c)
    outs, ins, counts = [first_out, centre], [first_in, centre], first_counts + [n]
    for k in range(n_off // 2 - 1, -1, -1):
        outs.append(first_in[starts[k]:starts[k + 1]])
        ins.append(first_out[starts[k]:starts[k + 1]])
        counts.append(first_counts[k])
    return _Rules(torch.cat(outs), torch.cat(ins), counts, x.indices, shape, x.indices, shape, tuple(kernel))


def _conv_rules(x: SparseTensor, kernel, stride, padding, dilation) -> _Rules:
    """spconv's rule: an output site exists wherever any active input falls in its window. Input
    ``i`` meets output ``q`` through offset ``o`` when ``i = q * stride - padding + o * dilation``;
    the candidates are found axis by axis and combined."""
    shape = x.spatial_shape
    out_shape = tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                      for s, k, st, p, d in zip(shape, kernel, stride, padding, dilation))
    if min(out_shape) <= 0:
        raise ConfigError(f"a {kernel} kernel with stride {stride} and padding {padding} leaves no "
                          f"output on a {shape} grid")
    n = x.indices.shape[0]
    dev = x.indices.device
    i = x.indices.long()
    qs, oks = [], []
    for a in range(3):
        num = i[:, 1 + a, None] + padding[a] - torch.arange(kernel[a], device=dev)[None] * dilation[a]  # [N, k]
        q = torch.div(num, stride[a], rounding_mode="floor")
        qs.append(q)
        oks.append((num % stride[a] == 0) & (q >= 0) & (q < out_shape[a]))
    valid = oks[0][:, :, None, None] & oks[1][:, None, :, None] & oks[2][:, None, None, :]
    qk = ((i[:, 0, None, None, None] * out_shape[0] + qs[0][:, :, None, None]) * out_shape[1]
          + qs[1][:, None, :, None]) * out_shape[2] + qs[2][:, None, None, :]
    n_off = math.prod(kernel)
    valid_t = valid.reshape(n, n_off).t()  # [K, N]: pairs come out offset by offset
    in_rows = valid_t.nonzero(as_tuple=True)[1]
    pair_keys = qk.reshape(n, n_off).t()[valid_t]
    counts = valid_t.sum(1).tolist()
    out_keys, out_rows = torch.unique(pair_keys, sorted=True, return_inverse=True)  # output order is key order
    return _Rules(out_rows, in_rows, counts, sites_from_keys(out_keys, out_shape), out_shape, x.indices, shape,
                  tuple(kernel))


class _GatherMatmulSum(torch.autograd.Function):
    """``out[j] = sum over pairs (j, i, k) of W[k] @ x[i]`` with ``weight [C_out, K, C_in]``: per
    offset, gather its pairs' input rows, multiply by its weight and add into their output rows.
    An output row (and, in the backward, an input row) has at most one pair per offset, so every
    sum runs over the offsets in their fixed order whatever the order of the sites.

    Offset by offset rather than one gather of all pairs: the temporaries stay a few MB, where one
    buffer of every pair's row (tens of MB) costs more in fresh pages than the products."""

    @staticmethod
    def forward(ctx, features, weight, rules):
        ctx.rules = rules
        ctx.save_for_backward(features, weight)
        out = features.new_zeros((len(rules.out_indices), weight.shape[0]))
        for k, a, b in rules.segments():
            out.index_add_(0, rules.out_rows[a:b], features.index_select(0, rules.in_rows[a:b]) @ weight[:, k].t())
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        features, weight = ctx.saved_tensors
        rules = ctx.rules
        grad = grad.contiguous()
        want_x, want_w = ctx.needs_input_grad[:2]
        grad_x = torch.zeros_like(features) if want_x else None
        grad_w = torch.zeros_like(weight) if want_w else None
        for k, a, b in rules.segments():
            g = grad.index_select(0, rules.out_rows[a:b])
            if want_w:
                grad_w[:, k] = g.t() @ features.index_select(0, rules.in_rows[a:b])
            if want_x:
                grad_x.index_add_(0, rules.in_rows[a:b], g @ weight[:, k])
        return grad_x, grad_w, None


def _apply(features: torch.Tensor, rules: _Rules, weight: torch.Tensor) -> torch.Tensor:
    """The convolution's output features ``[M_out, C_out]`` for ``weight [C_out, K, C_in]``."""
    return _GatherMatmulSum.apply(features, weight, rules)


class SparseModule(nn.Module):
    """Marker: takes and returns a `SparseTensor` (other modules in a `SparseSequential` see the
    features only)."""


class _SparseConvBase(SparseModule):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, indice_key: str | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)
        self.padding = _triple(padding)
        self.dilation = _triple(dilation)
        self.indice_key = indice_key
        self.weight = nn.Parameter(torch.empty(out_channels, *self.kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._convert_layout)

    def reset_parameters(self) -> None:
        # nn.Conv3d's default (kaiming-uniform, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1 / math.sqrt(self.in_channels * math.prod(self.kernel_size))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _convert_layout(self, state_dict, prefix, *args):
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = convert_spconv_weight(state_dict[key], self.in_channels, self.out_channels,
                                                    self.kernel_size, name=key)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, indice_key={self.indice_key!r}")

    def _out(self, x: SparseTensor, features: torch.Tensor, rules: _Rules) -> SparseTensor:
        if self.bias is not None:
            features = features + self.bias
        return SparseTensor(features, rules.out_indices, rules.out_shape, x.batch_size, x.rules)


class SubMConv3d(_SparseConvBase):
    """Submanifold convolution: output sites are the input sites; the kernel is centred (odd
    sizes); stride and padding are ignored as in spconv."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ConfigError(f"SubMConv3d needs odd kernel sizes, not {self.kernel_size}")
        key = ("subm", self.indice_key, self.kernel_size) if self.indice_key else None
        rules = x.rules.get(key) if key else None
        if rules is None or rules.in_indices is not x.indices:
            rules = _subm_rules(x, self.kernel_size)
            if key:
                x.rules[key] = rules
        return self._out(x, _apply(x.features, rules, self.weight.flatten(1, 3)), rules)


class SparseConv3d(_SparseConvBase):
    """Strided sparse convolution with spconv's output-site rule (a site for every window that
    holds an active input); its table is kept under `indice_key` for `SparseInverseConv3d`."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        rules = _conv_rules(x, self.kernel_size, self.stride, self.padding, self.dilation)
        if self.indice_key:
            x.rules[("conv", self.indice_key)] = rules
        return self._out(x, _apply(x.features, rules, self.weight.flatten(1, 3)), rules)


class SparseInverseConv3d(_SparseConvBase):
    """The transpose of the `SparseConv3d` that shares its `indice_key`: outputs at that layer's
    input sites, ``out[q * stride - padding + o] += W[o] @ x[q]`` (conv_transpose3d's sum)."""

    def __init__(self, in_channels, out_channels, kernel_size, indice_key: str, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, bias=bias, indice_key=indice_key)

    def forward(self, x: SparseTensor) -> SparseTensor:
        fwd = x.rules.get(("conv", self.indice_key))
        if fwd is None:
            raise ConfigError(f"SparseInverseConv3d(indice_key={self.indice_key!r}) found no SparseConv3d "
                              "with that key earlier in the network")
        if tuple(fwd.kernel) != self.kernel_size:
            raise ConfigError(f"kernel {self.kernel_size} does not match the forward layer's {fwd.kernel}")
        rules = fwd.inverse()
        return self._out(x, _apply(x.features, rules, self.weight.flatten(1, 3)), rules)


class SparseSequential(nn.Sequential):
    """`nn.Sequential` over sparse tensors: sparse modules get the tensor, the others (norms,
    activations) its features."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        for m in self:
            if isinstance(m, (SparseModule, SparseSequential)) or getattr(m, "takes_sparse", False):
                x = m(x)
            else:
                x = x.replace_feature(m(x.features))
        return x


def convert_spconv_weight(w: torch.Tensor, cin: int, cout: int, kernel, name: str = "weight") -> torch.Tensor:
    """A sparse convolution weight from any spconv layout as ``[C_out, kD, kH, kW, C_in]``.

    spconv 2.2+ stores ``[C_out, k..., C_in]``; 2.0/2.1 ``[k..., C_out, C_in]``; 1.x
    ``[k..., C_in, C_out]``. Where C_in equals C_out the 1.x and 2.0 layouts share a shape;
    such a tensor is read as 1.x only when the checkpoint says so (not knowable here), so it is
    taken as 2.0/2.1 — the layout OpenPCDet's released checkpoints of that era use.
    """
    k = tuple(kernel)
    if tuple(w.shape) == (cout, *k, cin):
        return w
    if tuple(w.shape) == (*k, cout, cin):
        return w.permute(3, 0, 1, 2, 4).contiguous()
    if tuple(w.shape) == (*k, cin, cout):
        return w.permute(4, 0, 1, 2, 3).contiguous()
    raise WeightsError(f"{name} has shape {tuple(w.shape)}; a sparse convolution {cin}->{cout} with kernel {k} "
                       f"stores [C_out, *k, C_in] (spconv 2.2+), [*k, C_out, C_in] (2.0/2.1) or [*k, C_in, C_out] (1.x).")
