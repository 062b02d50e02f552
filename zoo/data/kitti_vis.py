"""Pictures of a KITTI frame and its boxes: the camera image with 3D boxes projected as
wireframes, and a bird's-eye view of the points with the boxes' footprints. PIL only."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from zoo.data.kitti import Calib, camera_box_corners, lidar_to_camera_boxes
from zoo.io import atomic_write

__all__ = ["draw_image_boxes", "draw_bev", "frame_picture", "CLASS_COLOURS"]

CLASS_COLOURS = {"Car": (255, 64, 64), "Van": (255, 140, 0), "Pedestrian": (64, 200, 255), "Cyclist": (255, 230, 40)}
_GT = (80, 255, 80)
_EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]


def _colour(name: str):
    return CLASS_COLOURS.get(name, (220, 220, 220))


def draw_image_boxes(image: np.ndarray, lidar_boxes: np.ndarray, names: Sequence[str], calib: Calib,
                     gt_boxes: np.ndarray | None = None, scores: Sequence[float] | None = None):
    """The image with each LiDAR box's 3D wireframe (front face crossed); ground truth thin green."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(im)

    def wire(boxes, colours, width, labels=None):
        if len(boxes) == 0:
            return
        cam = lidar_to_camera_boxes(np.asarray(boxes).reshape(-1, 7), calib)
        corners = camera_box_corners(cam)
        for k, (c, col) in enumerate(zip(corners, colours)):
            if (c[:, 2] < 0.5).any():
                continue
            uv, _ = calib.rect_to_image(c)
            for a, b in _EDGES:
                draw.line([tuple(uv[a]), tuple(uv[b])], fill=col, width=width)
            draw.line([tuple(uv[0]), tuple(uv[5])], fill=col, width=width)  # the front face (+l side)
            draw.line([tuple(uv[1]), tuple(uv[4])], fill=col, width=width)
            if labels is not None:
                top = uv[4:].min(axis=0)
                draw.text((float(uv[:, 0].min()), float(top[1]) - 11), labels[k], fill=col)

    if gt_boxes is not None:
        wire(gt_boxes, [_GT] * len(gt_boxes), 1)
    labels = [f"{n} {s:.2f}" for n, s in zip(names, scores)] if scores is not None else list(names)
    wire(lidar_boxes, [_colour(n) for n in names], 2, labels)
    return im


def draw_bev(points: np.ndarray, lidar_boxes: np.ndarray, names: Sequence[str], point_range: Sequence[float],
             gt_boxes: np.ndarray | None = None, pixels_per_metre: float | None = None):
    """A top view: x forward (up the picture), y left (to the left); points shaded by height.
    The scale defaults to a picture about 620 pixels wide."""
    from PIL import Image, ImageDraw

    x0, y0, _, x1, y1, _ = point_range
    pixels_per_metre = pixels_per_metre or 620 / (y1 - y0)
    w, h = int((y1 - y0) * pixels_per_metre), int((x1 - x0) * pixels_per_metre)
    canvas = np.zeros((h, w, 3), dtype=np.uint8) + 16

    def to_px(x, y):
        return (y1 - y) * pixels_per_metre, (x1 - x) * pixels_per_metre

    p = points[(points[:, 0] >= x0) & (points[:, 0] < x1) & (points[:, 1] >= y0) & (points[:, 1] < y1)]
    u, v = to_px(p[:, 0], p[:, 1])
    ui, vi = np.clip(u.astype(int), 0, w - 1), np.clip(v.astype(int), 0, h - 1)
    z = np.clip((p[:, 2] + 2.0) / 3.0, 0, 1)
    shade = (90 + 165 * z).astype(np.uint8)
    canvas[vi, ui] = np.stack([shade, shade, shade], 1)
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)

    def footprint(boxes, colours, width):
        for b, col in zip(np.asarray(boxes).reshape(-1, 7), colours):
            c, s = np.cos(b[6]), np.sin(b[6])
            corners = [(b[0] + c * dx - s * dy, b[1] + s * dx + c * dy)
                       for dx, dy in ((b[3] / 2, b[4] / 2), (-b[3] / 2, b[4] / 2), (-b[3] / 2, -b[4] / 2), (b[3] / 2, -b[4] / 2))]
            pts = [to_px(x, y) for x, y in corners]
            draw.line(pts + [pts[0]], fill=col, width=width)
            front = to_px(b[0] + c * b[3] / 2, b[1] + s * b[3] / 2)
            draw.line([to_px(b[0], b[1]), front], fill=col, width=width)

    if gt_boxes is not None:
        footprint(gt_boxes, [_GT] * len(gt_boxes), 1)
    footprint(lidar_boxes, [_colour(n) for n in names], 2)
    return im


def frame_picture(path: str | os.PathLike, image: np.ndarray, points: np.ndarray, calib: Calib,
                  lidar_boxes: np.ndarray, names: Sequence[str], point_range: Sequence[float],
                  scores: Sequence[float] | None = None, gt_boxes: np.ndarray | None = None, title: str = "") -> Path:
    """Write the camera view above the bird's-eye view as one PNG."""
    from PIL import Image, ImageDraw

    top = draw_image_boxes(image, lidar_boxes, names, calib, gt_boxes, scores)
    bev = draw_bev(points, lidar_boxes, names, point_range, gt_boxes)
    scale = top.width / bev.width if bev.width > top.width else 1.0
    if scale != 1.0:
        bev = bev.resize((top.width, int(bev.height * scale)))
    out = Image.new("RGB", (max(top.width, bev.width), top.height + bev.height + 18), (0, 0, 0))
    out.paste(top, (0, 0))
    out.paste(bev, ((out.width - bev.width) // 2, top.height + 18))
    ImageDraw.Draw(out).text((4, top.height + 3), title or "bird's-eye view (x forward, up)", fill=(230, 230, 230))
    path = Path(path)
    with atomic_write(path, "wb") as f:
        out.save(f, format="PNG")
    return path
