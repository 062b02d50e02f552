"""A built-in image-folder dataset of synthetic patterns, for the demo and the tests (no downloads).

Classes (in this order, as many as asked, up to four): ``hstripes`` (horizontal stripes),
``vstripes`` (vertical stripes), ``checker`` (a checkerboard), ``rings`` (concentric rings).
Each image draws a random period, phase, two random colours and pixel noise, so a model has
to learn the orientation/structure rather than a colour.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_pattern_folder", "PATTERNS"]

PATTERNS = ("hstripes", "vstripes", "checker", "rings")


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    period = rng.uniform(size / 8, size / 3)
    phase = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "hstripes":
        wave = np.sin(2 * np.pi * yy / period + phase)
    elif kind == "vstripes":
        wave = np.sin(2 * np.pi * xx / period + phase)
    elif kind == "checker":
        wave = np.sin(2 * np.pi * xx / period + phase) * np.sin(2 * np.pi * yy / period + phase)
    else:
        cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
        wave = np.sin(2 * np.pi * np.hypot(yy - cy, xx - cx) / period + phase)
    mask = (wave > 0).astype(np.float64)[..., None]
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = mask * a + (1 - mask) * b + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_pattern_folder(root: str | Path, num_classes: int = 3, train_per_class: int = 32, val_per_class: int = 12,
                        size: int = 32, seed: int = 0) -> Path:
    """Write ``root/{train,val}/<class>/<n>.png`` and return `root`."""
    if not 2 <= num_classes <= len(PATTERNS):
        raise ValueError(f"num_classes must be 2..{len(PATTERNS)}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for kind in PATTERNS[:num_classes]:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_pattern(kind, size, rng)).save(folder / f"{i:04d}.png")
    return root
