"""Straight-flow generation with a velocity network: losses and samplers (PSF, arXiv 2212.01747).

Convention (PSF's ``train_flow.py``): noise ``x0 ~ N(0, I)`` at ``t = 0``, data ``x1`` at
``t = 1``, ``x_t = t x1 + (1 - t) x0``, and the network ``v(x_t, t)`` regresses the constant
velocity ``x1 - x0``. Sampling integrates ``dx/dt = v(x, t)`` from ``t = 0`` to ``1``.

- :func:`flow_loss`: stage 1 (flow) with fresh noise, stage 2 (reflow) with the stored
  noise of each (noise, sample) pair.
- stage 3's loss (one step ``x1_hat = x0 + v(x0, 0)`` against the teacher's multi-step
  result for the same noise) is `zoo.train.psf.distill_loss`: it needs the point cloud metrics.
- :func:`sample_euler` (any number of steps) and :func:`sample_rk45` (adaptive, scipy's
  ``solve_ivp``, as the rectified-flow code PSF builds on).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from zoo.errors import require

__all__ = ["flow_loss", "sample_euler", "sample_rk45", "OneStepGenerator"]


def flow_loss(model: nn.Module, x1: torch.Tensor, x0: torch.Tensor | None = None,
              t: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error ``[B]`` between ``v(x_t, t)`` and ``x1 - x0`` (mean over points and axes).

    ``x1 [B,N,3]`` data; ``x0`` noise (fresh ``N(0, I)`` when None); ``t [B]`` uniform in
    ``[0, 1)`` when None.
    """
    if x0 is None:
        x0 = torch.randn_like(x1)
    if t is None:
        t = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype)
    tb = t.view(-1, 1, 1)
    xt = tb * x1 + (1 - tb) * x0
    return (model(xt, t) - (x1 - x0)).pow(2).mean((1, 2))


@torch.no_grad()
def sample_euler(model: nn.Module, x0: torch.Tensor, steps: int = 1, return_trajectory: bool = False):
    """Integrate from noise ``x0 [B,N,3]`` with ``steps`` Euler steps of size ``1/steps``.

    Step ``i`` evaluates ``v`` at ``t = i / steps``; one step is ``x0 + v(x0, 0)``.
    Returns the samples, or ``(samples, [x at t = 0, 1/steps, ..., 1])``.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    x = x0
    traj = [x0]
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt, device=x.device, dtype=x.dtype)
        x = x + model(x, t) * dt
        if return_trajectory:
            traj.append(x)
    return (x, traj) if return_trajectory else x


@torch.no_grad()
def sample_rk45(model: nn.Module, x0: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5,
                t0: float = 1e-3) -> tuple[torch.Tensor, int]:
    """Adaptive Dormand-Prince (scipy ``solve_ivp``, RK45) from ``t0`` to 1; returns ``(x1, nfe)``.

    Starts at ``t0 = 1e-3`` as the rectified-flow reference code does. The state is flattened
    to float64 for scipy; the network runs in ``x0``'s dtype and device.
    """
    solve_ivp = require("scipy.integrate", "3d", "adaptive RK45 sampling").solve_ivp

    shape, device, dtype = x0.shape, x0.device, x0.dtype
    nfe = 0

    def fun(t, y):
        nonlocal nfe
        nfe += 1
        x = torch.from_numpy(y).to(device=device, dtype=dtype).view(shape)
        tt = torch.full((shape[0],), float(t), device=device, dtype=dtype)
        return model(x, tt).double().cpu().numpy().reshape(-1)

    sol = solve_ivp(fun, (t0, 1.0), x0.double().cpu().numpy().reshape(-1), method="RK45",
                    rtol=rtol, atol=atol)
    x1 = torch.from_numpy(np.asarray(sol.y[:, -1])).to(device=device, dtype=dtype).view(shape)
    return x1, nfe


class OneStepGenerator(nn.Module):
    """``noise [B,N,3] -> mean + std * (x0 + v(x0, 0))``: the one-step generator, export-ready."""

    def __init__(self, velocity: nn.Module, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.velocity = velocity
        self.register_buffer("mean", torch.zeros(3) if mean is None else mean.reshape(3))
        self.register_buffer("std", torch.ones(1) if std is None else std.reshape(1))

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(noise.shape[0], device=noise.device, dtype=noise.dtype)
        return self.mean + self.std * (noise + self.velocity(noise, t))
