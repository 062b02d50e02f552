"""Channels-last eager CPU inference: a deploy-form model's function on NHWC tensors.

At batch 1 a small vision model is hundreds of layers of a few million multiply-adds each,
and on the CPU much of its time is spent around the arithmetic: Python module calls,
layout conversions between layers, separate passes for activations and residual sums (and
oneDNN's fixed cost per call, which stays). `run_nhwc` runs a module tree on ``[B, H, W, C]`` tensors
instead: every 1x1 conv is one product of the ``[B*H*W, C]`` token rows, every other conv
reads and writes NHWC through oneDNN, so no layer changes the layout; ReLUs and residual
sums are fused into the conv or product that produces their input, and composite modules
(a family's blocks) run their children by direct method calls instead of ``__call__``.
The outputs are the module path's to float rounding.

The protocol: a module that has a fused channels-last form defines
``forward_nhwc(t, add=None) -> f(t) + add`` (``t`` and the result contiguous NHWC);
`run_nhwc` calls it, or handles the generic containers (`nn.Sequential`, `Residual`,
`nn.Identity`, `nn.ReLU`) itself, or falls back to the module's own forward on the NCHW
view (`nchw_fallback`). A module with forward hooks is always called through its forward,
so its hooks fire and see NCHW tensors as usual; the leaf layers check their own hooks.

Enter only where `nhwc_applies` holds (eager float32 CPU inference); the leaves re-check
what concerns them (their weights' dtype and autograd) and fall back on their own.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.models.cpu_kernels import DeployConv2d, DeploySequential, can_write_inplace, hooked, nchw_fallback, onednn_enabled
from zoo.models.layers import Residual

__all__ = ["nhwc_applies", "hooked", "run_nhwc"]


def nhwc_applies(x: torch.Tensor) -> bool:
    """True when a deploy-form model may run its channels-last kernels on `x`: a 4-D float32
    CPU tensor, oneDNN available, eager mode (no tracing, scripting, compiling or exporting),
    no autograd through `x`, and no global module hooks (which every module call must fire)."""
    return (
        x.dim() == 4
        and x.dtype == torch.float32
        and x.is_cpu
        and can_write_inplace(x)  # eager, and no autograd history through x
        and not _global_hooks()
        and onednn_enabled()  # False too when ZOO_CPU_KERNELS=0
    )


def _global_hooks() -> bool:
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def run_nhwc(module: nn.Module, t: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``module(x) + add`` on NHWC tensors: ``t [B, H, W, C]`` is the NHWC layout of ``x``;
    the result is the output's contiguous NHWC layout (see the module docstring)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return nchw_fallback(module, t, add=add)
    fused = getattr(type(module), "forward_nhwc", None)
    if fused is not None:
        return fused(module, t, add=add)
    if isinstance(module, Residual):
        mods = module._modules  # direct registry reads: nn.Module.__getattr__ is slow in a hot path
        if hooked(mods["drop_path"]):
            return nchw_fallback(module, t, add=add)
        # Inference: stochastic depth is the identity, so the branch's sum is fused into it.
        y = run_nhwc(mods["m"], t, add=t)
        return y if add is None else y + add
    if isinstance(module, nn.Sequential) and type(module).forward in _PLAIN_SEQUENCES:
        y = _run_sequence(list(module._modules.values()), t)
        return y if add is None else y + add
    if isinstance(module, nn.Identity):
        return t if add is None else t + add
    if type(module) is nn.ReLU:
        y = F.relu(t)
        return y if add is None else y.add_(add)
    return nchw_fallback(module, t, add=add)


# Sequentials whose forward is the plain chain (DeploySequential's only fuses activations)
_PLAIN_SEQUENCES = (nn.Sequential.forward, DeploySequential.forward)


def _run_sequence(mods: list[nn.Module], t: torch.Tensor) -> torch.Tensor:
    """A Sequential's children in order, each conv followed by a ReLU run as one fused call."""
    i, n = 0, len(mods)
    while i < n:
        m = mods[i]
        if (
            i + 1 < n
            and isinstance(m, DeployConv2d)
            and type(mods[i + 1]) is nn.ReLU
            and not hooked(m, mods[i + 1])
        ):
            t = m.forward_nhwc(t, act="relu")
            i += 2
        else:
            t = run_nhwc(m, t)
            i += 1
    return t
