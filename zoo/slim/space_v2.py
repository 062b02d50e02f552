"""EfficientFormerV2's search space (arXiv 2212.08059): per-stage widths and depths, per-block
FFN expansion ratios, and how many blocks of stages 3-4 have attention.

Keys (``r`` the grid side of the block's input):

=================================  ==========================================================
``stem.i3.c32.r224``               two stride-2 3x3 Conv-BN-GELU
``down.i32.c48.r56.a0``            a stage's stride-2 Conv-BN (``a1``: with the attention branch)
``ffn.c48.r56.e4``                 a block without attention: its FFN of ratio ``e``
``attn.c96.r14.e4.s2``             a block with attention (``s2``: at stride 2, stage 3) and FFN
``head.c176.r7.n1000``             the final norm (a per-channel affine), mean, merged classifiers
=================================  ==========================================================

Attention sits in stages 3-4 (the last ``num_vit`` blocks of each, as the released models),
stage 3's at stride 2, stage 4's downsampling with the attention branch: the released
geometry, fixed here; the search changes sizes, not that layout.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn

from zoo.errors import ConfigError
from zoo.slim.greedy import Move
from zoo.slim.keys import parse_key

__all__ = ["V2Arch", "EfficientFormerV2Space"]

_ATTN_STAGES, _STRIDE_STAGE, _DOWN_ATTN_STAGE = (2, 3), 2, 3


@dataclass(frozen=True)
class V2Arch:
    """An EfficientFormerV2 architecture: per-stage ``widths``; ``blocks[i]``, the full
    network's block indices stage i keeps; ``ratios[i]``, their FFN ratios; ``num_vit``, how
    many of the last blocks of stages 3 and 4 have attention."""

    widths: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...]
    ratios: tuple[tuple[int, ...], ...]
    num_vit: int

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(b) for b in self.blocks)

    def to_json(self) -> dict:
        return {"widths": list(self.widths), "depths": list(self.depths), "num_vit": self.num_vit,
                "ratios": [list(r) for r in self.ratios], "blocks": [list(b) for b in self.blocks]}

    @classmethod
    def from_json(cls, obj: dict) -> "V2Arch":
        return cls(tuple(obj["widths"]), tuple(tuple(b) for b in obj["blocks"]),
                   tuple(tuple(r) for r in obj["ratios"]), int(obj["num_vit"]))

    def describe(self) -> str:
        return f"{list(self.widths)} / {list(self.depths)} / vit {self.num_vit} / ratios {[list(r) for r in self.ratios]}"


class EfficientFormerV2Space:
    """EfficientFormerV2 architectures at one input size, up to the full network (default: S1's
    widths and depths, every FFN ratio ``max_ratio``, S1's two attention blocks). Widths are
    multiples of ``step`` (8: the released widths are).

    Actions, per stage in this order (the tie-break): ``drop`` its last block without
    attention (a stage keeps one), ``ratio``: lower by 1 the FFN ratio of its last block with
    the stage's largest ratio (down to 1), ``shrink`` its width by ``step``; then ``fewer_vit``:
    one attention block fewer in stages 3 and 4 (the first of each becomes FFN only).
    """

    family = "efficientformerv2"
    base_model = "efficientformerv2_s1"
    kinds = {"stem": ("i", "c", "r"), "down": ("i", "c", "r", "a"), "ffn": ("c", "r", "e"),
             "attn": ("c", "r", "e", "s"), "head": ("c", "r", "n")}
    chainable = ("ffn", "attn")

    def __init__(self, img_size: int = 224, max_widths: Sequence[int] = (32, 48, 120, 224),
                 max_depths: Sequence[int] = (3, 3, 9, 6), max_ratio: int = 4, max_vit: int = 2,
                 num_classes: int = 1000, step: int = 8):
        if len(max_widths) != 4 or len(max_depths) != 4:
            raise ConfigError("an EfficientFormerV2 space has 4 stages: give 4 max_widths and 4 max_depths.")
        if any(w % step or w < step for w in max_widths):
            raise ConfigError(f"max_widths must be multiples of {step} (got {tuple(max_widths)}).")
        if not 0 <= max_vit <= min(max_depths[i] for i in _ATTN_STAGES) or max_ratio < 1:
            raise ConfigError("max_vit must be 0 to the depth of stages 3-4, and max_ratio at least 1.")
        grids = [math.ceil(img_size / 4)]
        for _ in range(3):
            grids.append(math.ceil(grids[-1] / 2))
        if max_vit and grids[_STRIDE_STAGE] % 2:
            raise ConfigError(f"img_size={img_size} gives stage 3 an odd grid; use a multiple of 32.")
        self.img_size, self.num_classes, self.step = img_size, num_classes, step
        self.max_widths, self.max_depths = tuple(max_widths), tuple(max_depths)
        self.max_ratio, self.max_vit = max_ratio, max_vit
        self.stem_grid, self.grids = grids[0], tuple(grids)

    def describe(self) -> dict:
        return {"img_size": self.img_size, "max_widths": list(self.max_widths), "max_depths": list(self.max_depths),
                "max_ratio": self.max_ratio, "max_vit": self.max_vit, "num_classes": self.num_classes,
                "step": self.step}

    def parse_key(self, key: str, where: str = "") -> tuple[str, dict[str, int]]:
        return parse_key(key, self.kinds, where)

    # -- architectures --------------------------------------------------------------------

    def full_arch(self) -> V2Arch:
        return V2Arch(self.max_widths, tuple(tuple(range(d)) for d in self.max_depths),
                      tuple((self.max_ratio,) * d for d in self.max_depths), self.max_vit)

    def check(self, arch: V2Arch) -> None:
        if not len(arch.widths) == len(arch.blocks) == len(arch.ratios) == 4:
            raise ConfigError(f"{arch}: 4 stages expected.")
        for i in range(4):
            w, b, r = arch.widths[i], arch.blocks[i], arch.ratios[i]
            if w % self.step or not self.step <= w <= self.max_widths[i]:
                raise ConfigError(f"{arch}: stage {i + 1} width {w} is not a multiple of {self.step} "
                                  f"in [{self.step}, {self.max_widths[i]}].")
            if not b or list(b) != sorted(set(b)) or b[-1] >= self.max_depths[i] or len(r) != len(b):
                raise ConfigError(f"{arch}: stage {i + 1} keeps blocks {list(b)} with ratios {list(r)}; it needs 1 to "
                                  f"{self.max_depths[i]} distinct blocks of the full network in order, a ratio each.")
            if any(not 1 <= e <= self.max_ratio for e in r):
                raise ConfigError(f"{arch}: FFN ratios are 1 to {self.max_ratio}.")
        if not 0 <= arch.num_vit <= min(self.max_vit, *(len(arch.blocks[i]) for i in _ATTN_STAGES)):
            raise ConfigError(f"{arch}: num_vit must be 0 to min({self.max_vit}, the depths of stages 3-4).")
        for i in _ATTN_STAGES:  # attention blocks inherit from attention blocks: the full net's last ones
            full_first = self.max_depths[i] - self.max_vit
            if any(j < full_first for j in arch.blocks[i][len(arch.blocks[i]) - arch.num_vit:]):
                raise ConfigError(f"{arch}: stage {i + 1}'s attention blocks must be among the full network's last "
                                  f"{self.max_vit}.")

    def keys(self, arch: V2Arch) -> list[str]:
        self.check(arch)
        w, g = arch.widths, self.grids
        keys = [f"stem.i3.c{w[0]}.r{self.img_size}"]
        for i in range(4):
            if i:
                keys.append(f"down.i{w[i - 1]}.c{w[i]}.r{g[i - 1]}.a{int(i == _DOWN_ATTN_STAGE)}")
            d = len(arch.blocks[i])
            for k, e in enumerate(arch.ratios[i]):
                if i in _ATTN_STAGES and k >= d - arch.num_vit:
                    keys.append(f"attn.c{w[i]}.r{g[i]}.e{e}.s{2 if i == _STRIDE_STAGE else 1}")
                else:
                    keys.append(f"ffn.c{w[i]}.r{g[i]}.e{e}")
        keys.append(f"head.c{w[3]}.r{g[3]}.n{self.num_classes}")
        return keys

    def all_keys(self) -> list[str]:
        g, s = self.grids, self.step
        widths = [range(s, m + 1, s) for m in self.max_widths]
        ratios = range(1, self.max_ratio + 1)
        keys = [f"stem.i3.c{c}.r{self.img_size}" for c in widths[0]]
        for i in range(4):
            keys += [f"ffn.c{c}.r{g[i]}.e{e}" for c in widths[i] for e in ratios]
            if i in _ATTN_STAGES and self.max_vit:
                keys += [f"attn.c{c}.r{g[i]}.e{e}.s{2 if i == _STRIDE_STAGE else 1}" for c in widths[i] for e in ratios]
            if i:
                keys += [f"down.i{a}.c{c}.r{g[i - 1]}.a{int(i == _DOWN_ATTN_STAGE)}"
                         for a in widths[i - 1] for c in widths[i]]
        keys += [f"head.c{c}.r{g[3]}.n{self.num_classes}" for c in widths[3]]
        return keys

    def random_arch(self, rng: random.Random) -> V2Arch:
        widths = tuple(rng.randrange(self.step, m + 1, self.step) for m in self.max_widths)
        depths = [rng.randint(1, m) for m in self.max_depths]
        num_vit = rng.randint(0, min(self.max_vit, *(depths[i] for i in _ATTN_STAGES)))
        blocks = []
        for i, d in enumerate(depths):  # FFN-only blocks first, then the full net's last blocks (attention)
            n_attn = num_vit if i in _ATTN_STAGES else 0
            top = self.max_depths[i]
            blocks.append(tuple(range(d - n_attn)) + tuple(range(top - n_attn, top)))
        ratios = tuple(tuple(rng.randint(1, self.max_ratio) for _ in range(d)) for d in depths)
        return V2Arch(widths, tuple(blocks), ratios, num_vit)

    def to_config(self, arch: V2Arch) -> dict:
        """The `zoo.models.efficientformer_v2.EfficientFormerV2` arguments of `arch`."""
        return {"embed_dims": list(arch.widths), "depths": list(arch.depths),
                "mlp_ratios": [list(r) for r in arch.ratios], "num_vit": arch.num_vit}

    def build(self, arch: V2Arch, **kwargs) -> nn.Module:
        from zoo.models.efficientformer_v2 import EfficientFormerV2

        self.check(arch)
        return EfficientFormerV2(img_size=self.img_size, num_classes=self.num_classes, **self.to_config(arch), **kwargs)

    def moves(self, arch: V2Arch) -> list[Move]:
        """Every action available from `arch`, in tie-break order (class docstring)."""
        out = []
        for i in range(4):
            b, r, w = arch.blocks[i], arch.ratios[i], arch.widths[i]
            n_ffn = len(b) - (arch.num_vit if i in _ATTN_STAGES else 0)
            if len(b) > 1 and n_ffn > 0:
                j = n_ffn - 1
                out.append(Move("drop", i, f"drop stage {i + 1} block {b[j]}",
                                _with(arch, i, blocks=b[:j] + b[j + 1:], ratios=r[:j] + r[j + 1:])))
            top = max(r)
            if top > 1:
                j = max(k for k, e in enumerate(r) if e == top)
                out.append(Move("ratio", i, f"stage {i + 1} block {b[j]} ratio {top} -> {top - 1}",
                                _with(arch, i, ratios=r[:j] + (top - 1,) + r[j + 1:])))
            if w - self.step >= self.step:
                out.append(Move("shrink", i, f"shrink stage {i + 1} {w} -> {w - self.step}", _with(arch, i, width=w - self.step)))
        if arch.num_vit:
            out.append(Move("fewer_vit", -1, f"attention blocks {arch.num_vit} -> {arch.num_vit - 1}",
                            V2Arch(arch.widths, arch.blocks, arch.ratios, arch.num_vit - 1)))
        return out

    # -- blocks ---------------------------------------------------------------------------

    def block(self, key: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
        """The deploy form of one block (random weights from `seed`) and its input shape."""
        from zoo.models import efficientformer_v2 as v2
        from zoo.models.cpu_kernels import use_deploy_kernels
        from zoo.models.layers import ChannelAffine
        from zoo.nn import fuse_modules
        from zoo.slim.space_vit import _Mean
        from zoo.testing import randomize_

        kind, f = self.parse_key(key)
        r = f["r"]
        if kind == "stem":
            module, shape = v2.Stem4(f["i"], f["c"]), (f["i"], r, r)
        elif kind == "down":
            module, shape = v2.Downsample(f["i"], f["c"], r, bool(f["a"]), nn.GELU), (f["i"], r, r)
        elif kind in ("ffn", "attn"):
            stride = 2 if kind == "attn" and f["s"] == 2 else None
            module = v2.EfficientFormerV2Block(f["c"], f["e"], resolution=r, stride=stride, use_attn=kind == "attn")
            shape = (f["c"], r, r)
        else:
            module, shape = nn.Sequential(nn.BatchNorm2d(f["c"]), _Mean(), nn.Linear(f["c"], f["n"])), (f["c"], r, r)
        wrapper = randomize_(nn.Sequential(module).eval(), seed=seed, scale=0.1)
        fuse_modules(wrapper)
        if kind == "head":
            module[0] = ChannelAffine.from_bn(module[0])  # as EfficientFormerV2._fold_for_deploy
        use_deploy_kernels(wrapper)
        return wrapper.requires_grad_(False), (1, *shape)

    def block_map(self, arch: V2Arch) -> tuple[tuple[int, ...], ...]:
        return arch.blocks


def _with(arch: V2Arch, i: int, blocks=None, ratios=None, width=None) -> V2Arch:
    b, r, w = list(arch.blocks), list(arch.ratios), list(arch.widths)
    if blocks is not None:
        b[i] = blocks
    if ratios is not None:
        r[i] = ratios
    if width is not None:
        w[i] = width
    return V2Arch(tuple(w), tuple(b), tuple(r), arch.num_vit)
