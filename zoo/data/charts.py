"""Small PNG charts without a plotting library (training curves for the run folder)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from zoo.data.humans_io import save_png

__all__ = ["line_chart", "xy_chart"]

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127)]


def line_chart(path: str | Path, series: dict[str, list[float]], title: str = "", xlabel: str = "epoch",
               size: tuple[int, int] = (640, 360)) -> Path:
    """Each named series against its index, one colour each, a legend, y range from the data;
    non-finite points are left out. Written atomically as a PNG."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 150, 28, 36
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    vals = [v for s in series.values() for v in s if np.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max((len(s) for s in series.values()), default=1)
    px = lambda i: left + (w - left - right) * (i / max(n - 1, 1))  # noqa: E731
    py = lambda v: top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for t in range(5):
        v = lo + (hi - lo) * t / 4
        d.line([left - 4, py(v), left, py(v)], fill=(0, 0, 0))
        d.text((4, py(v) - 6), f"{v:.3g}", fill=(0, 0, 0))
    d.text((left, h - bottom + 8), f"0 .. {n - 1} {xlabel}", fill=(0, 0, 0))
    d.text((left, 8), title, fill=(0, 0, 0))
    for k, (name, s) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        pts = [(px(i), py(v)) for i, v in enumerate(s) if np.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts if len(pts) <= 40 else []:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.line([w - right + 10, top + 14 * k + 6, w - right + 30, top + 14 * k + 6], fill=colour, width=3)
        d.text((w - right + 34, top + 14 * k), name, fill=(0, 0, 0))
    return save_png(path, np.asarray(img))


def xy_chart(path: str | Path, series: dict[str, tuple[list[float], list[float]]], title: str = "",
             xlabel: str = "x", ylabel: str = "y", vline: float | None = None, vline_label: str = "target",
             size: tuple[int, int] = (640, 400)) -> Path:
    """Each named series as points ``(x, y)`` joined in order, both axes from the data (ticks
    on both), an optional dashed vertical line at ``vline`` (a target). PNG, atomic."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 64, 150, 28, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [x for a, _ in series.values() for x in a if np.isfinite(x)] + ([vline] if vline is not None else [])
    ys = [y for _, b in series.values() for y in b if np.isfinite(y)]

    def span(v):
        lo, hi = (min(v), max(v)) if v else (0.0, 1.0)
        pad = (hi - lo) * 0.05 if hi > lo else 0.5
        return lo - pad, hi + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)
    px = lambda v: left + (w - left - right) * (v - x0) / (x1 - x0)  # noqa: E731
    py = lambda v: top + (h - top - bottom) * (1 - (v - y0) / (y1 - y0))  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for t in range(5):
        yv, xv = y0 + (y1 - y0) * t / 4, x0 + (x1 - x0) * t / 4
        d.line([left - 4, py(yv), left, py(yv)], fill=(0, 0, 0))
        d.text((4, py(yv) - 6), f"{yv:.3g}", fill=(0, 0, 0))
        d.line([px(xv), h - bottom, px(xv), h - bottom + 4], fill=(0, 0, 0))
        d.text((px(xv) - 12, h - bottom + 6), f"{xv:.3g}", fill=(0, 0, 0))
    d.text((left, h - 16), xlabel, fill=(0, 0, 0))
    d.text((left, 8), f"{title}   (y: {ylabel})" if title else ylabel, fill=(0, 0, 0))
    if vline is not None and x0 <= vline <= x1:
        for y in range(top, h - bottom, 8):
            d.line([px(vline), y, px(vline), min(y + 4, h - bottom)], fill=(200, 0, 0))
        d.text((px(vline) + 4, top + 4), vline_label, fill=(200, 0, 0))
    for k, (name, (a, b)) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        pts = [(px(x), py(y)) for x, y in zip(a, b) if np.isfinite(x) and np.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.line([w - right + 10, top + 14 * k + 6, w - right + 30, top + 14 * k + 6], fill=colour, width=3)
        d.text((w - right + 34, top + 14 * k), name, fill=(0, 0, 0))
    return save_png(path, np.asarray(img))
