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
builds a neighbour table ``[M_out, K]`` (the input row for every output site and kernel offset,
or none) once per `indice_key` and reuses it; then, per kernel offset, it gathers the input
rows of that offset's valid pairs, multiplies them by the offset's weight and adds them into
their output rows. An output row has at most one pair per offset, so a site's sum runs over
the offsets in a fixed order and does not depend on the order of the input rows.

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
    """A neighbour table and the sites it maps to."""

    nbr: torch.Tensor  # [M_out, K] int64 rows of the input, N_in meaning "none"
    out_indices: torch.Tensor  # [M_out, 4] int32
    out_shape: tuple[int, int, int]
    in_indices: torch.Tensor  # [N_in, 4], for the inverse convolution
    in_shape: tuple[int, int, int]
    kernel: tuple[int, int, int]
    pairs: list | None = None  # per kernel offset: (offset, output rows, input rows), made on first use

    def offset_pairs(self, n_in: int) -> list:
        if self.pairs is None:
            self.pairs = []
            for k in range(self.nbr.shape[1]):
                col = self.nbr[:, k]
                rows = torch.nonzero(col < n_in).squeeze(1)
                if rows.numel():
                    self.pairs.append((k, rows, col.index_select(0, rows)))
        return self.pairs


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


def _keys(indices: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    i = indices.long()
    d, h, w = shape
    return ((i[:, 0] * d + i[:, 1]) * h + i[:, 2]) * w + i[:, 3]


def _offsets(kernel, device) -> torch.Tensor:
    """Kernel offsets ``[K, 3]`` in (kd, kh, kw) row-major order, the weight's flattening order."""
    g = torch.meshgrid(*(torch.arange(k, device=device) for k in kernel), indexing="ij")
    return torch.stack([x.reshape(-1) for x in g], dim=1)


def _lookup(sorted_keys, order, query, valid, n):
    """Row of each query key among the input sites, or `n` where absent or invalid."""
    pos = torch.searchsorted(sorted_keys, query).clamp_max(max(len(sorted_keys) - 1, 0))
    if not len(sorted_keys):
        return torch.full_like(pos, n)
    flat = pos.reshape(-1)
    hit = valid & (sorted_keys.index_select(0, flat).reshape(pos.shape) == query)
    return torch.where(hit, order.index_select(0, flat).reshape(pos.shape), torch.full_like(pos, n))


def _subm_rules(x: SparseTensor, kernel) -> _Rules:
    shape = x.spatial_shape
    n = x.indices.shape[0]
    keys = _keys(x.indices, shape)
    sorted_keys, order = keys.sort()
    offs = _offsets(kernel, x.indices.device) - torch.tensor([k // 2 for k in kernel], device=x.indices.device)
    coords = x.indices[:, 1:].long()[:, None, :] + offs[None]  # [N, K, 3]
    lim = torch.tensor(shape, device=coords.device)
    valid = ((coords >= 0) & (coords < lim)).all(-1)
    b = x.indices[:, :1].long().expand(-1, offs.shape[0])
    q = ((b * shape[0] + coords[..., 0]) * shape[1] + coords[..., 1]) * shape[2] + coords[..., 2]
    nbr = _lookup(sorted_keys, order, q, valid, n)
    return _Rules(nbr, x.indices, shape, x.indices, shape, kernel)


def _conv_rules(x: SparseTensor, kernel, stride, padding, dilation) -> _Rules:
    """spconv's rule: an output site exists wherever any active input falls in its window."""
    shape = x.spatial_shape
    out_shape = tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                      for s, k, st, p, d in zip(shape, kernel, stride, padding, dilation))
    if min(out_shape) <= 0:
        raise ConfigError(f"a {kernel} kernel with stride {stride} and padding {padding} leaves no "
                          f"output on a {shape} grid")
    n = x.indices.shape[0]
    dev = x.indices.device
    offs = _offsets(kernel, dev) * torch.tensor(dilation, device=dev)  # [K, 3]
    st = torch.tensor(stride, device=dev)
    pad = torch.tensor(padding, device=dev)
    lim = torch.tensor(out_shape, device=dev)
    num = x.indices[:, None, 1:].long() + pad - offs[None]  # [N, K, 3] = q * stride
    q = torch.div(num, st, rounding_mode="floor")
    valid = ((num % st) == 0).all(-1) & ((q >= 0) & (q < lim)).all(-1)
    b = x.indices[:, :1].long().expand(-1, offs.shape[0])
    qk = ((b * out_shape[0] + q[..., 0]) * out_shape[1] + q[..., 1]) * out_shape[2] + q[..., 2]
    out_keys = torch.unique(qk[valid])  # sorted: the output order is the key order
    hw = out_shape[1] * out_shape[2]
    out_idx = torch.stack([out_keys // (out_shape[0] * hw), (out_keys // hw) % out_shape[0],
                           (out_keys // out_shape[2]) % out_shape[1], out_keys % out_shape[2]], 1).int()
    # neighbour table: for output j and offset o, the input at j * stride - padding + o
    oc = out_idx[:, None, 1:].long() * st - pad + offs[None]
    in_lim = torch.tensor(shape, device=dev)
    ok = ((oc >= 0) & (oc < in_lim)).all(-1)
    ob = out_idx[:, :1].long().expand(-1, offs.shape[0])
    ik = ((ob * shape[0] + oc[..., 0]) * shape[1] + oc[..., 1]) * shape[2] + oc[..., 2]
    sorted_keys, order = _keys(x.indices, shape).sort()
    nbr = _lookup(sorted_keys, order, ik, ok, n)
    return _Rules(nbr, out_idx, out_shape, x.indices, shape, kernel)


def _inverse_table(rules: _Rules) -> torch.Tensor:
    """[N_in, K]: for each input site of a strided convolution and offset, the output site that
    read it through that offset (each pair is unique), or M_out."""
    n_in = rules.in_indices.shape[0]
    m, k = rules.nbr.shape
    inv = torch.full((n_in + 1, k), m, dtype=torch.long, device=rules.nbr.device)
    rows = torch.arange(m, device=rules.nbr.device)[:, None].expand(-1, k)
    cols = torch.arange(k, device=rules.nbr.device)[None].expand(m, -1)
    inv[rules.nbr, cols] = rows  # writes for the "none" row land in the extra row n_in
    return inv[:n_in]


def _apply(features: torch.Tensor, rules: "_Rules", weight: torch.Tensor) -> torch.Tensor:
    """``out[j] = sum over offsets o of W[o] @ x[nbr[j, o]]`` with ``weight [C_out, K, C_in]``:
    per offset, gather the input rows of its valid pairs only, multiply, and add them into
    their output rows. Within one offset an output row has at most one pair, so each site's
    sum runs over the offsets in a fixed order whatever the order of the input rows."""
    out = features.new_zeros((rules.nbr.shape[0], weight.shape[0]))
    for k, out_rows, in_rows in rules.offset_pairs(features.shape[0]):
        out.index_add_(0, out_rows, features.index_select(0, in_rows) @ weight[:, k, :].t())
    return out


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
        inv = _inverse_table(fwd)
        rules = _Rules(inv, fwd.in_indices, fwd.in_shape, fwd.out_indices, fwd.out_shape, fwd.kernel)
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
