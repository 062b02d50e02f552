"""A KITTI detection dataset with OpenPCDet's training augmentations, each recorded so that it
can be undone when points are projected into the image (the camera fusion needs that).

Per sample, as OpenPCDet's KITTI pipeline: the field-of-view points of cam2, then in training

1. ground-truth sampling: objects from a database of other frames' objects (their points and
   boxes, `build_gt_database`) pasted where they collide with nothing, the scene's points
   inside them removed;
2. a flip of y with probability 0.5 (heading -> -heading);
3. a global rotation about z, uniform in ``rotation_range``;
4. a global scaling, uniform in ``scale_range``;

then points outside ``point_range`` and boxes whose centres lie outside it are dropped, and
training points are shuffled. ``sample["aug"]`` holds ``flip`` (bool), ``rotation`` (radians),
``scale`` and ``pasted`` (``[N]`` bool: points that came from the database, which the image
does not show); `undo_augmentation` maps augmented points back to the frame's LiDAR
coordinates (undo scale, then rotation, then flip).

Road planes (OpenPCDet's USE_ROAD_PLANE) are not used: pasted objects keep their own height,
which is right on flat ground (the synthetic world) and approximate on KITTI's roads.
The database index is JSON (never pickle); object points are ``.bin`` files as velodyne's.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from zoo.boxes import bev_iou
from zoo.data.kitti import (MAX_OCCLUSION, MAX_TRUNCATION, MIN_HEIGHT, camera_to_lidar_boxes, frame_paths, in_image,
                            points_in_boxes, read_calib, read_image, read_labels, read_points, read_split)
from zoo.errors import DataError
from zoo.io import atomic_write, atomic_write_json

__all__ = ["KittiDetection", "build_gt_database", "GtSampler", "undo_augmentation", "augmentation_matrix",
           "augmented_lidar_to_image", "collate", "points_in_boxes",
           "difficulty"]



def difficulty(obj) -> int:
    """KITTI difficulty of a label: 0 easy, 1 moderate, 2 hard, -1 none of them."""
    height = obj.bbox[3] - obj.bbox[1]
    for d in range(3):
        if height >= MIN_HEIGHT[d] and obj.occluded <= MAX_OCCLUSION[d] and obj.truncated <= MAX_TRUNCATION[d]:
            return d
    return -1


def _read_frame(split_dir: Path, idx: str):
    p = frame_paths(split_dir, idx)
    points = read_points(p["velodyne"])
    calib = read_calib(p["calib"])
    objects = read_labels(p["label_2"]) if p["label_2"].is_file() else []
    return points, calib, objects


def _image_shape(split_dir: Path, idx: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    path = frame_paths(split_dir, idx)["image_2"]
    if not path.is_file():
        raise DataError(f"{path}: no such image (the field of view needs image_2's size).")
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: the image cannot be decoded ({e}).") from None


def build_gt_database(root: str | os.PathLike, split: str = "train", classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
                      out: str | os.PathLike | None = None) -> Path:
    """Cut every labelled object of `classes` out of the `split` frames: its points (relative to
    the box centre) as ``gt_database/<frame>_<class>_<i>.bin`` and an index
    ``kitti_dbinfos_<split>.json`` with the box, the point count and the KITTI difficulty."""
    root = Path(root)
    out = Path(out) if out else root / "gt_database"
    out.mkdir(parents=True, exist_ok=True)
    split_dir = root / "training"
    infos: dict[str, list] = {c: [] for c in classes}
    for idx in read_split(root / "ImageSets" / f"{split}.txt"):
        points, calib, objects = _read_frame(split_dir, idx)
        keep = [o for o in objects if o.type in classes]
        if not keep:
            continue
        boxes = camera_to_lidar_boxes(np.stack([o.camera_box for o in keep]), calib)
        inside = points_in_boxes(points, boxes)
        for i, (o, box) in enumerate(zip(keep, boxes)):
            pts = points[inside[:, i]].copy()
            pts[:, :3] -= box[:3]
            name = f"{idx}_{o.type}_{i}.bin"
            with atomic_write(out / name, "wb") as f:
                f.write(pts.astype(np.float32).tobytes())
            infos[o.type].append({"name": o.type, "path": name, "frame": idx, "box3d_lidar": [float(v) for v in box],
                                  "num_points": int(len(pts)), "difficulty": difficulty(o)})
    index = out / f"kitti_dbinfos_{split}.json"
    atomic_write_json(index, {"classes": list(classes), "infos": infos})
    return index


class GtSampler:
    """OpenPCDet's DataBaseSampler: per class, enough database objects to bring the scene to
    `sample_groups[class]` objects, keeping those whose BEV boxes overlap nothing.

    Filters (OpenPCDet's PREPARE): at least `min_points[class]` points and a KITTI difficulty
    other than -1."""

    def __init__(self, index: str | os.PathLike, sample_groups: dict[str, int],
                 min_points: dict[str, int] | None = None, drop_unknown_difficulty: bool = True):
        index = Path(index)
        if not index.is_file():
            raise DataError(f"{index}: no ground-truth database index; build it with zoo.data.kitti_dataset."
                            "build_gt_database(root).")
        data = json.loads(index.read_text())
        self.folder = index.parent
        self.groups = dict(sample_groups)
        min_points = min_points or {c: 5 for c in self.groups}
        self.infos = {}
        for cls in self.groups:
            rows = data["infos"].get(cls, [])
            rows = [r for r in rows if r["num_points"] >= min_points.get(cls, 0)
                    and (not drop_unknown_difficulty or r["difficulty"] != -1)]
            if not rows:
                raise DataError(f"{index}: no {cls} objects pass the filters; lower the minimum points or drop "
                                f"{cls} from the sample groups.")
            self.infos[cls] = rows

    def sample(self, rng: np.random.Generator, points: np.ndarray, boxes: np.ndarray, names: list[str]):
        """Paste objects; returns (points, boxes, names, pasted mask over the points)."""
        boxes = boxes.reshape(-1, 7)
        new_boxes, new_names, new_pts = [], [], []
        for cls, target in self.groups.items():
            want = target - sum(1 for n in names if n == cls)
            if want <= 0:
                continue
            rows = self.infos[cls]
            picks = [rows[i] for i in rng.choice(len(rows), size=min(want, len(rows)), replace=False)]
            cand = np.array([r["box3d_lidar"] for r in picks])
            existing = np.concatenate([boxes] + ([np.stack(new_boxes)] if new_boxes else []), axis=0)
            c = torch.from_numpy(cand[:, [0, 1, 3, 4, 6]])
            hit_old = (bev_iou(c, torch.from_numpy(existing[:, [0, 1, 3, 4, 6]])) > 0).any(1) if len(existing) \
                else torch.zeros(len(cand), dtype=torch.bool)
            among = bev_iou(c, c) > 0
            among.fill_diagonal_(False)
            ok = ~hit_old & ~among.any(1)
            for r, box, good in zip(picks, cand, ok.tolist()):
                if not good:
                    continue
                pts = np.fromfile(self.folder / r["path"], dtype=np.float32).reshape(-1, 4).copy()
                pts[:, :3] += box[:3]
                new_boxes.append(box)
                new_names.append(cls)
                new_pts.append(pts)
        if not new_boxes:
            return points, boxes, names, np.zeros(len(points), dtype=bool)
        sampled = np.stack(new_boxes)
        keep = ~points_in_boxes(points, sampled).any(1)
        added = np.concatenate(new_pts)
        out = np.concatenate([points[keep], added])
        pasted = np.concatenate([np.zeros(int(keep.sum()), bool), np.ones(len(added), bool)])
        return out, np.concatenate([boxes, sampled]), list(names) + new_names, pasted


def _rotate_z(xyz: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    out = xyz.copy()
    out[:, 0] = c * xyz[:, 0] - s * xyz[:, 1]
    out[:, 1] = s * xyz[:, 0] + c * xyz[:, 1]
    return out


def augmentation_matrix(aug: dict) -> np.ndarray:
    """The 4x4 float64 map from the frame's LiDAR coordinates to the augmented ones: flip, then
    rotation, then scaling, the order `KittiDetection` applies them in."""
    flip = np.diag([1.0, -1.0 if aug.get("flip", False) else 1.0, 1.0, 1.0])
    c, s = math.cos(aug.get("rotation", 0.0)), math.sin(aug.get("rotation", 0.0))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    scale = np.diag([aug.get("scale", 1.0)] * 3 + [1.0])
    return scale @ rot @ flip


def undo_augmentation(points: np.ndarray | torch.Tensor, aug: dict):
    """Augmented points ``[N, >=3]`` back in the frame's LiDAR coordinates: undo the scaling,
    then the rotation, then the flip (the reverse of the order they were applied in)."""
    is_t = isinstance(points, torch.Tensor)
    p = points.detach().cpu().numpy().astype(np.float64) if is_t else np.asarray(points, np.float64)
    inv = np.linalg.inv(augmentation_matrix(aug))
    out = np.concatenate([p[:, :3] @ inv[:3, :3].T, p[:, 3:]], axis=1)
    return torch.from_numpy(out).to(points.dtype) if is_t else out


def augmented_lidar_to_image(calib, aug: dict) -> np.ndarray:
    """The 3x4 float64 projection of augmented LiDAR points into cam2's image: un-augment, then
    LiDAR -> rectified camera -> ``P2``. ``[u, v, w] = M @ [x, y, z, 1]``, pixel ``(u / w, v / w)``;
    ``w`` is the rectified depth plus ``P2[2, 3]``."""
    return calib.P2 @ calib.lidar_to_rect_matrix @ np.linalg.inv(augmentation_matrix(aug))


class KittiDetection(torch.utils.data.Dataset):
    """Frames of a KITTI root (``root/training`` and ``root/ImageSets/<split>.txt``).

    Returns dicts: ``frame_id``, ``points`` ``[N, 4]`` float32, ``gt_boxes`` ``[M, 7]`` LiDAR
    boxes of `classes`, ``gt_names``, ``gt_classes`` ``[M]`` (1-based in `classes` order),
    ``calib``, ``image_shape`` (H, W), ``aug`` (see the module docstring), ``lidar_to_image``
    ``[3, 4]`` float64 (the augmented points' projection into the image,
    `augmented_lidar_to_image`), and ``image`` ``[H, W, 3]`` uint8 with ``load_image=True``.
    `augment` enables the four training augmentations; `sampler` is a `GtSampler` (None: no
    ground-truth sampling).
    """

    def __init__(self, root: str | os.PathLike, split: str | Sequence[str] = "train",
                 classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
                 point_range: Sequence[float] = (0, -40, -3, 70.4, 40, 1), augment: bool = False,
                 sampler: GtSampler | None = None, flip: bool = True, rotation_range=(-math.pi / 4, math.pi / 4),
                 scale_range=(0.95, 1.05), fov_only: bool = True, load_image: bool = False, seed: int = 0):
        self.root = Path(root)
        self.split_dir = self.root / "training"
        if not self.split_dir.is_dir():
            raise DataError(f"{self.root}: no training/ folder; a KITTI root holds training/{{velodyne,image_2,calib,"
                            "label_2}} and ImageSets/.")
        self.ids = list(split) if not isinstance(split, str) else read_split(self.root / "ImageSets" / f"{split}.txt")
        if not self.ids:
            raise DataError(f"{self.root}: the split {split!r} lists no frames.")
        self.classes = list(classes)
        self.point_range = np.asarray(point_range, dtype=np.float32)
        self.augment, self.sampler = augment, sampler
        self.flip, self.rotation_range, self.scale_range = flip, rotation_range, scale_range
        self.fov_only, self.load_image = fov_only, load_image
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations draw from ``seed, epoch, index``: a sample is the same in every run."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        idx = self.ids[i]
        points, calib, objects = _read_frame(self.split_dir, idx)
        shape = _image_shape(self.split_dir, idx)
        if self.fov_only:
            points = points[in_image(points, calib, shape)]
        keep = [o for o in objects if o.type in self.classes]
        boxes = camera_to_lidar_boxes(np.stack([o.camera_box for o in keep]), calib) if keep else np.zeros((0, 7))
        names = [o.type for o in keep]
        aug = {"flip": False, "rotation": 0.0, "scale": 1.0}
        pasted = np.zeros(len(points), dtype=bool)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            if self.sampler is not None:
                points, boxes, names, pasted = self.sampler.sample(rng, points, boxes, names)
            points = points.copy()
            boxes = boxes.copy()
            if self.flip and rng.random() < 0.5:
                aug["flip"] = True
                points[:, 1] = -points[:, 1]
                boxes[:, 1] = -boxes[:, 1]
                boxes[:, 6] = -boxes[:, 6]
            angle = float(rng.uniform(*self.rotation_range))
            aug["rotation"] = angle
            points[:, :3] = _rotate_z(points[:, :3].astype(np.float64), angle)
            boxes[:, :3] = _rotate_z(boxes[:, :3], angle)
            boxes[:, 6] += angle
            s = float(rng.uniform(*self.scale_range))
            aug["scale"] = s
            points[:, :3] *= s
            boxes[:, :6] *= s
        r = self.point_range
        inside = ((points[:, :3] >= r[:3]) & (points[:, :3] < r[3:])).all(1)
        points, pasted = points[inside], pasted[inside]
        centre_in = ((boxes[:, :3] >= r[:3]) & (boxes[:, :3] <= r[3:])).all(1)
        boxes, names = boxes[centre_in], [n for n, k in zip(names, centre_in) if k]
        if self.augment:
            order = np.random.default_rng([self.seed, self.epoch, i, 1]).permutation(len(points))
            points, pasted = points[order], pasted[order]
        boxes[:, 6] = (boxes[:, 6] + math.pi) % (2 * math.pi) - math.pi
        aug["pasted"] = torch.from_numpy(pasted)
        sample = {
            "frame_id": idx, "points": torch.from_numpy(points.astype(np.float32)),
            "gt_boxes": torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 7), "gt_names": names,
            "gt_classes": torch.tensor([self.classes.index(n) + 1 for n in names], dtype=torch.long),
            "calib": calib, "image_shape": shape, "aug": aug,
            "lidar_to_image": torch.from_numpy(augmented_lidar_to_image(calib, aug)),
        }
        if self.load_image:
            sample["image"] = read_image(frame_paths(self.split_dir, idx)["image_2"])
        return sample


def collate(samples: list[dict]) -> dict:
    """A detector batch: ``points [N, 5]`` (batch index first), ``gt_boxes [B, M, 8]`` (box and
    1-based class, zero rows padding), ``batch_size``, ``lidar_to_image [B, 3, 4]`` float64
    (`augmented_lidar_to_image`), and the per-sample ``frame_id``, ``calib``, ``image_shape``,
    ``aug`` (and ``image``) as lists."""
    pts = [torch.cat([torch.full((len(s["points"]), 1), float(b)), s["points"]], 1) for b, s in enumerate(samples)]
    m = max([len(s["gt_boxes"]) for s in samples] + [1])
    gt = torch.zeros(len(samples), m, 8)
    for b, s in enumerate(samples):
        n = len(s["gt_boxes"])
        gt[b, :n, :7] = s["gt_boxes"]
        gt[b, :n, 7] = s["gt_classes"].float()
    out = {"points": torch.cat(pts), "gt_boxes": gt, "batch_size": len(samples)}
    if "lidar_to_image" in samples[0]:
        out["lidar_to_image"] = torch.stack([s["lidar_to_image"] for s in samples])
    for key in ("frame_id", "calib", "image_shape", "aug", "gt_names", "image"):
        if key in samples[0]:
            out[key] = [s[key] for s in samples]
    return out
