"""Params and MACs, computed rather than typed in.

MACs come from `torch.utils.flop_counter.FlopCounterMode` on one forward pass at the card's
default input (batch 1, eval mode) and are FLOPs / 2: convolutions, linear layers and matrix
products (attention included) count; element-wise ops, norms and softmax do not, as in the
papers' tables. Results are cached in memory and in ``$ZOO_HOME/complexity.json``, keyed by
model name, architecture config and the zoo and torch versions.
"""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from zoo.io import atomic_write_json

__all__ = ["count_params", "count_macs", "complexity"]

_memory: dict[str, dict] = {}


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of one ``model(*inputs)`` call (FLOPs / 2 by torch's counter)."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def _key(name: str) -> str:
    from zoo._version import __version__
    from zoo.registry import model_card

    card = model_card(name)
    blob = json.dumps({"config": dict(card.config), "input": card.input.to_dict()}, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{blob}|{__version__}|{torch.__version__}".encode()).hexdigest()[:16]
    return f"{name}:{digest}"


def complexity(name: str) -> dict:
    """``{"params": int, "macs": int, "input_shape": [...]}`` of a registered model at its default
    input, with the weights it is built with from seed 0. A model that needs a file the user
    brings (lsv_smpl's SMPL) and cannot find it gives ``params`` and ``macs`` None and the
    reason under ``skipped``."""
    from zoo.errors import MissingAssetError
    from zoo.hub import zoo_home
    from zoo.registry import create_model, model_card

    key = _key(name)
    if key in _memory:
        return dict(_memory[key])
    cache_file = zoo_home() / "complexity.json"
    try:
        disk = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        disk = {}
    if key not in disk:
        card = model_card(name)
        with torch.random.fork_rng():
            # seeded: a focal sparse convolution's sites (so its MACs) depend on its initial weights
            torch.manual_seed(0)
            try:
                model = create_model(name)
            except MissingAssetError as e:  # not cached: the file may appear
                return {"params": None, "macs": None, "input_shape": [1, *card.input.shape], "skipped": str(e)}
        inputs = card.input.example(batch_size=1)
        disk[key] = {
            "params": count_params(model),
            "macs": count_macs(model, inputs),
            "input_shape": [1, *card.input.shape],
        }
        try:
            atomic_write_json(cache_file, disk)
        except OSError:
            pass  # a read-only cache only costs recomputation
    _memory[key] = disk[key]
    return dict(disk[key])
