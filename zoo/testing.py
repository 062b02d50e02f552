"""Helpers for parity checks between implementations (used by the tests and benchmarks)."""
from __future__ import annotations

import torch

__all__ = ["randomize_", "rel_err"]


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every float tensor of the state dict random values, in place; returns `model`.

    Weights, layer scales and attention biases get ``N(0, scale^2)``; BatchNorm running
    variances get ``U(0.5, 1.5)``. Default inits (zero biases, unit BatchNorm, zero-gamma
    residual branches) make two implementations agree even where they differ.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * scale)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``: the relative difference the parity tests bound."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
