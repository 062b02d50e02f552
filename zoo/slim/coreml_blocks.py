"""Per-block CoreML packages and a manifest, so a latency table can be measured on a phone.

`export_blocks` writes, under one folder:

- ``blocks/<key>.mlpackage``: each block of the search space in its deploy form, fp16 compute,
  a float tensor input named ``input`` of the block's shape (batch 1);
- ``networks/arch<i>.mlpackage``: a few random whole networks (for the additivity check on
  the device: compare their measured time with the imported table's sum);
- ``manifest.json``: family, input size, and per package its key (or architecture), file and
  input shape, plus the form the device's results should take to be imported by
  ``zoo latency-table --import``: a JSON object with ``device``, ``os``, ``runtime``,
  ``family`` and ``entries`` (``key, median_ms, p90_ms, n`` per block).

The folder appears whole or not at all. Conversion runs on Linux (coremltools 9); running the
packages needs an Apple device (Xcode's performance report or a small app gives the times).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn as nn

from zoo.io import atomic_dir, atomic_write_json

__all__ = ["export_blocks"]


class _Block(nn.Module):
    """A block with the `export_wrapper` hook `zoo.export` traces it through."""

    def __init__(self, module: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.module, self.shape = module, shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def export_wrapper(self, input_shape=None):
        return {"module": self.module, "inputs": (torch.randn(self.shape),), "input_names": ["input"],
                "output_names": ["output"], "name": "block"}


def export_blocks(space, out: str | Path, networks: int = 8, seed: int = 0, keys=None, progress: bool = True) -> Path:
    """Write the packages and manifest of the module docstring to `out`; returns the manifest path."""
    from tqdm.auto import tqdm

    from zoo.export import to_coreml
    from zoo.testing import randomize_

    out = Path(out)
    keys = list(dict.fromkeys(keys if keys is not None else space.all_keys()))
    rng = random.Random(seed)
    archs = [space.random_arch(rng) for _ in range(networks)]
    with atomic_dir(out) as tmp:
        (tmp / "blocks").mkdir()
        (tmp / "networks").mkdir()
        blocks = []
        for key in tqdm(keys, desc="CoreML blocks", unit="block", disable=not progress):
            module, shape = space.block(key)
            to_coreml(_Block(module, shape), tmp / "blocks" / f"{key}.mlpackage", image_input=False, reparam=False,
                      verify=False, verbose=False)
            blocks.append({"key": key, "file": f"blocks/{key}.mlpackage", "input_shape": list(shape)})
        nets = []
        for i, arch in enumerate(archs):
            model = randomize_(space.build(arch).eval(), seed=i, scale=0.1).reparameterize()
            shape = (1, 3, space.img_size, space.img_size)
            to_coreml(_Block(model, shape), tmp / "networks" / f"arch{i}.mlpackage", image_input=False,
                      reparam=False, verify=False, verbose=False)
            nets.append({"arch": arch.to_json(), "file": f"networks/arch{i}.mlpackage", "input_shape": list(shape),
                         "table_keys": space.keys(arch)})
        atomic_write_json(tmp / "manifest.json", {
            "format": "zoo-latency-blocks/1", "family": space.family, "space": space.describe(),
            "precision": "fp16", "blocks": blocks, "networks": nets,
            "return": {"device": "e.g. iPhone 12", "os": "e.g. iOS 17.5", "runtime": "e.g. CoreML 7, compute units ALL",
                       "family": space.family, "img_size": space.img_size,
                       "entries": [{"key": "<block key>", "median_ms": 0.0, "p90_ms": 0.0, "n": 100}]},
        })
    return out / "manifest.json"
