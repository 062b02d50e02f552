"""The KITTI 3D object format: point clouds, calibration, labels, splits, and the frame and box
transforms between the LiDAR, the rectified camera and the image.

Frames and boxes (KITTI's and OpenPCDet's conventions):

- LiDAR: x forward, y left, z up. A LiDAR box is ``[x, y, z, l, w, h, yaw]`` with ``(x, y, z)``
  its centre and yaw counter-clockwise from +x about +z (`zoo.boxes`' convention).
- Rectified camera (``cam2`` after ``R0_rect``): x right, y down, z forward. A camera box is
  the label's ``[x, y, z, h, w, l, rotation_y]`` with ``(x, y, z)`` the centre of the box's
  bottom face and rotation_y about +y (0 faces +x).
- Image: pixel ``(u, v)`` through ``P2``.

So ``yaw = -rotation_y - pi/2`` and the LiDAR centre sits ``h/2`` above the camera box's bottom
centre. Calibration matrices are float64; points are float32 as in the ``.bin`` files.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from zoo.boxes import points_in_boxes as _points_in_boxes
from zoo.errors import DataError
from zoo.io import atomic_write

__all__ = [
    "CLASSES", "KittiObject", "Calib", "read_points", "write_points", "read_calib", "write_calib",
    "read_labels", "write_labels", "read_image", "read_split", "labels_to_arrays",
    "camera_to_lidar_boxes", "lidar_to_camera_boxes", "camera_box_corners", "image_boxes",
    "in_image", "crop_to_range", "frame_paths", "predictions_to_objects", "points_in_boxes",
    "MIN_HEIGHT", "MAX_OCCLUSION", "MAX_TRUNCATION",
]

# label_2's object types; DontCare marks regions the evaluator neither rewards nor punishes
CLASSES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare")
_CALIB_KEYS = ("P0", "P1", "P2", "P3", "R0_rect", "Tr_velo_to_cam", "Tr_imu_to_velo")
_REQUIRED_CALIB = ("P0", "P1", "P2", "P3", "R0_rect", "Tr_velo_to_cam")
# KITTI's difficulty limits, easy / moderate / hard: 2D box height in pixels, occlusion level,
# truncation
MIN_HEIGHT = (40, 25, 25)
MAX_OCCLUSION = (0, 1, 2)
MAX_TRUNCATION = (0.15, 0.3, 0.5)


@dataclasses.dataclass
class KittiObject:
    """One label_2 line: type, truncated (0..1), occluded (0 visible .. 3 unknown), alpha
    (observation angle), bbox ``(left, top, right, bottom)`` in pixels, dimensions
    ``(h, w, l)`` in metres, location ``(x, y, z)`` (bottom centre, camera frame), rotation_y,
    and for result files a score."""

    type: str
    truncated: float = 0.0
    occluded: int = 0
    alpha: float = -10.0
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    dimensions: tuple[float, float, float] = (-1.0, -1.0, -1.0)
    location: tuple[float, float, float] = (-1000.0, -1000.0, -1000.0)
    rotation_y: float = -10.0
    score: float | None = None

    @property
    def camera_box(self) -> np.ndarray:
        """``[x, y, z, h, w, l, rotation_y]`` float64."""
        return np.array([*self.location, *self.dimensions, self.rotation_y], dtype=np.float64)


@dataclasses.dataclass
class Calib:
    """A frame's calibration: the four 3x4 projections ``P0..P3`` (rectified camera to each
    camera's image), ``R0_rect`` 3x3, ``Tr_velo_to_cam`` 3x4 and ``Tr_imu_to_velo`` 3x4 (None when
    the file has none), all float64. Methods take and return ``[N, 3]`` float64 arrays."""

    P0: np.ndarray
    P1: np.ndarray
    P2: np.ndarray
    P3: np.ndarray
    R0_rect: np.ndarray
    Tr_velo_to_cam: np.ndarray
    Tr_imu_to_velo: np.ndarray | None = None

    @property
    def lidar_to_rect_matrix(self) -> np.ndarray:
        """4x4 homogeneous LiDAR -> rectified camera: ``R0_rect @ Tr_velo_to_cam``."""
        r0 = np.eye(4)
        r0[:3, :3] = self.R0_rect
        v2c = np.eye(4)
        v2c[:3] = self.Tr_velo_to_cam
        return r0 @ v2c

    def lidar_to_rect(self, points: np.ndarray) -> np.ndarray:
        m = self.lidar_to_rect_matrix
        return np.asarray(points, np.float64)[:, :3] @ m[:3, :3].T + m[:3, 3]

    def rect_to_lidar(self, points: np.ndarray) -> np.ndarray:
        m = np.linalg.inv(self.lidar_to_rect_matrix)
        return np.asarray(points, np.float64)[:, :3] @ m[:3, :3].T + m[:3, 3]

    def rect_to_image(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels ``[N, 2]`` through P2 and the depth ``[N]`` in the rectified camera."""
        pts = np.asarray(points, np.float64)[:, :3]
        proj = pts @ self.P2[:, :3].T + self.P2[:, 3]
        return proj[:, :2] / proj[:, 2:3], pts[:, 2]

    def lidar_to_image(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.rect_to_image(self.lidar_to_rect(points))

    def image_to_rect(self, uv: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Back-project pixels ``[N, 2]`` at rectified depths ``[N]`` (inverse of rect_to_image)."""
        uv = np.asarray(uv, np.float64)
        z = np.asarray(depth, np.float64)
        p = self.P2
        # u*(z + p23) = p00 x + p02 z + p03 and likewise for v, with p01 = p10 = 0 in KITTI's P2
        w = z + p[2, 3]
        y = (uv[:, 1] * w - p[1, 2] * z - p[1, 3]) / p[1, 1]
        x = (uv[:, 0] * w - p[0, 1] * y - p[0, 2] * z - p[0, 3]) / p[0, 0]
        return np.stack([x, y, z], axis=1)


# ----------------------------------------------------------------------------- files

def frame_paths(root: str | os.PathLike, index: str) -> dict[str, Path]:
    """The files of frame `index` under a KITTI split folder (e.g. ``KITTI/training``)."""
    root = Path(root)
    return {
        "velodyne": root / "velodyne" / f"{index}.bin",
        "image_2": root / "image_2" / f"{index}.png",
        "calib": root / "calib" / f"{index}.txt",
        "label_2": root / "label_2" / f"{index}.txt",
    }


def read_points(path: str | os.PathLike) -> np.ndarray:
    """A velodyne ``.bin``: ``[N, 4]`` float32 (x, y, z, reflectance) in the LiDAR frame."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such point cloud file.")
    size = path.stat().st_size
    if size % 16:
        raise DataError(f"{path}: {size} bytes is not a multiple of 16 (4 float32 per point); "
                        "the file is truncated or not a KITTI velodyne scan.")
    if size == 0:
        raise DataError(f"{path}: the point cloud is empty.")
    return np.fromfile(path, dtype=np.float32).reshape(-1, 4)


def write_points(path: str | os.PathLike, points: np.ndarray) -> None:
    points = np.ascontiguousarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 4 or len(points) == 0:
        raise DataError(f"{path}: points must be a non-empty [N, 4] array, got {points.shape}.")
    with atomic_write(path, "wb") as f:
        f.write(points.tobytes())


def read_calib(path: str | os.PathLike) -> Calib:
    """A calib ``.txt`` (``KEY: v v v ...`` lines)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such calibration file.")
    found: dict[str, np.ndarray] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        key = key.strip()
        if not sep or key not in _CALIB_KEYS:
            continue  # other keys (e.g. the raw data's) are not needed
        try:
            values = np.array([float(v) for v in rest.split()], dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {key} has a value that is not a number ({e}).") from None
        want = 9 if key == "R0_rect" else 12
        if values.size != want:
            raise DataError(f"{path}:{lineno}: {key} has {values.size} values; it needs {want}.")
        found[key] = values.reshape(3, 3) if want == 9 else values.reshape(3, 4)
    missing = [k for k in _REQUIRED_CALIB if k not in found]
    if missing:
        raise DataError(f"{path}: the calibration lacks {', '.join(missing)}; a KITTI calib file "
                        f"has {', '.join(_CALIB_KEYS)}.")
    return Calib(**{k: found.get(k) for k in _CALIB_KEYS})


def write_calib(path: str | os.PathLike, calib: Calib) -> None:
    lines = []
    for key in _CALIB_KEYS:
        m = getattr(calib, key)
        if m is not None:
            lines.append(f"{key}: " + " ".join(f"{v:.12e}" for v in np.asarray(m).reshape(-1)))
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def read_labels(path: str | os.PathLike, known: Iterable[str] = CLASSES) -> list[KittiObject]:
    """A label_2 (15 fields a line) or result file (16: the score last). An empty or missing
    result file is read by `zoo.metrics.kitti` as no detections; here a missing file is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such label file.")
    known = set(known)
    objects = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (15, 16):
            raise DataError(f"{path}:{lineno}: {len(fields)} fields; a KITTI label line has 15 "
                            "(type, truncated, occluded, alpha, 4 bbox, 3 dimensions, 3 location, "
                            "rotation_y) and a result line adds a score.")
        if fields[0] not in known:
            raise DataError(f"{path}:{lineno}: unknown object type {fields[0]!r}; KITTI's are "
                            f"{', '.join(sorted(known))}.")
        try:
            v = [float(x) for x in fields[1:]]
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: a field is not a number ({e}).") from None
        objects.append(KittiObject(
            type=fields[0], truncated=v[0], occluded=int(v[1]), alpha=v[2],
            bbox=tuple(v[3:7]), dimensions=tuple(v[7:10]), location=tuple(v[10:13]),
            rotation_y=v[13], score=v[14] if len(v) == 15 else None))
    return objects


def write_labels(path: str | os.PathLike, objects: Sequence[KittiObject], decimals: int = 2) -> None:
    """Write label_2 lines (and a score as the 16th field where an object has one), atomically.
    KITTI's own labels have 2 decimals; results are usually written with 4."""
    d = decimals
    lines = []
    for o in objects:
        if o.type not in CLASSES:
            raise DataError(f"{path}: unknown object type {o.type!r}; KITTI's are {', '.join(CLASSES)}.")
        nums = [o.alpha, *o.bbox, *o.dimensions, *o.location, o.rotation_y]
        line = f"{o.type} {o.truncated:.2f} {int(o.occluded)} " + " ".join(f"{x:.{d}f}" for x in nums)
        if o.score is not None:
            line += f" {o.score:.4f}"
        lines.append(line)
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image_2 file as ``[H, W, 3]`` uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image (a frame's camera image; the camera-fusion detectors and "
                        "`zoo detect` need it: restore the file or leave the frame out of the split).")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: the image cannot be decoded ({e}).") from None


def read_split(path: str | os.PathLike) -> list[str]:
    """An ``ImageSets/<split>.txt``: one six-digit frame index a line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such split file (ImageSets/train.txt, val.txt, test.txt ...).")
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if not s.isdigit():
            raise DataError(f"{path}:{lineno}: {s!r} is not a frame index.")
        out.append(s)
    return out


def labels_to_arrays(objects: Sequence[KittiObject]) -> dict[str, np.ndarray]:
    """Column arrays: name [N] str, truncated, occluded, alpha [N], bbox [N, 4], dimensions
    [N, 3] (h, w, l), location [N, 3], rotation_y [N], score [N] (0 where absent)."""
    n = len(objects)
    return {
        "name": np.array([o.type for o in objects], dtype=object),
        "truncated": np.array([o.truncated for o in objects], dtype=np.float64),
        "occluded": np.array([o.occluded for o in objects], dtype=np.int64),
        "alpha": np.array([o.alpha for o in objects], dtype=np.float64),
        "bbox": np.array([o.bbox for o in objects], dtype=np.float64).reshape(n, 4),
        "dimensions": np.array([o.dimensions for o in objects], dtype=np.float64).reshape(n, 3),
        "location": np.array([o.location for o in objects], dtype=np.float64).reshape(n, 3),
        "rotation_y": np.array([o.rotation_y for o in objects], dtype=np.float64),
        "score": np.array([0.0 if o.score is None else o.score for o in objects], dtype=np.float64),
    }


# ----------------------------------------------------------------------------- transforms

def camera_to_lidar_boxes(boxes: np.ndarray, calib: Calib) -> np.ndarray:
    """Camera boxes ``[N, 7]`` (x, y, z bottom centre, h, w, l, rotation_y) -> LiDAR boxes
    ``[N, 7]`` (x, y, z centre, l, w, h, yaw)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    h, w, l, ry = boxes[:, 3], boxes[:, 4], boxes[:, 5], boxes[:, 6]
    centre = calib.rect_to_lidar(boxes[:, :3])
    # the box's up axis is the rectified camera's -y, which Tr and R0 map to (very nearly) LiDAR z
    centre[:, 2] += h / 2
    return np.stack([centre[:, 0], centre[:, 1], centre[:, 2], l, w, h, -ry - math.pi / 2], axis=1)


def lidar_to_camera_boxes(boxes: np.ndarray, calib: Calib) -> np.ndarray:
    """The inverse of `camera_to_lidar_boxes`."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    l, w, h, yaw = boxes[:, 3], boxes[:, 4], boxes[:, 5], boxes[:, 6]
    bottom = boxes[:, :3].copy()
    bottom[:, 2] -= h / 2
    loc = calib.lidar_to_rect(bottom)
    return np.stack([loc[:, 0], loc[:, 1], loc[:, 2], h, w, l, -yaw - math.pi / 2], axis=1)


def camera_box_corners(boxes: np.ndarray) -> np.ndarray:
    """The 8 corners ``[N, 8, 3]`` of camera boxes in the rectified camera frame (bottom four
    first)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    h, w, l, ry = boxes[:, 3:4], boxes[:, 4:5], boxes[:, 5:6], boxes[:, 6]
    sx = np.array([1, 1, -1, -1, 1, 1, -1, -1]) / 2
    sz = np.array([1, -1, -1, 1, 1, -1, -1, 1]) / 2
    x, z = l * sx, w * sz
    y = np.concatenate([np.zeros((len(boxes), 4)), -h.repeat(4, 1)], axis=1)
    c, s = np.cos(ry)[:, None], np.sin(ry)[:, None]
    # rotation about +y by rotation_y: x' = c x + s z, z' = -s x + c z
    xr, zr = c * x + s * z, -s * x + c * z
    return np.stack([xr, y, zr], axis=-1) + boxes[:, None, :3]


def image_boxes(boxes: np.ndarray, calib: Calib, image_shape: tuple[int, int] | None = None) -> np.ndarray:
    """2D boxes ``[N, 4]`` (left, top, right, bottom) enclosing the projected corners of camera
    boxes, clipped to ``image_shape = (H, W)`` when given. Boxes must lie in front of the camera."""
    corners = camera_box_corners(boxes)
    uv, _ = calib.rect_to_image(corners.reshape(-1, 3))
    uv = uv.reshape(-1, 8, 2)
    out = np.concatenate([uv.min(axis=1), uv.max(axis=1)], axis=1)
    if image_shape is not None:
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, image_shape[1] - 1)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, image_shape[0] - 1)
    return out


def in_image(points: np.ndarray, calib: Calib, image_shape: tuple[int, int]) -> np.ndarray:
    """Field-of-view mask ``[N]``: LiDAR points in front of cam2 that project inside the image
    ``(H, W)`` (OpenPCDet's FOV_POINTS_ONLY rule: ``0 <= u < W``, ``0 <= v < H``, depth >= 0)."""
    uv, depth = calib.lidar_to_image(points)
    h, w = image_shape
    return (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h) & (depth >= 0)


def points_in_boxes(points: np.ndarray, boxes: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """``[N, K]`` bool: point n lies inside LiDAR box k (grown by `margin` on every side);
    `zoo.boxes.points_in_boxes` in float64 on numpy arrays."""
    b = np.asarray(boxes, np.float64)
    b = b.reshape(0, 7) if b.size == 0 else b[:, :7]
    pts = torch.from_numpy(np.asarray(points, np.float64))
    return _points_in_boxes(pts, torch.from_numpy(b), margin).numpy()


def crop_to_range(points: np.ndarray, point_range: Sequence[float]) -> np.ndarray:
    """Points inside ``[xmin, ymin, zmin, xmax, ymax, zmax)`` (half-open, as the voxelizer keeps
    them)."""
    r = np.asarray(point_range, dtype=np.float32)
    p = points[:, :3]
    keep = ((p >= r[:3]) & (p < r[3:])).all(axis=1)
    return points[keep]


def predictions_to_objects(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                           calib: Calib, image_shape: tuple[int, int]) -> list[KittiObject]:
    """Detector output (LiDAR boxes ``[K, 7]``, scores ``[K]``, 1-based labels ``[K]``) as KITTI
    result objects: the camera box, the 2D box of its projected corners clipped to the image,
    and alpha from the box's bearing, as OpenPCDet writes them. Boxes behind the camera or
    projecting outside the image are left out (no 2D box exists for them)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    if len(boxes) == 0:
        return []
    cam = lidar_to_camera_boxes(boxes, calib)
    front = camera_box_corners(cam)[..., 2].min(axis=1) > 0.1
    out = []
    if not front.any():
        return out
    b2d = np.full((len(cam), 4), np.nan)
    b2d[front] = image_boxes(cam[front], calib, image_shape)
    for i in np.flatnonzero(front):
        l, t, r, b = b2d[i]
        if r - l < 1 or b - t < 1:
            continue
        ry = math.remainder(cam[i, 6], 2 * math.pi)
        alpha = math.remainder(-math.atan2(-boxes[i, 1], boxes[i, 0]) + ry, 2 * math.pi)
        out.append(KittiObject(class_names[int(labels[i]) - 1], -1.0, -1, alpha, (l, t, r, b), tuple(cam[i, 3:6]),
                               tuple(cam[i, :3]), ry, float(scores[i])))
    return out
