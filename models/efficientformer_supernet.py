"""The EfficientFormer supernet of latency-driven slimming (arXiv 2206.01191, section 4).

Built from the EfficientFormer classes (`zoo.models.efficientformer`): the same stem, stage
downsampling, Meta4D and Meta3D blocks and heads, at the supernet's widths and depths. Every
block position of a stage is a slot (`MetaPath`) holding the paper's choices:

- stages 1-2: ``{mb4d, identity}``; stages 3-4: ``{mb4d, mb3d, identity}``;
- the slot's output is the mixture ``sum_k softmax((alpha + eps) / tau)_k * path_k(x)`` with
  one architecture parameter ``alpha`` per choice, trained jointly with the weights (plain
  parameters: the optimiser of `zoo train` updates them, without weight decay since they are
  1-D); ``eps`` is the paper's uniform noise ``U(0, 1)`` (``noise="uniform"``) or Gumbel noise
  (``noise="gumbel"``), in training only; ``noise="none"`` turns it off.

Choices the paper leaves open (all arguments):

- **Temperature schedule**: ``tau`` goes from ``tau_start`` (5.0) to ``tau_end`` (0.5) over
  ``tau_steps`` training forward passes, ``exponential`` (default) or ``linear``, then stays.
  The count of training forwards is a persistent buffer (``num_updates``), so a resumed run
  continues the schedule exactly.
- **MB3D in stage 3** works on the 4D maps: the slot flattens the map to tokens, runs a
  Meta3D block with its attention grid at stage 3's size, and lays the tokens back. (A slimmed
  EfficientFormer has Meta3D blocks only at the end of stage 4, as the released L1/L3/L7 do;
  stage 3's MB3D path counts towards keeping its slot.)
- **The final norm** is the channel LayerNorm on maps (every slot's output is a map), with
  ``nn.LayerNorm``'s eps 1e-5: the same function as the token LayerNorm of a slimmed model
  with Meta3D blocks (one without them gets EfficientFormer's ``LayerNorm2d``, eps 1e-6).
- **Initial alphas** are zero (a uniform mixture).

`EfficientFormerSupernet.subnet_state_dict` gives a slimmed EfficientFormer its weights: each
kept slot's chosen block, and for a narrower stage the first channels of every tensor (the
convention of slimmable networks; which channels to keep is not in the paper).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from zoo.errors import ConfigError
from zoo.models.efficientformer import (INPUT, _PAPER, DistilledClassifier, Downsample, EfficientFormer, MetaBlock1d,
                                         MetaBlock2d, Stem4, conv_grid)
from zoo.models.image_model import image_cfg
from zoo.registry import ModelCard, register_model

__all__ = ["EfficientFormerSupernet", "MetaPath", "MB3DOnMap", "slot_choices"]

NOISES = ("uniform", "gumbel", "none")


def slot_choices(stage: int) -> tuple[str, ...]:
    """The paper's MetaPath choices of a slot in stage `stage` (0-based)."""
    return ("mb4d", "identity") if stage < 2 else ("mb4d", "mb3d", "identity")


class MB3DOnMap(nn.Module):
    """A Meta3D block on ``[B, C, H, W]`` maps: flatten to ``[B, H*W, C]``, attend, lay back."""

    def __init__(self, dim: int, resolution: int, **kwargs):
        super().__init__()
        self.block = MetaBlock1d(dim, resolution=resolution, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.block(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, c, h, w)


class MetaPath(nn.Module):
    """One slot: the weighted sum of its choices' outputs, weights from `EfficientFormerSupernet`."""

    def __init__(self, choices: dict[str, nn.Module]):
        super().__init__()
        self.names = tuple(choices)
        self.choices = nn.ModuleDict({k: v for k, v in choices.items() if k != "identity"})
        self.alpha = nn.Parameter(torch.zeros(len(self.names)))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = 0
        for w, name in zip(weights, self.names):
            out = out + w * (x if name == "identity" else self.choices[name](x))
        return out


class EfficientFormerSupernet(DistilledClassifier, nn.Module):
    """EfficientFormer supernet. Input ``[B, in_chans, img_size, img_size]``, output
    ``[B, num_classes]`` (the pair ``(cls, dist)`` in distilled training, as EfficientFormer).

    Args (beyond EfficientFormer's): ``depths`` are slots per stage; ``noise``, ``tau_start``,
    ``tau_end``, ``tau_steps``, ``tau_schedule``: the mixture's noise and temperature (module
    docstring).
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (6, 6, 18, 8), embed_dims: Sequence[int] = (96, 192, 384, 768),
                 mlp_ratios: float = 4.0, pool_size: int = 3, layer_scale_init_value: float = 1e-5,
                 distillation: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, noise: str = "uniform", tau_start: float = 5.0, tau_end: float = 0.5,
                 tau_steps: int = 10000, tau_schedule: str = "exponential"):
        super().__init__()
        if len(depths) != 4 or len(embed_dims) != 4:
            raise ConfigError("the EfficientFormer supernet has 4 stages: give 4 depths and 4 embed_dims.")
        if noise not in NOISES:
            raise ConfigError(f"noise must be one of {', '.join(NOISES)}, not {noise!r}.")
        if tau_schedule not in ("exponential", "linear") or not 0 < tau_end <= tau_start or tau_steps < 0:
            raise ConfigError("the temperature goes from tau_start down to tau_end > 0 over tau_steps >= 0 steps, "
                              "exponential or linear.")
        if not isinstance(img_size, int) or img_size < 32:
            raise ConfigError(f"img_size must be an int of at least 32 (got {img_size!r}).")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.depths, self.embed_dims, self.mlp_ratios = tuple(depths), tuple(embed_dims), mlp_ratios
        self.noise, self.tau_start, self.tau_end, self.tau_steps, self.tau_schedule = (
            noise, tau_start, tau_end, tau_steps, tau_schedule)
        self.fixed_input_size = True  # the MB3D paths' bias tables fix the grids
        self.head_on_tokens = False
        self.distilled_training = False
        self.grad_checkpointing = False
        self.deployed = False
        self.tau_override: float | None = None
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

        self.stem = Stem4(in_chans, embed_dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, self.feature_info, prev, k = [], [], embed_dims[0], 0
        self.grids = tuple(conv_grid(img_size, 2 + i) for i in range(4))
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            slots = []
            for _ in range(depth):
                common = dict(mlp_ratio=mlp_ratios, drop=proj_drop_rate, drop_path=rates[k],
                              layer_scale_init_value=layer_scale_init_value)
                choices: dict[str, nn.Module] = {"mb4d": MetaBlock2d(dim, pool_size, resolution=self.grids[i], **common)}
                if "mb3d" in slot_choices(i):
                    choices["mb3d"] = MB3DOnMap(dim, self.grids[i], **common)
                choices["identity"] = nn.Identity()
                slots.append(MetaPath(choices))
                k += 1
            stage = nn.Module()
            stage.downsample = Downsample(prev, dim) if i else nn.Identity()
            stage.blocks = nn.ModuleList(slots)
            stages.append(stage)
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
            prev = dim
        self.stages = nn.ModuleList(stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = LayerNorm2d(self.num_features, eps=1e-5)  # nn.LayerNorm's, as a slimmed model with Meta3D blocks
        self.head_drop = nn.Dropout(drop_rate)
        self.distillation = distillation
        self._make_heads(num_classes)
        self.apply(EfficientFormer._init_weights)  # EfficientFormer's init, so extracted subnets start alike
        self.pretrained_cfg = image_cfg(INPUT, in_chans, img_size, num_classes, first_conv="stem.conv1",
                                        classifier=("head", "head_dist") if distillation else "head",
                                        fixed_input_size=True)

    # -- the mixture ----------------------------------------------------------------------

    def slots(self) -> list[tuple[int, int, MetaPath]]:
        """``(stage, slot index, MetaPath)`` for every slot, in order."""
        return [(i, j, p) for i, s in enumerate(self.stages) for j, p in enumerate(s.blocks)]

    def temperature(self) -> float:
        """The schedule's temperature now (or ``tau_override`` when set)."""
        if self.tau_override is not None:
            return self.tau_override
        t = min(1.0, int(self.num_updates) / self.tau_steps) if self.tau_steps else 1.0
        if self.tau_schedule == "linear":
            return self.tau_start + t * (self.tau_end - self.tau_start)
        return self.tau_start * (self.tau_end / self.tau_start) ** t

    def mixture_weights(self, alpha: torch.Tensor, tau: float, noisy: bool) -> torch.Tensor:
        """``softmax((alpha + eps) / tau)`` over a slot's choices; eps only when `noisy`."""
        if noisy and self.noise != "none":
            u = torch.rand_like(alpha)
            eps = u if self.noise == "uniform" else -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-10)))
            alpha = alpha + eps
        return F.softmax(alpha / tau, dim=0)

    def probabilities(self) -> list[dict[str, float]]:
        """Each slot's ``softmax(alpha)`` (no noise, temperature 1): what importance reads."""
        return [dict(zip(p.names, F.softmax(p.alpha.detach().float(), 0).tolist())) for _, _, p in self.slots()]

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        tau = self.temperature()
        noisy = self.training
        if self.training and torch.is_grad_enabled():
            self.num_updates += 1
        for stage in self.stages:
            x = stage.downsample(x)
            for path in stage.blocks:
                x = path(x, self.mixture_weights(path.alpha, tau, noisy))
        return x

    @torch.jit.ignore
    def arch_parameters(self) -> list[nn.Parameter]:
        return [p.alpha for _, _, p in self.slots()]

    def reparameterize(self):
        raise ConfigError("a supernet is not deployed itself: slim it (zoo slim) and deploy the slimmed model.")

    # -- weight inheritance ---------------------------------------------------------------

    def subnet_state_dict(self, kept: Sequence[Sequence[tuple[int, str]]]) -> dict:
        """The supernet's tensors under a slimmed ``EfficientFormer``'s keys, at the supernet's
        widths (`load_sliced` cuts them): ``kept[i]`` lists stage i's kept slots as
        ``(slot index, choice)``, in order, Meta3D ones (``mb3d``, stage 4 only) last."""
        sd = self.state_dict()
        out: dict[str, torch.Tensor] = {}
        src_of: dict[str, str] = {}
        for k in sd:
            if not k.startswith("stages.") and k != "num_updates":
                src_of[k] = k
        for i, slots in enumerate(kept):
            if i:
                for k in sd:
                    if k.startswith(f"stages.{i}.downsample."):
                        src_of[k] = k
            n3 = sum(c == "mb3d" for _, c in slots)
            if n3 and (i != 3 or any(c == "mb3d" for _, c in slots[: len(slots) - n3])):
                raise ConfigError("Meta3D blocks of a slimmed EfficientFormer are the last ones of stage 4.")
            target = 0
            for n, (j, choice) in enumerate(slots):
                if choice not in ("mb4d", "mb3d"):
                    raise ConfigError(f"a kept slot is mb4d or mb3d, not {choice!r}.")
                if n == len(slots) - n3:
                    target += 1  # EfficientFormer's Flat module sits before the first Meta3D block
                prefix = f"stages.{i}.blocks.{j}.choices.{choice}." + ("block." if choice == "mb3d" else "")
                for k in sd:
                    if k.startswith(prefix):
                        src_of[f"stages.{i}.blocks.{target}.{k[len(prefix):]}"] = k
                target += 1
        for dst, src in src_of.items():
            out[dst] = sd[src]
        return out

    def extract(self, widths: Sequence[int], kept: Sequence[Sequence[tuple[int, str]]], **kwargs) -> nn.Module:
        """The slimmed EfficientFormer with inherited weights (see `subnet_state_dict`)."""
        num_vit = sum(c == "mb3d" for _, c in kept[3])
        model = EfficientFormer(img_size=self.img_size, in_chans=self.in_chans, num_classes=self.num_classes,
                                depths=[len(k) for k in kept], embed_dims=list(widths), num_vit=num_vit,
                                mlp_ratios=self.mlp_ratios, distillation=self.distillation, **kwargs)
        load_sliced(model, self.subnet_state_dict(kept))
        return model.eval()


def load_sliced(model: nn.Module, sd: dict) -> None:
    """Load `sd` into `model`, each tensor cut to the model's shape from its first entries along
    every dimension; every key of the model must be present."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    if missing:
        raise ConfigError(f"the supernet has no weights for {missing[:5]}: the slimmed architecture does not fit it.")
    cut = {}
    for k, t in own.items():
        src = sd[k]
        if src.dim() != t.dim() or any(a < b for a, b in zip(src.shape, t.shape)):
            raise ConfigError(f"{k}: the supernet's {tuple(src.shape)} cannot give {tuple(t.shape)}.")
        cut[k] = src[tuple(slice(0, n) for n in t.shape)].clone()
    model.load_state_dict(cut)


register_model(ModelCard(
    name="efficientformer_supernet",
    family="efficientformer-supernet",
    task="supernet",
    paper=_PAPER,
    builder=EfficientFormerSupernet,
    config=dict(img_size=224, num_classes=1000, depths=(6, 6, 18, 8), embed_dims=(96, 192, 384, 768)),
    input=INPUT,
    feature_out_indices=None,
    metrics={},
    weights={},
    default_tag=None,
    license="apache-2.0",
    description="The latency-driven slimming supernet (MetaPath slots over Meta4D, Meta3D and identity); "
                "train it, then zoo slim. Widths and depths of L7 by default.",
))
