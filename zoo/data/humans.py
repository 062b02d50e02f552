"""Posed-camera image folders for LSV-GAN: EG3D's ``dataset.json`` with a pose per image.

A dataset is a folder of images and a ``dataset.json``::

    {"labels": [["img00000.png", [c2w 16, K 9, pose 72, betas 10]], ...]}

Each label holds 107 numbers, in this order:

- ``c2w``: the camera-to-world matrix, 4x4 row-major, in OpenCV's camera convention (EG3D's):
  the camera looks down its ``+z``, ``x`` to the right of the image, ``y`` down it. It must
  be a rigid transform (orthonormal rotation, determinant +1, last row ``0 0 0 1``).
- ``K``: intrinsics 3x3 row-major, normalised by the image size as EG3D's are: ``fx, fy`` in
  image widths and heights, the principal point ``cx, cy`` in ``[0, 1]`` from the top-left.
- ``pose``: SMPL-order axis-angles, 24 joints x 3 (the first is the root's rotation).
- ``betas``: 10 shape values (zeros for the built-in mannequin, which has none).

World coordinates are the body model's: ``y`` up, metres. `zoo.models.lsv.render.opencv_to_clip`
turns ``c2w`` and ``K`` into the renderer's OpenGL world-to-clip matrix. Every label is checked
when the folder is opened; a bad one is a `DataError` naming the file and the image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.errors import DataError
from zoo.io import atomic_write

__all__ = ["PosedImageFolder", "write_posed_dataset", "split_label", "check_label", "composite_over", "LABEL_DIM"]

LABEL_DIM = 107
_SLICES = {"c2w": slice(0, 16), "K": slice(16, 25), "pose": slice(25, 97), "betas": slice(97, 107)}


def split_label(label: torch.Tensor) -> dict[str, torch.Tensor]:
    """``label [..., 107]`` -> ``c2w [..., 4, 4]``, ``K [..., 3, 3]``, ``pose [..., 24, 3]``, ``betas [..., 10]``."""
    lead = label.shape[:-1]
    return {"c2w": label[..., _SLICES["c2w"]].reshape(*lead, 4, 4), "K": label[..., _SLICES["K"]].reshape(*lead, 3, 3),
            "pose": label[..., _SLICES["pose"]].reshape(*lead, 24, 3), "betas": label[..., _SLICES["betas"]]}


def check_label(values, where: str, tol: float = 1e-4) -> np.ndarray:
    """The label as float64 ``[107]``, or a `DataError` saying what is wrong with it (``where``
    names the file and entry)."""
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: a label is a list of {LABEL_DIM} numbers.") from None
    if a.shape != (LABEL_DIM,):
        raise DataError(f"{where}: a label holds {LABEL_DIM} numbers (c2w 16, K 9, pose 72, betas 10), "
                        f"this one {a.size}.")
    if not np.isfinite(a).all():
        raise DataError(f"{where}: the label has NaN or infinite values.")
    c2w, k = a[:16].reshape(4, 4), a[16:25].reshape(3, 3)
    r = c2w[:3, :3]
    if (np.abs(c2w[3] - [0, 0, 0, 1]).max() > tol or np.abs(r.T @ r - np.eye(3)).max() > tol
            or np.linalg.det(r) < 0):
        raise DataError(f"{where}: the camera-to-world matrix is not a rigid transform (its rotation must be "
                        "orthonormal with determinant +1 and its last row 0 0 0 1); scale belongs in K.")
    if k[0, 0] <= 0 or k[1, 1] <= 0 or np.abs(k[2] - [0, 0, 1]).max() > tol or abs(k[1, 0]) > tol:
        raise DataError(f"{where}: the intrinsics must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0, "
                        "normalised by the image size.")
    return a


def composite_over(rgba: torch.Tensor, background) -> torch.Tensor:
    """Straight RGBA ``[M, 4, H, W]`` over an RGB ``background`` in ``[0, 1]``: ``[M, 3, H, W]``."""
    bg = torch.tensor(background, dtype=rgba.dtype)[None, :, None, None]
    return rgba[:, :3] * rgba[:, 3:] + bg * (1 - rgba[:, 3:])


class PosedImageFolder(Dataset):
    """Items ``{"image": [C, H, W] float in [0, 1], "label": [107] float32}`` from ``root/dataset.json``.

    ``channels`` 3 composites RGBA files over ``background`` (RGB in ``[0, 1]``); 4 keeps the
    alpha (an RGB file has alpha 1). All images must share one size; ``resolution`` checks it.
    Images are read once, when the folder is opened (the sets are small; a bad file fails early).
    """

    def __init__(self, root: str | Path, channels: int = 3, background=(1.0, 1.0, 1.0),
                 resolution: int | None = None):
        from PIL import Image, UnidentifiedImageError

        root = Path(root)
        meta = root / "dataset.json"
        if not meta.is_file():
            raise DataError(f"{root} has no dataset.json; a posed image folder holds its images and a dataset.json "
                            "of labels (see zoo.data.humans), or leave --data-dir out for the built-in set.")
        try:
            labels = json.loads(meta.read_text())["labels"]
            pairs = [(str(f), v) for f, v in labels]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError(f"{meta}: expected {{\"labels\": [[file, [107 numbers]], ...]}}.") from None
        if not pairs:
            raise DataError(f"{meta} lists no images.")
        self.root, self.files = root, [f for f, _ in pairs]
        self.labels = torch.from_numpy(np.stack([check_label(v, f"{meta}, {f}") for f, v in pairs])).float()
        imgs, size = [], None
        for f in self.files:
            path = root / f
            if not path.is_file():
                raise DataError(f"{meta} lists {f}, which is not in {root}.")
            try:
                with Image.open(path) as im:
                    im = im.convert("RGBA")
            except (UnidentifiedImageError, OSError):
                raise DataError(f"{path} is not an image PIL can read.") from None
            if size is None:
                size = im.size
            if im.size != size or im.size[0] != im.size[1]:
                raise DataError(f"{path} is {im.size[0]}x{im.size[1]}; every image must be square and the size of "
                                f"the first ({size[0]}x{size[1]}).")
            imgs.append(torch.from_numpy(np.asarray(im).copy()))
        if resolution is not None and size[0] != resolution:
            raise DataError(f"{root} holds {size[0]}-pixel images, not {resolution}: pass --img-size {size[0]} "
                            "(a power of two) or resize the folder.")
        rgba = torch.stack(imgs).permute(0, 3, 1, 2).float() / 255  # [M, 4, H, W]
        if channels == 3:
            self.images = composite_over(rgba, background)
        elif channels == 4:
            self.images = rgba
        else:
            raise DataError(f"channels must be 3 or 4, not {channels}")
        self.alpha = rgba[:, 3]
        self.resolution = size[0]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


def write_posed_dataset(root: str | Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Write ``images [M, H, W, 4]`` (straight RGBA in ``[0, 1]``) as PNGs and their ``labels [M, 107]``
    as ``dataset.json``; the json goes last, atomically, so a folder with one is complete."""
    from PIL import Image

    root = Path(root)
    if images.dim() != 4 or images.shape[-1] != 4 or labels.shape != (images.shape[0], LABEL_DIM):
        raise DataError(f"want images [M, H, W, 4] and labels [M, {LABEL_DIM}], got {tuple(images.shape)} and "
                        f"{tuple(labels.shape)}")
    for i, lab in enumerate(labels):
        check_label(lab.tolist(), f"label {i}")
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        name = f"img{i:05d}.png"
        arr = (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        with atomic_write(root / name, "wb") as f:
            Image.fromarray(arr, "RGBA").save(f, format="PNG")
        entries.append([name, [float(v) for v in lab]])
    with atomic_write(root / "dataset.json", "w") as f:
        json.dump({"labels": entries}, f)
    return root
