"""The errors a user can cause. Each message says what went wrong and what to do next.

The CLI prints these messages without a traceback and exits with status 2; anything
else escaping is a bug in zoo.
"""
from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "ZooError",
    "UnknownModelError",
    "ConfigError",
    "WeightsError",
    "ExportError",
    "DataError",
    "RenderError",
    "MissingExtraError",
    "MissingAssetError",
    "require",
    "closest",
]


class ZooError(Exception):
    """Base class of every error zoo raises on bad input."""


class UnknownModelError(ZooError, KeyError):
    """No registered model (or weight tag) has that name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ConfigError(ZooError, ValueError):
    """An override, argument or option that the model or command does not take."""


class WeightsError(ZooError):
    """A weights file that is missing, corrupt, unsafe, or for another architecture."""


class ExportError(ZooError):
    """An export that cannot be produced, or that does not match the PyTorch model."""


class DataError(ZooError):
    """A dataset that is missing, empty or unreadable."""


class RenderError(ZooError, ValueError):
    """Tensors that `zoo.render` cannot rasterize or shade (shape, dtype, device, backend)."""


class MissingAssetError(ZooError, FileNotFoundError):
    """A file the user must bring (a licensed body model such as SMPL) is not where zoo looks."""


class MissingExtraError(ZooError, ImportError):
    """An optional dependency that this use needs is not installed."""


def require(module: str, extra: str, purpose: str):
    """Import `module` (an optional dependency) or raise `MissingExtraError` naming the
    ``pip install "zoo[<extra>]"`` that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{purpose} needs {module.split('.')[0]}, which is not installed: pip install \"zoo[{extra}]\" "
            f"(or \"zoo[all]\")."
        ) from e


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates nearest to `name`, best first (difflib ratio, then substring hits)."""
    candidates = list(candidates)
    near = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    for c in candidates:
        if len(near) >= n:
            break
        if name and name.lower() in c.lower() and c not in near:
            near.append(c)
    return near
