"""The nvdiffrast backend: thin calls into ``nvdiffrast.torch`` on CUDA tensors.

Install with ``pip install -e ".[nvdiffrast]"`` (PyPI name ``diffrp-nvdiffrast``); it compiles
its CUDA code on first use, which needs ``nvcc`` and ``ninja`` on the GPU machine. When the
JIT build cannot find the CUDA headers that pip's ``nvidia-*`` wheels carry, point ``CPATH``
at them (``$(python -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__))')/*/include``).
"""
from __future__ import annotations

import functools
import glob
import importlib
import os
import sys

import torch

from zoo.errors import RenderError

__all__ = ["available", "import_error", "context", "module"]


@functools.lru_cache(maxsize=1)
def _load():
    try:
        import nvdiffrast.torch as dr  # noqa: PLC0415 - optional accelerator
    except Exception as exc:  # ImportError, or a failing JIT build at import time
        return None, exc
    return dr, None


def available() -> bool:
    """True when CUDA is present and nvdiffrast imports and builds its CUDA plugin.

    The first call on a GPU machine may take minutes: it compiles the plugin (once, cached
    by torch under ``~/.cache/torch_extensions``). A failing build makes this False, so
    ``backend="auto"`` falls back to torch; ``backend="nvdiffrast"`` then reports why.
    """
    if not torch.cuda.is_available() or _load()[0] is None:
        return False
    try:
        context(torch.device("cuda", torch.cuda.current_device()))
    except RenderError:
        return False
    return True


def import_error() -> Exception | None:
    return _load()[1]


def module():
    dr, exc = _load()
    if dr is None:
        raise RenderError(
            "backend='nvdiffrast' needs the nvdiffrast package: pip install -e '.[nvdiffrast]' "
            f"on a machine with CUDA, nvcc and ninja (import failed: {exc}). "
            "Use backend='torch' to render without it.")
    return dr


def _put_built_plugin_on_path(exc: Exception) -> bool:
    """Make nvdiffrast's freshly built plugin importable by name; True when a folder was added.

    nvdiffrast builds its plugin with ``torch.utils.cpp_extension.load`` and then imports it
    by module name. Recent torch (seen with 2.11) loads the built library from its file
    without putting the build folder on ``sys.path``, so that import fails with
    ``ModuleNotFoundError: nvdiffrast_plugin_...`` although the build succeeded.
    """
    name = getattr(exc, "name", None) or ""
    if not (isinstance(exc, ModuleNotFoundError) and name.startswith("nvdiffrast_plugin")):
        return False
    from torch.utils import cpp_extension  # noqa: PLC0415 - only needed on this path

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    found = [d for d in glob.glob(os.path.join(glob.escape(root), "**", name), recursive=True)
             if os.path.isdir(d) and d not in sys.path]
    if not found:
        return False
    sys.path.insert(0, found[0])
    importlib.invalidate_caches()
    return True


@functools.lru_cache(maxsize=None)
def context(device: torch.device):
    """One ``RasterizeCudaContext`` per device, created on first use and kept.

    The first call builds nvdiffrast's CUDA plugin (a JIT CUDA compile) and caches it under
    ``~/.cache/torch_extensions`` (or ``$TORCH_EXTENSIONS_DIR``).
    """
    dr = module()
    try:
        try:
            return dr.RasterizeCudaContext(device=device)
        except ModuleNotFoundError as exc:
            if not _put_built_plugin_on_path(exc):
                raise
            return dr.RasterizeCudaContext(device=device)
    except Exception as exc:  # the plugin's JIT build or load failed
        raise RenderError(
            f"nvdiffrast could not build or load its CUDA plugin ({type(exc).__name__}: {exc}). "
            "It needs nvcc and ninja; if CUDA headers are missing, add pip's nvidia/*/include "
            "folders to CPATH. See the README's nvdiffrast section, or use backend='torch'.") from exc
