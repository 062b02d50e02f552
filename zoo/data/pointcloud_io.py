"""Point cloud files: ``.npy`` and ``.ply`` in and out, and a PNG grid of views (PIL only).

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

__all__ = ["ply_bytes", "read_cloud", "render_grid", "save_clouds"]


def ply_bytes(points: np.ndarray) -> bytes:
    """ASCII PLY of ``points [N,3]`` (vertices only)."""
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    head = (f"ply\nformat ascii 1.0\nelement vertex {len(pts)}\nproperty float x\nproperty float y\n"
            "property float z\nend_header\n")
    body = "\n".join(f"{x:.6g} {y:.6g} {z:.6g}" for x, y, z in pts)
    return (head + body + "\n").encode()


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def read_cloud(path: str | Path) -> np.ndarray:
    """``[M,3]`` float32 points from a ``.npy`` (``[M,3]`` or ``[1,M,3]``) or a ``.ply`` (ASCII or
    binary, the ``x y z`` of its vertices). A PLY with faces is a mesh, not a point cloud,
    and is refused, as is anything else that does not hold finite 3D points."""
    from zoo.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: pass a point cloud as .npy ([M, 3]) or .ply.")
    if path.suffix.lower() == ".npy":
        try:
            pts = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{path} is not a readable .npy array ({e}); save the points with np.save.") from e
        pts = pts[0] if pts.ndim == 3 and pts.shape[0] == 1 else pts
        if pts.ndim != 2 or pts.shape[1] != 3 or not np.issubdtype(pts.dtype, np.number):
            raise DataError(f"{path} holds an array of shape {pts.shape}; a point cloud is [M, 3].")
    elif path.suffix.lower() == ".ply":
        pts = _read_ply(path)
    else:
        raise DataError(f"{path}: point clouds are read from .npy or .ply, not {path.suffix or 'a bare name'}.")
    pts = pts.astype(np.float32)
    if not np.isfinite(pts).all():
        raise DataError(f"{path} holds NaN or infinite coordinates; drop those points.")
    return pts


def _read_ply(path: Path) -> np.ndarray:
    from zoo.errors import DataError

    raw = path.read_bytes()
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise DataError(f"{path} is not a PLY file (no 'ply' ... 'end_header' header).")
    header = raw[:end].decode("ascii", errors="replace").splitlines()
    body = raw[raw.index(b"\n", end) + 1:]
    fmt, elements = None, []
    for line in header:
        w = line.split()
        if not w:
            continue
        if w[0] == "format":
            fmt = w[1]
        elif w[0] == "element":
            elements.append((w[1], int(w[2]), []))
        elif w[0] == "property" and elements:
            elements[-1][2].append(("list", w[-1]) if w[1] == "list" else (w[1], w[2]))
    names = [e[0] for e in elements]
    if "vertex" not in names or not elements[names.index("vertex")][1]:
        raise DataError(f"{path} has no vertices: it is not a point cloud.")
    if any(e[0] == "face" and e[1] > 0 for e in elements):
        raise DataError(f"{path} is a mesh (it has faces), not a point cloud: sample points on its surface "
                        "(e.g. trimesh.sample.sample_surface) and pass those.")
    _, count, props = elements[names.index("vertex")]
    pnames = [p[1] for p in props]
    if not {"x", "y", "z"} <= set(pnames) or any(p[0] == "list" for p in props):
        raise DataError(f"{path}'s vertices have properties {pnames}; a point cloud needs x, y and z.")
    if names.index("vertex") != 0:
        raise DataError(f"{path}: elements before the vertices ({names[0]}) are not supported; put the vertex "
                        "element first.")
    cols = [pnames.index(a) for a in "xyz"]
    try:
        if fmt == "ascii":
            rows = body.decode("ascii").split("\n")[:count]
            table = np.array([r.split()[:len(props)] for r in rows], dtype=np.float64)
        elif fmt in ("binary_little_endian", "binary_big_endian"):
            order = "<" if fmt == "binary_little_endian" else ">"
            dtype = np.dtype([(n, order + _PLY_TYPES[t]) for t, n in props])
            rec = np.frombuffer(body, dtype=dtype, count=count)
            table = np.stack([rec[n].astype(np.float64) for n in pnames], 1)
        else:
            raise DataError(f"{path}: PLY format {fmt!r} is not ascii or binary.")
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: its vertex data do not match its header ({e}).") from e
    if table.shape != (count, len(props)):
        raise DataError(f"{path}: the header promises {count} vertices of {len(props)} values; the data differ.")
    return table[:, cols]


def _view(points: np.ndarray, azimuth: float, elevation: float) -> tuple[np.ndarray, np.ndarray]:
    """Screen x, y and depth of ``points`` seen from the given angles (y up)."""
    a, e = math.radians(azimuth), math.radians(elevation)
    rot_y = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rot_x = np.array([[1, 0, 0], [0, math.cos(e), -math.sin(e)], [0, math.sin(e), math.cos(e)]])
    p = points @ (rot_x @ rot_y).T
    return p[:, :2], p[:, 2]


def render_grid(clouds, cols: int | None = None, cell: int = 160, azimuth: float = 35.0,
                elevation: float = 20.0, labels=None, highlight=None, shared_frame: bool = False):
    """A PIL image with one view per cloud of ``clouds`` (``[K,N,3]``, or a list of ``[N_i,3]``)
    on a white background.

    ``highlight``: per cloud, how many leading points to draw in orange (completion's given
    points). ``shared_frame``: one centre and scale for all clouds (from their union), so a
    partial cloud and its completion line up; else each cloud fills its cell.
    """
    from PIL import Image, ImageDraw

    clouds = [np.asarray(c, dtype=np.float64).reshape(-1, 3) for c in clouds]
    k = len(clouds)
    cols = cols or max(1, math.ceil(math.sqrt(k)))
    rows = max(1, math.ceil(k / cols))
    img = Image.new("RGB", (cols * cell, rows * cell), "white")
    draw = ImageDraw.Draw(img)
    radius = max(1.0, cell / 110)
    union = np.concatenate(clouds) if shared_frame else None
    for i, pts in enumerate(clouds):
        centre = (union if shared_frame else pts).mean(0)
        pts = pts - centre
        xy, depth = _view(pts, azimuth, elevation)
        ref = _view(union - centre, azimuth, elevation)[0] if shared_frame else xy
        scale = 0.42 * cell / max(np.abs(ref).max(), 1e-9)
        ox, oy = (i % cols) * cell + cell / 2, (i // cols) * cell + cell / 2
        order = np.argsort(depth)  # far (more negative z) first
        span = max(depth.max() - depth.min(), 1e-9)
        lead = int(highlight[i]) if highlight is not None else 0
        for j in order:
            shade = 0.25 + 0.6 * (1 - (depth[j] - depth.min()) / span)
            if j < lead:
                colour = (int(200 + 50 * shade), int(90 + 70 * shade), int(20 + 30 * shade))
            else:
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
