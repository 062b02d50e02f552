"""Search spaces: which blocks a family's architectures are made of, as latency-table keys.

A key names one block at one size: ``kind`` then ``<letter><int>`` fields joined by dots,
``r`` always the grid side of the block's *input*:

=================================  ==========================================================
``stem.i3.c48.r224``               the two stride-2 3x3 Conv-BN-ReLU (3 -> 48 channels, 224 px in)
``down.i48.c96.r56``               a stage's stride-2 Conv-BN (48 -> 96 channels, 56x56 in)
``mb4d.c96.r28.e4``                a Meta4D block (pooling mixer, conv MLP of ratio 4) on 96x28x28
``flat.c448.r7``                   the 4D -> 3D layout change before the first Meta3D block
``mb3d.c448.r7.e4``                a Meta3D block (attention, linear MLP of ratio 4) on 49 tokens
``head.c448.r7.t1.n1000``          norm, token/pixel mean and classifier (``t1``: on tokens)
=================================  ==========================================================

Every block is timed in its deploy form (the form `zoo export` writes: BatchNorm folded,
layer scales folded, the two classifiers merged), since that is what a deployment runs.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn

from zoo.errors import ConfigError, DataError
from zoo.slim.keys import parse_key

__all__ = ["FormerArch", "EfficientFormerSpace", "family_space", "FAMILY_NAMES", "parse_key"]

@dataclass(frozen=True)
class FormerArch:
    """An EfficientFormer architecture: per-stage ``widths`` and ``depths`` (blocks per stage,
    identity slots removed) and ``num_vit``, how many of stage 4's blocks are Meta3D (they are
    its last ones)."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    num_vit: int

    def to_config(self) -> dict:
        """The `zoo.models.efficientformer.EfficientFormer` arguments this architecture sets."""
        return {"embed_dims": list(self.widths), "depths": list(self.depths), "num_vit": self.num_vit}

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class EfficientFormerSpace:
    """EfficientFormer (V1) architectures at one input size, up to a supernet's widths and depths.

    Widths are multiples of ``step`` (16, as the paper's width action) from ``step`` up to
    ``max_widths``; every stage keeps at least one block; Meta3D blocks only at the end of the
    last stage (where the released L1/L3/L7 have them), at most ``max_vit``.
    """

    family = "efficientformer"
    base_model = "efficientformer_l1"  # the registered model a slimmed architecture's config is based on
    kinds = {"stem": ("i", "c", "r"), "down": ("i", "c", "r"), "mb4d": ("c", "r", "e"), "flat": ("c", "r"),
             "mb3d": ("c", "r", "e"), "head": ("c", "r", "t", "n")}

    def __init__(self, img_size: int = 224, max_widths: Sequence[int] = (96, 192, 384, 768),
                 max_depths: Sequence[int] = (6, 6, 18, 8), max_vit: int | None = None, num_classes: int = 1000,
                 mlp_ratio: int = 4, step: int = 16):
        from zoo.models.efficientformer import conv_grid

        if len(max_widths) != 4 or len(max_depths) != 4:
            raise ConfigError("an EfficientFormer space has 4 stages: give 4 max_widths and 4 max_depths.")
        if any(w % step or w < step for w in max_widths):
            raise ConfigError(f"max_widths must be multiples of {step} (got {tuple(max_widths)}).")
        self.img_size, self.num_classes, self.mlp_ratio, self.step = img_size, num_classes, mlp_ratio, step
        self.max_widths, self.max_depths = tuple(max_widths), tuple(max_depths)
        self.max_vit = max_depths[-1] if max_vit is None else max_vit
        self.stem_grid = conv_grid(img_size, 2)
        self.grids = tuple(conv_grid(img_size, 2 + i) for i in range(4))  # stage 1 keeps the stem's grid

    def describe(self) -> dict:
        """The space's size arguments (a table records what it was built to cover)."""
        return {"img_size": self.img_size, "max_widths": list(self.max_widths), "max_depths": list(self.max_depths),
                "max_vit": self.max_vit, "num_classes": self.num_classes, "mlp_ratio": self.mlp_ratio}

    def parse_key(self, key: str, where: str = "") -> tuple[str, dict[str, int]]:
        return parse_key(key, self.kinds, where)

    # -- architectures --------------------------------------------------------------------

    def check(self, arch: FormerArch) -> None:
        """Raise `ConfigError` unless `arch` is in this space."""
        w, d = arch.widths, arch.depths
        if len(w) != 4 or len(d) != 4:
            raise ConfigError(f"{arch}: 4 stages expected.")
        for i in range(4):
            if w[i] % self.step or not self.step <= w[i] <= self.max_widths[i]:
                raise ConfigError(f"{arch}: stage {i + 1} width {w[i]} is not a multiple of {self.step} "
                                  f"in [{self.step}, {self.max_widths[i]}].")
            if not 1 <= d[i] <= self.max_depths[i]:
                raise ConfigError(f"{arch}: stage {i + 1} needs 1 to {self.max_depths[i]} blocks, not {d[i]}.")
        if not 0 <= arch.num_vit <= min(d[3], self.max_vit):
            raise ConfigError(f"{arch}: num_vit must be between 0 and min(stage 4 depth, {self.max_vit}).")

    def keys(self, arch: FormerArch) -> list[str]:
        """The table keys of every block `arch` runs, in order (a block that repeats, repeats)."""
        self.check(arch)
        w, g, e = arch.widths, self.grids, self.mlp_ratio
        keys = [f"stem.i3.c{w[0]}.r{self.img_size}"]
        for i in range(4):
            if i:
                keys.append(f"down.i{w[i - 1]}.c{w[i]}.r{g[i - 1]}")
            n4 = arch.depths[i] - (arch.num_vit if i == 3 else 0)
            keys += [f"mb4d.c{w[i]}.r{g[i]}.e{e}"] * n4
        if arch.num_vit:
            keys.append(f"flat.c{w[3]}.r{g[3]}")
            keys += [f"mb3d.c{w[3]}.r{g[3]}.e{e}"] * arch.num_vit
        keys.append(f"head.c{w[3]}.r{g[3]}.t{int(arch.num_vit > 0)}.n{self.num_classes}")
        return keys

    def all_keys(self) -> list[str]:
        """Every key an architecture of this space can use."""
        g, e, s = self.grids, self.mlp_ratio, self.step
        widths = [range(s, m + 1, s) for m in self.max_widths]
        keys = [f"stem.i3.c{c}.r{self.img_size}" for c in widths[0]]
        for i in range(4):
            keys += [f"mb4d.c{c}.r{g[i]}.e{e}" for c in widths[i]]
            if i:
                keys += [f"down.i{a}.c{c}.r{g[i - 1]}" for a in widths[i - 1] for c in widths[i]]
        if self.max_vit:
            keys += [f"flat.c{c}.r{g[3]}" for c in widths[3]] + [f"mb3d.c{c}.r{g[3]}.e{e}" for c in widths[3]]
        keys += [f"head.c{c}.r{g[3]}.t{t}.n{self.num_classes}" for c in widths[3] for t in ((0, 1) if self.max_vit else (0,))]
        return keys

    def random_arch(self, rng: random.Random) -> FormerArch:
        widths = tuple(rng.randrange(self.step, m + 1, self.step) for m in self.max_widths)
        depths = tuple(rng.randint(1, m) for m in self.max_depths)
        return FormerArch(widths, depths, rng.randint(0, min(depths[3], self.max_vit)))

    def build(self, arch: FormerArch, **kwargs) -> nn.Module:
        """The EfficientFormer of `arch` (training form, random weights)."""
        from zoo.models.efficientformer import EfficientFormer

        self.check(arch)
        return EfficientFormer(img_size=self.img_size, num_classes=self.num_classes, mlp_ratios=self.mlp_ratio,
                               **arch.to_config(), **kwargs)

    # -- blocks ---------------------------------------------------------------------------

    chainable = ("mb4d", "mb3d")  # kinds whose output has their input's shape: timed as chains

    def block(self, key: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
        """The deploy form of one block (random weights from `seed`), and the input shape it
        runs on (batch 1)."""
        from zoo.models import efficientformer as ef
        from zoo.models.cpu_kernels import use_deploy_kernels
        from zoo.nn import fuse_modules
        from zoo.testing import randomize_

        kind, f = self.parse_key(key)
        r = f["r"]
        if kind == "stem":
            module, shape = ef.Stem4(f["i"], f["c"]), (f["i"], r, r)
        elif kind == "down":
            module, shape = ef.Downsample(f["i"], f["c"]), (f["i"], r, r)
        elif kind == "mb4d":
            module, shape = ef.MetaBlock2d(f["c"], mlp_ratio=f["e"], resolution=r), (f["c"], r, r)
        elif kind == "flat":
            module, shape = ef.Flat(), (f["c"], r, r)
        elif kind == "mb3d":
            module, shape = ef.MetaBlock1d(f["c"], mlp_ratio=f["e"], resolution=r), (r * r, f["c"])
        else:
            module = _Head(f["c"], bool(f["t"]), f["n"])
            shape = (r * r, f["c"]) if f["t"] else (f["c"], r, r)
        wrapper = randomize_(nn.Sequential(module).eval(), seed=seed, scale=0.1)  # folding does real work, as on trained weights
        fuse_modules(wrapper)
        use_deploy_kernels(wrapper)
        return wrapper.requires_grad_(False), (1, *shape)


class _Head(nn.Module):
    """EfficientFormer's deploy-form head: the final norm, the mean, one (merged) classifier."""

    def __init__(self, dim: int, tokens: bool, num_classes: int):
        from timm.layers import LayerNorm2d

        super().__init__()
        self.tokens = tokens
        self.norm = nn.LayerNorm(dim) if tokens else LayerNorm2d(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.head(x.mean(dim=1) if self.tokens else x.mean(dim=(2, 3)))


def _families() -> dict:
    from zoo.slim.space_v2 import EfficientFormerV2Space
    from zoo.slim.space_vit import EfficientVitSpace

    return {"efficientformer": EfficientFormerSpace, "efficientformerv2": EfficientFormerV2Space,
            "efficientvit": EfficientVitSpace}


FAMILY_NAMES = ("efficientformer", "efficientformerv2", "efficientvit")


def family_space(family: str, where: str = "", **kwargs):
    """The search space class's instance for `family` (kwargs: its size arguments)."""
    try:
        cls = _families()[family]
    except KeyError:
        raise DataError(f"{where + ': ' if where else ''}no search space for family {family!r}; "
                        f"zoo slims {', '.join(FAMILY_NAMES)}.") from None
    return cls(**kwargs)
