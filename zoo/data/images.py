"""Image folders for training: checked before training starts, unreadable files counted, not fatal.

Layout: ``<root>/<split>/<class>/<image>`` (ImageFolder). timm's `ImageDataset` skips a file
it cannot decode with a log line but keeps no count and gives up after 50 in a row; this
small dataset keeps the count (``unreadable``) so the engine can report it per epoch, and
checks the layout up front so a bad folder fails before the first step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from zoo.errors import DataError

__all__ = ["ImageFolder", "scan_split", "eval_transform", "image_files"]

try:  # timm's list of extensions, so zoo and timm see the same files
    from timm.data.readers.img_extensions import get_img_extensions

    IMG_EXTENSIONS = tuple(get_img_extensions(as_set=True))
except ImportError:  # pragma: no cover
    IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def scan_split(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)`` of ``root/split``; `DataError` for a missing or empty folder or class.

    Classes are the sorted sub-folder names; samples are ``(path, class index)`` sorted by path.
    """
    folder = Path(root) / split
    if not Path(root).is_dir():
        raise DataError(f"data dir {root} does not exist; point --data-dir at a folder with train/ and val/ inside.")
    if not folder.is_dir():
        subs = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
        raise DataError(f"{folder} does not exist (found {subs or 'no sub-folders'}); "
                        f"name the split with --train-split/--val-split.")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class folders; expected {folder}/<class>/<image files>.")
    samples, empty = [], []
    for idx, cls in enumerate(classes):
        files = sorted(p for p in (folder / cls).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not files:
            empty.append(cls)
        samples += [(str(p), idx) for p in files]
    if empty:
        raise DataError(f"class folder(s) {empty} in {folder} contain no images ({', '.join(sorted(IMG_EXTENSIONS))}); "
                        "add images or remove the folder.")
    return samples, classes


class ImageFolder(torch.utils.data.Dataset):
    """``(image tensor, class index, skipped)`` triples from ``root/split``.

    At construction, files whose header cannot be read are dropped and listed in
    `unreadable` (checked for up to `check_limit` files; larger sets rely on the next rule).
    An image that still fails to decode when loaded is replaced by the next readable one;
    `skipped` counts the files passed over for this item, so the training loop can sum them
    across worker processes.
    """

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None, check_limit: int = 50_000):
        samples, self.classes = scan_split(Path(root), split)
        self.root, self.split, self.transform = Path(root), split, transform
        self.unreadable: list[str] = []
        if len(samples) <= check_limit:
            for path, _ in samples:
                try:
                    with Image.open(path):
                        pass
                except (OSError, ValueError, Image.DecompressionBombError):
                    self.unreadable.append(path)
            bad = set(self.unreadable)
            samples = [s for s in samples if s[0] not in bad]
        if not samples:
            raise DataError(f"no image in {self.root / split} can be read.")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for step in range(len(self.samples)):
            path, target = self.samples[(index + step) % len(self.samples)]
            try:
                with Image.open(path) as f:
                    img = f.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError):
                continue
            return (self.transform(img) if self.transform else img), target, step
        raise DataError(f"no image in {self.root / self.split} can be decoded.")


def eval_transform(spec, size: int | None = None) -> Callable:
    """timm's evaluation transform for a model's input `spec` (a card's ``InputSpec``: mean,
    std, crop_pct, interpolation) at a square `size` (default the spec's): resize, centre crop,
    tensor, normalise. The one transform validation, slimming and quantization calibrate with."""
    from timm.data import create_transform, resolve_data_config

    size = size or spec.shape[-1]
    pcfg = {"input_size": (3, size, size), "mean": spec.mean, "std": spec.std, "crop_pct": spec.crop_pct,
            "interpolation": spec.interpolation}
    dc = resolve_data_config({}, pretrained_cfg=pcfg)
    return create_transform(dc["input_size"], is_training=False, interpolation=dc["interpolation"], mean=dc["mean"],
                            std=dc["std"], crop_pct=dc["crop_pct"])


def image_files(folder: str | Path, what: str = "images") -> tuple[list[Path], list[int] | None]:
    """Every image under `folder` (recursively, sorted) and, when the folder is laid out as
    class folders (every image one level down, at least two folders), their class indices in
    sorted folder order; else ``None``. An ImageFolder root (``train/``, ``val/``) counts as a
    flat set. A missing or image-less folder is a `DataError` naming `what` it was for."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what}: {folder} is not a folder (give a folder of images, or an ImageFolder).")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{what}: {folder} holds no images ({', '.join(sorted(IMG_EXTENSIONS))}).")
    parents = sorted({p.parent for p in files})
    if len(parents) >= 2 and all(p.parent == folder for p in parents):
        index = {p: i for i, p in enumerate(parents)}
        return files, [index[p.parent] for p in files]
    return files, None
