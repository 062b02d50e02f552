"""EfficientViT's search space (arXiv 2305.07027): per-stage widths, depths and heads.

Keys (``r`` the grid side of the block's input, as for every family):

=================================  ==========================================================
``embed.i3.c64.r224``              the patch embedding: four stride-2 3x3 Conv-BN (ReLU between)
``merge.i64.c128.r14``             a stage's downsampling: DW+FFN, patch merging, DW+FFN
``blk.c64.r14.h4.k16.w7``          an EfficientViT block (DW, FFN, cascaded group attention of
                                   ``h`` heads of key dim ``k`` in windows of ``w``, DW, FFN)
``head.c192.r4.n1000``             mean over the grid, BatchNorm and classifier (folded)
=================================  ==========================================================

A stage of width ``c`` with ``h`` heads gives each head ``c / h`` channels, so ``h`` divides
``c``; heads are at most ``len(kernels)`` (one query kernel per head). Blocks are timed in their
deploy form and, on the torch backend, on the channels-last kernels the deployed network runs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from zoo.errors import ConfigError
from zoo.slim.greedy import Move
from zoo.slim.keys import parse_key

__all__ = ["VitArch", "EfficientVitSpace"]


@dataclass(frozen=True)
class VitArch:
    """An EfficientViT architecture: per-stage ``widths`` and ``heads``, and ``blocks[i]``, the
    full network's block indices stage i keeps (its depth is their number)."""

    widths: tuple[int, ...]
    heads: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...]

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(b) for b in self.blocks)

    def to_json(self) -> dict:
        return {"widths": list(self.widths), "heads": list(self.heads), "depths": list(self.depths),
                "blocks": [list(b) for b in self.blocks]}

    @classmethod
    def from_json(cls, obj: dict) -> "VitArch":
        return cls(tuple(obj["widths"]), tuple(obj["heads"]), tuple(tuple(b) for b in obj["blocks"]))

    def describe(self) -> str:
        return f"{list(self.widths)} / {list(self.depths)} / heads {list(self.heads)}"


class EfficientVitSpace:
    """EfficientViT architectures at one input size, up to the full network's widths, depths
    and heads (default: M5's). Widths are multiples of ``step`` divisible by the stage's heads.

    The full network (every stage at its maximum) is where slimming starts and what its weights
    are inherited from. Actions, per stage in this order (the tie-break): ``drop`` its last
    block (a stage keeps one), ``heads`` to the next smaller head count dividing its width,
    ``shrink`` to the next smaller valid width.
    """

    family = "efficientvit"
    base_model = "efficientvit_m5"
    kinds = {"embed": ("i", "c", "r"), "merge": ("i", "c", "r"), "blk": ("c", "r", "h", "k", "w"),
             "head": ("c", "r", "n")}
    chainable = ("blk",)

    def __init__(self, img_size: int = 224, max_widths: Sequence[int] = (192, 288, 384),
                 max_depths: Sequence[int] = (1, 3, 4), max_heads: Sequence[int] = (3, 3, 4), key_dim: int = 16,
                 window_size: Sequence[int] = (7, 7, 7), kernels: Sequence[int] = (7, 5, 3, 3),
                 num_classes: int = 1000, step: int = 16):
        if img_size % 16 or img_size <= 0:
            raise ConfigError(f"EfficientViT needs an input side that is a multiple of 16 (got {img_size}).")
        n = len(max_widths)
        if not len(max_depths) == len(max_heads) == len(window_size) == n:
            raise ConfigError("give max_widths, max_depths, max_heads and window_size for every stage.")
        for i in range(n):
            if max_widths[i] % step or max_widths[i] % max_heads[i] or max_heads[i] > len(kernels):
                raise ConfigError(f"stage {i + 1}: width {max_widths[i]} must be a multiple of {step} and of its "
                                  f"heads ({max_heads[i]}), with at most {len(kernels)} heads (one kernel each).")
            if max_depths[i] < 1:
                raise ConfigError(f"stage {i + 1} needs at least one block.")
        self.img_size, self.num_classes, self.step, self.key_dim = img_size, num_classes, step, key_dim
        self.max_widths, self.max_depths, self.max_heads = tuple(max_widths), tuple(max_depths), tuple(max_heads)
        self.window_size, self.kernels = tuple(window_size), tuple(kernels)
        grids = [img_size // 16]
        for _ in range(1, n):
            grids.append((grids[-1] - 1) // 2 + 1)
        self.grids = tuple(grids)

    def describe(self) -> dict:
        return {"img_size": self.img_size, "max_widths": list(self.max_widths), "max_depths": list(self.max_depths),
                "max_heads": list(self.max_heads), "key_dim": self.key_dim, "window_size": list(self.window_size),
                "kernels": list(self.kernels), "num_classes": self.num_classes, "step": self.step}

    def parse_key(self, key: str, where: str = "") -> tuple[str, dict[str, int]]:
        return parse_key(key, self.kinds, where)

    # -- architectures --------------------------------------------------------------------

    def widths_for(self, stage: int, heads: int) -> list[int]:
        return [c for c in range(self.step, self.max_widths[stage] + 1, self.step) if c % heads == 0]

    def full_arch(self) -> VitArch:
        return VitArch(self.max_widths, self.max_heads, tuple(tuple(range(d)) for d in self.max_depths))

    def check(self, arch: VitArch) -> None:
        n = len(self.max_widths)
        if not len(arch.widths) == len(arch.heads) == len(arch.blocks) == n:
            raise ConfigError(f"{arch}: {n} stages expected.")
        for i in range(n):
            w, h, b = arch.widths[i], arch.heads[i], arch.blocks[i]
            if not 1 <= h <= self.max_heads[i] or w not in self.widths_for(i, h):
                raise ConfigError(f"{arch}: stage {i + 1} width {w} with {h} heads is not in the space (a multiple of "
                                  f"{self.step} up to {self.max_widths[i]} divisible by 1 to {self.max_heads[i]} heads).")
            if not b or list(b) != sorted(set(b)) or b[-1] >= self.max_depths[i]:
                raise ConfigError(f"{arch}: stage {i + 1} keeps blocks {list(b)}; it needs 1 to {self.max_depths[i]} "
                                  "distinct blocks of the full network, in order.")

    def keys(self, arch: VitArch) -> list[str]:
        self.check(arch)
        w, g = arch.widths, self.grids
        keys = [f"embed.i3.c{w[0]}.r{self.img_size}"]
        for i in range(len(w)):
            if i:
                keys.append(f"merge.i{w[i - 1]}.c{w[i]}.r{g[i - 1]}")
            keys += [f"blk.c{w[i]}.r{g[i]}.h{arch.heads[i]}.k{self.key_dim}.w{self.window_size[i]}"] * arch.depths[i]
        keys.append(f"head.c{w[-1]}.r{g[-1]}.n{self.num_classes}")
        return keys

    def all_keys(self) -> list[str]:
        n, g = len(self.max_widths), self.grids
        all_w = [range(self.step, m + 1, self.step) for m in self.max_widths]
        keys = [f"embed.i3.c{c}.r{self.img_size}" for c in all_w[0]]
        for i in range(n):
            for h in range(1, self.max_heads[i] + 1):
                keys += [f"blk.c{c}.r{g[i]}.h{h}.k{self.key_dim}.w{self.window_size[i]}" for c in self.widths_for(i, h)]
            if i:
                keys += [f"merge.i{a}.c{c}.r{g[i - 1]}" for a in all_w[i - 1] for c in all_w[i]]
        keys += [f"head.c{c}.r{g[-1]}.n{self.num_classes}" for c in all_w[-1]]
        return keys

    def random_arch(self, rng: random.Random) -> VitArch:
        heads, widths, blocks = [], [], []
        for i in range(len(self.max_widths)):
            h = rng.randint(1, self.max_heads[i])
            heads.append(h)
            widths.append(rng.choice(self.widths_for(i, h)))
            blocks.append(tuple(range(rng.randint(1, self.max_depths[i]))))
        return VitArch(tuple(widths), tuple(heads), tuple(blocks))

    def to_config(self, arch: VitArch) -> dict:
        """The `zoo.models.efficientvit.EfficientVit` arguments of `arch`."""
        n = len(arch.widths)
        return {"embed_dim": list(arch.widths), "depth": list(arch.depths), "num_heads": list(arch.heads),
                "key_dim": [self.key_dim] * n, "window_size": list(self.window_size), "kernels": list(self.kernels)}

    def build(self, arch: VitArch, **kwargs) -> nn.Module:
        from zoo.models.efficientvit import EfficientVit

        self.check(arch)
        return EfficientVit(img_size=self.img_size, num_classes=self.num_classes, **self.to_config(arch), **kwargs)

    def moves(self, arch: VitArch) -> list[Move]:
        """Every action available from `arch`, in tie-break order (class docstring)."""
        out = []
        for i in range(len(arch.widths)):
            w, h, b = arch.widths[i], arch.heads[i], arch.blocks[i]
            if len(b) > 1:
                out.append(Move("drop", i, f"drop stage {i + 1}'s last block", _replace(arch, blocks=(i, b[:-1]))))
            fewer = [k for k in range(h - 1, 0, -1) if w % k == 0]
            if fewer:
                out.append(Move("heads", i, f"stage {i + 1} heads {h} -> {fewer[0]}", _replace(arch, heads=(i, fewer[0]))))
            narrower = [c for c in self.widths_for(i, h) if c < w]
            if narrower:
                out.append(Move("shrink", i, f"shrink stage {i + 1} {w} -> {narrower[-1]}",
                                _replace(arch, widths=(i, narrower[-1]))))
        return out

    def block_map(self, arch: VitArch) -> tuple[tuple[int, ...], ...]:
        return arch.blocks

    # -- blocks ---------------------------------------------------------------------------

    def block(self, key: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
        """The deploy form of one block (random weights from `seed`) and its input shape."""
        from zoo.models import efficientvit as ev
        from zoo.models.cpu_kernels import use_deploy_kernels
        from zoo.nn import fuse_modules
        from zoo.testing import randomize_

        kind, f = self.parse_key(key)
        r = f["r"]
        if kind == "embed":
            module, shape = _Nhwc(ev.PatchEmbedding(f["i"], f["c"])), (f["i"], r, r)
        elif kind == "merge":
            stage = ev.EfficientVitStage(f["i"], f["c"], self.key_dim, 1, 1.0, r, 1, self.kernels, 0, True, [])
            module, shape = _Nhwc(stage.downsample), (f["i"], r, r)
        elif kind == "blk":
            c, h = f["c"], f["h"]
            module = _Nhwc(ev.EfficientVitBlock(c, f["k"], h, c / (f["k"] * h), r, f["w"], self.kernels))
            shape = (c, r, r)
        else:
            from zoo.models.layers import NormLinear

            module, shape = nn.Sequential(_Mean(), NormLinear(f["c"], f["n"])), (f["c"], r, r)
        wrapper = randomize_(nn.Sequential(module).eval(), seed=seed, scale=0.1)
        fuse_modules(wrapper)
        for m in wrapper.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = True  # as the deployed network (EfficientVit._fold_for_deploy)
        use_deploy_kernels(wrapper)
        return wrapper.requires_grad_(False), (1, *shape)


def _replace(arch: VitArch, **change) -> VitArch:
    """`arch` with one stage's field replaced: ``field=(stage, value)``."""
    (name, (i, value)), = change.items()
    values = list(getattr(arch, name))
    values[i] = value
    return VitArch(**{**{k: getattr(arch, k) for k in ("widths", "heads", "blocks")}, name: tuple(values)})


class _Nhwc(nn.Module):
    """Runs `m` as the deployed network does: on its channels-last kernels when they apply
    (eager CPU inference), else its plain forward (export, other devices). NCHW in and out."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from zoo.models.nhwc import nhwc_applies, run_nhwc

        if nhwc_applies(x):
            return run_nhwc(self.m, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.m(x)


class _Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
