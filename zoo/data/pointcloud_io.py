"""Writing point clouds: ``.npy``, ASCII ``.ply``, and a PNG grid of views (PIL only).

The grid draws each cloud from a fixed oblique camera (orthographic), far points first, as
small discs shaded by depth; every cloud is scaled by its own extent so shapes of any
normalization fill their cell.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from zoo.io import atomic_write

__all__ = ["ply_bytes", "render_grid", "save_clouds"]


def ply_bytes(points: np.ndarray) -> bytes:
    """ASCII PLY of ``points [N,3]`` (vertices only)."""
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    head = (f"ply\nformat ascii 1.0\nelement vertex {len(pts)}\nproperty float x\nproperty float y\n"
            "property float z\nend_header\n")
    body = "\n".join(f"{x:.6g} {y:.6g} {z:.6g}" for x, y, z in pts)
    return (head + body + "\n").encode()


def _view(points: np.ndarray, azimuth: float, elevation: float) -> tuple[np.ndarray, np.ndarray]:
    """Screen x, y and depth of ``points`` seen from the given angles (y up)."""
    a, e = math.radians(azimuth), math.radians(elevation)
    rot_y = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rot_x = np.array([[1, 0, 0], [0, math.cos(e), -math.sin(e)], [0, math.sin(e), math.cos(e)]])
    p = points @ (rot_x @ rot_y).T
    return p[:, :2], p[:, 2]


def render_grid(clouds, cols: int | None = None, cell: int = 160, azimuth: float = 35.0,
                elevation: float = 20.0, labels=None):
    """A PIL image with one view per cloud of ``clouds [K,N,3]`` on a white background."""
    from PIL import Image, ImageDraw

    clouds = np.asarray(clouds, dtype=np.float64)
    k = len(clouds)
    cols = cols or max(1, math.ceil(math.sqrt(k)))
    rows = max(1, math.ceil(k / cols))
    img = Image.new("RGB", (cols * cell, rows * cell), "white")
    draw = ImageDraw.Draw(img)
    radius = max(1.0, cell / 110)
    for i, pts in enumerate(clouds):
        pts = pts - pts.mean(0)
        xy, depth = _view(pts, azimuth, elevation)
        scale = 0.42 * cell / max(np.abs(xy).max(), 1e-9)
        ox, oy = (i % cols) * cell + cell / 2, (i // cols) * cell + cell / 2
        order = np.argsort(depth)  # far (more negative z) first
        span = max(depth.max() - depth.min(), 1e-9)
        for j in order:
            shade = 0.25 + 0.6 * (1 - (depth[j] - depth.min()) / span)
            colour = (int(40 + 150 * shade), int(70 + 120 * shade), int(160 + 80 * shade))
            x, y = ox + xy[j, 0] * scale, oy - xy[j, 1] * scale
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
        if labels is not None:
            draw.text(((i % cols) * cell + 4, (i // cols) * cell + 2), str(labels[i]), fill=(60, 60, 60))
    return img


def save_clouds(out_dir: str | Path, clouds, prefix: str = "sample", grid: bool = True) -> list[Path]:
    """Write ``<prefix>_<i>.npy`` and ``.ply`` per cloud, ``<prefix>s.npy`` (all) and a PNG grid."""
    out = Path(out_dir)
    clouds = np.asarray(clouds, dtype=np.float32)
    written = []
    for i, pts in enumerate(clouds):
        buf = io.BytesIO()
        np.save(buf, pts)
        for suffix, data in ((".npy", buf.getvalue()), (".ply", ply_bytes(pts))):
            path = out / f"{prefix}_{i:03d}{suffix}"
            with atomic_write(path, "wb") as f:
                f.write(data)
            written.append(path)
    buf = io.BytesIO()
    np.save(buf, clouds)
    with atomic_write(out / f"{prefix}s.npy", "wb") as f:
        f.write(buf.getvalue())
    written.append(out / f"{prefix}s.npy")
    if grid:
        png = io.BytesIO()
        render_grid(clouds).save(png, format="PNG")
        with atomic_write(out / f"{prefix}s.png", "wb") as f:
            f.write(png.getvalue())
        written.append(out / f"{prefix}s.png")
    return written
