"""The registered PSF generator: a PVCNN2 velocity field plus its samplers.

``PSF.forward(noise [B,N,3])`` is the one-step generator ``x0 + v(x0, 0)`` (what the
distilled model is for, and what export traces); :meth:`PSF.sample` runs any number of
Euler steps or the adaptive RK45 sampler. The flow runs in the training data's normalized
coordinates; the buffers ``data_mean [3]`` and ``data_std [1]`` (saved with the weights, 0
and 1 when the data was not normalized) map every output back: ``mean + std * x``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .flow import OneStepGenerator, sample_euler, sample_rk45
from .pvcnn import PVCNN2, PVCNN2Config

__all__ = ["FlowModel", "PSF"]


class FlowModel(nn.Module):
    """A PVCNN2 velocity field (``velocity``) that flows in normalized coordinates, with the
    buffers ``data_mean [3]`` and ``data_std [1]`` that map them to data coordinates."""

    def __init__(self, config: PVCNN2Config):
        super().__init__()
        self.config = config
        self.velocity = PVCNN2(config)
        self.register_buffer("data_mean", torch.zeros(3))
        self.register_buffer("data_std", torch.ones(1))

    @property
    def num_points(self) -> int:
        return self.config.num_points

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Data coordinates to normalized flow coordinates: ``(x - mean) / std``."""
        return (x - self.data_mean) / self.data_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized flow coordinates to data coordinates: ``mean + std * x``."""
        return self.data_mean + self.data_std * x


class PSF(FlowModel):
    """Point Straight Flow generator over ``num_points`` points (arXiv 2212.01747)."""

    def __init__(self, config: PVCNN2Config = PVCNN2Config()):
        super().__init__(config)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``noise [B,N,3]``, in data coordinates: ``denormalize(noise + v(noise, 0))``."""
        t = torch.zeros(noise.shape[0], device=noise.device, dtype=noise.dtype)
        return self.denormalize(noise + self.velocity(noise, t))

    def noise(self, num: int, seed: int | None = None, device=None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        return torch.randn(num, self.num_points, 3, generator=g).to(device or self.device)

    @torch.no_grad()
    def sample(self, num: int = 1, steps: int = 1, method: str = "euler", seed: int | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """``[num, N, 3]`` clouds: ``method`` ``euler`` with ``steps`` steps, or ``rk45`` (adaptive)."""
        x0 = noise if noise is not None else self.noise(num, seed)
        if method == "euler":
            return self.denormalize(sample_euler(self.velocity, x0, steps))
        if method == "rk45":
            return self.denormalize(sample_rk45(self.velocity, x0)[0])
        raise ValueError(f"method must be 'euler' or 'rk45', not {method!r}")

    def export_wrapper(self, input_shape=None):
        """The one-step generator with a noise example ``[B,N,3]``, as the fields of a
        `zoo.export.ExportTarget` (a dict, so the model needs nothing from `zoo.export`).

        It names the TorchScript ONNX exporter: the dynamo exporter traces and translates the
        model, but its graph optimizer does not finish on the ~340 unrolled
        farthest-point-sampling steps in any reasonable time.
        ``input_shape``: ``(N, 3)`` or ``(B, N, 3)``; default ``(1, num_points, 3)``.
        """
        from zoo.errors import ConfigError

        shape = tuple(input_shape) if input_shape is not None else (self.num_points, 3)
        shape = (1, *shape) if len(shape) == 2 else shape
        if len(shape) != 3 or shape[2] != 3:
            raise ConfigError(f"PSF generates from noise of shape (N, 3) or (B, N, 3), not {tuple(input_shape)}.")
        g = torch.Generator().manual_seed(0)
        module = OneStepGenerator(self.velocity, self.data_mean.clone(), self.data_std.clone())
        return dict(module=module, inputs=(torch.randn(shape, generator=g),), input_names=["noise"],
                    output_names=["points"], onnx_exporter="torchscript",
                    metadata={"num_points": self.num_points, "sampler": "one Euler step"})
