"""Point cloud completion with a conditional PSF: a partial cloud in, the whole shape out in one step.

Conditioned as PVD's completion model (alexzhou907/PVD, ``train_completion.py``): the
network sees one cloud of ``num_points`` points, the first ``num_given`` of them the
partial input, clean at every time, the rest the flow's state; only the velocity of the
generated points is used, and the output is the given points followed by the generated
ones, so the given points are kept exactly. Trained through PSF's three stages
(`zoo.train.psf`, ``num_given > 0``): flow, reflow and distillation, each on the generated
points only.

Choices PVD and PSF leave open here, each in the config:

- **Given-point flag**: one extra input channel, 1 on given points and 0 on generated ones
  (``PVCNN2Config.extra_feature_channels = 1``). PVD's network gets no flag and must tell
  clean from noisy points by their spread; a one-step model starts from pure noise, where
  the flag is the only clue. A generator checkpoint initialises it (:func:`widen_state_dict`:
  the flag's weights start at zero, so it starts as the unconditional field).
- **Any number of given points** (at least 16): :meth:`PSFCompletion.prepare_given` brings
  the partial cloud to ``num_given`` points, by farthest-point sampling when it has more
  (even coverage, deterministic) and by repeating points when it has fewer (repeats change
  no voxel average and no ball query's neighbourhood, only their weight).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from zoo.errors import ConfigError

from .flow import sample_euler
from .model import FlowModel
from .point_ops import furthest_point_sample
from .pvcnn import PVCNN2, PVCNN2Config

__all__ = ["PSFCompletion", "ConditionedField", "OneStepCompletion", "widen_state_dict", "MIN_GIVEN"]

MIN_GIVEN = 16


class ConditionedField(nn.Module):
    """``v(x, t)`` of the generated points ``x [B,N-K,3]`` given ``given [B,K,3]`` (normalized
    coordinates): the velocity network run on ``cat(given, x)`` with the given-point flag."""

    def __init__(self, velocity: PVCNN2, given: torch.Tensor):
        super().__init__()
        self.velocity, self.given = velocity, given

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = self.given.shape[1]
        given = self.given.to(x.dtype)
        pts = torch.cat([given, x], 1)
        # ones_like / zeros_like of slices: CoreML's converter has no new_ones
        flag = torch.cat([torch.ones_like(given[..., :1]), torch.zeros_like(x[..., :1])], 1)
        return self.velocity(pts, t, flag)[:, k:]


class PSFCompletion(FlowModel):
    """Conditional PSF over ``num_points`` points of which ``num_given`` are the partial input.

    Keeps the training data's normalization as `PSF` does (`FlowModel`); inputs and outputs
    are in data coordinates.
    """

    def __init__(self, config: PVCNN2Config, num_given: int):
        if config.extra_feature_channels != 1:
            raise ConfigError("the completion model takes one extra feature channel (the given-point flag): "
                              "build its PVCNN2Config with extra_feature_channels=1.")
        if not MIN_GIVEN <= num_given < config.num_points:
            raise ConfigError(f"num_given must be in [{MIN_GIVEN}, {config.num_points}), not {num_given}.")
        super().__init__(config)
        self.num_given = num_given

    @property
    def num_generated(self) -> int:
        return self.config.num_points - self.num_given

    def prepare_given(self, partial) -> torch.Tensor:
        """A partial cloud ``[M,3]`` or ``[B,M,3]`` (data coordinates, ``M >= 16``) as
        ``[B, num_given, 3]`` in the same coordinates (module docstring)."""
        p = torch.as_tensor(partial, dtype=torch.float32)
        p = p[None] if p.dim() == 2 else p
        if p.dim() != 3 or p.shape[-1] != 3:
            raise ConfigError(f"a partial cloud is [M, 3] (or [B, M, 3]), not {tuple(p.shape)}.")
        if p.shape[1] < MIN_GIVEN:
            raise ConfigError(f"the partial cloud has {p.shape[1]} points; completion needs at least {MIN_GIVEN} "
                              "(give more of the visible surface).")
        if not torch.isfinite(p).all():
            raise ConfigError("the partial cloud holds NaN or infinite coordinates; drop those points.")
        k, m = self.num_given, p.shape[1]
        if m >= k:
            return furthest_point_sample(p.transpose(1, 2), k).transpose(1, 2).contiguous()
        reps = torch.arange(k) % m  # every point once, then again in order: deterministic
        return p[:, reps]

    def field(self, given_normalized: torch.Tensor) -> ConditionedField:
        return ConditionedField(self.velocity, given_normalized)

    def forward(self, given: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One step: ``given [B,K,3]`` (data coordinates), ``noise [B,N-K,3]`` -> ``[B,N,3]``,
        the given points then the generated ones (data coordinates)."""
        g = self.normalize(given)
        t = torch.zeros(noise.shape[0], device=noise.device, dtype=noise.dtype)
        gen = noise + self.field(g)(noise, t)
        return torch.cat([given, self.denormalize(gen)], 1)

    @torch.no_grad()
    def complete(self, partial, steps: int = 1, seed: int | None = None, num: int = 1,
                 batch_size: int = 16) -> torch.Tensor:
        """``[B*num, N, 3]``: each partial cloud completed ``num`` times with ``steps`` Euler steps.

        ``partial``: ``[M,3]``, ``[B,M,3]``, or a list of clouds of any sizes; runs in chunks of
        ``batch_size`` clouds. The noise of all ``B*num`` clouds is drawn at once from ``seed``.
        """
        if isinstance(partial, (list, tuple)):
            given = torch.cat([self.prepare_given(p) for p in partial])
        else:
            given = self.prepare_given(partial)
        given = given.to(self.device).repeat_interleave(num, 0)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        noise = torch.randn(given.shape[0], self.num_generated, 3, generator=g).to(self.device)
        gen = torch.cat([sample_euler(self.field(self.normalize(given[s:s + batch_size])), noise[s:s + batch_size],
                                      steps) for s in range(0, len(given), batch_size)])
        return torch.cat([given, self.denormalize(gen)], 1)

    def export_wrapper(self, input_shape=None):
        """The one-step completion as `zoo.export.ExportTarget` fields: inputs ``given [B,K,3]``
        and ``noise [B,N-K,3]``, output ``points [B,N,3]`` (data coordinates).
        ``input_shape``: the given points' ``(K, 3)`` or ``(B, K, 3)``, or the card's
        ``(K, M, 3)`` / ``(B, K, M, 3)``; default batch 1."""
        shape = tuple(input_shape) if input_shape is not None else (self.num_given, 3)
        if len(shape) in (3, 4) and shape[-2:] == (self.num_generated, 3):
            shape = (*shape[:-2], 3)  # the card's (K, M, 3) form: M is fixed by the model
        shape = (1, *shape) if len(shape) == 2 else shape
        if len(shape) != 3 or shape[1:] != (self.num_given, 3):
            raise ConfigError(f"this completion model takes {self.num_given} given points: (K, 3) or (B, K, 3) with "
                              f"K = {self.num_given}, not {tuple(input_shape)}.")
        g = torch.Generator().manual_seed(0)
        given = torch.randn(shape[0], self.num_given, 3, generator=g) * 0.2
        noise = torch.randn(shape[0], self.num_generated, 3, generator=g)
        return dict(module=OneStepCompletion(self), inputs=(given, noise), input_names=["given", "noise"],
                    output_names=["points"], onnx_exporter="torchscript",
                    metadata={"num_points": self.num_points, "num_given": self.num_given,
                              "sampler": "one Euler step"})


class OneStepCompletion(nn.Module):
    """``(given, noise) -> points``: the export form of :meth:`PSFCompletion.forward`."""

    def __init__(self, model: PSFCompletion):
        super().__init__()
        self.model = model

    def forward(self, given: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.model(given, noise)


def widen_state_dict(generator_sd: dict, model: nn.Module) -> dict:
    """A generator's velocity weights for a network with extra input channels.

    Every tensor that is wider in dimension 1 (the first layer's inputs, the last skip's
    inputs, where the flag is appended) keeps its weights in the leading channels and gets
    zeros in the new ones; the rest is copied. Keys missing from either side are errors.
    """
    target = model.state_dict()
    if set(target) != set(generator_sd):
        missing = sorted(set(target) - set(generator_sd))[:3]
        extra = sorted(set(generator_sd) - set(target))[:3]
        raise ConfigError(f"the generator checkpoint does not fit this network (missing {missing}, unexpected "
                          f"{extra}); start from a generator of the same architecture.")
    out = {}
    for k, v in target.items():
        src = generator_sd[k]
        if src.shape == v.shape:
            out[k] = src.clone()
            continue
        if src.dim() != v.dim() or src.shape[0] != v.shape[0] or src.shape[2:] != v.shape[2:] \
                or src.shape[1] > v.shape[1]:
            raise ConfigError(f"{k}: the generator's {tuple(src.shape)} cannot widen to {tuple(v.shape)}.")
        w = torch.zeros_like(v)
        w[:, :src.shape[1]] = src
        out[k] = w
    return out
