"""Where export files are built and how they are published: all at once, or not at all.

Every export builds its files in a hidden stage folder inside the destination folder, checks
them there, and only then renames them into place (same filesystem, so each rename is
atomic). A failed or interrupted export leaves the destination as it was.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from zoo.errors import ExportError
from zoo.io import replace_path

__all__ = ["make_stage", "publish", "publish_verified", "file_record"]


def make_stage(folder: Path) -> Path:
    """A fresh hidden folder inside `folder` where files are built before they are published."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".zoo-export-", dir=folder))
    except OSError as e:
        raise ExportError(f"cannot write to {folder}: {e.strerror or e}. Choose a writable output folder.") from None


def publish(stage: Path, folder: Path) -> None:
    """Move everything in `stage` into `folder` (same filesystem: renames)."""
    for item in sorted(stage.iterdir()):
        replace_path(item, folder / item.name)


def publish_verified(report, stage: Path, folder: Path, fmt: str, verbose: bool) -> None:
    """Print `report`'s figures if `verbose`; raise `ExportError` if a comparison failed, else
    publish `stage` into `folder` and point the report's paths there."""
    if verbose:
        print(report.summary())
    if any(not c.passed for c in report.comparisons):
        raise ExportError(f"the {fmt} export of {report.model} differs from torch:\n{report.summary()}")
    publish(stage, folder)
    report.relocate(stage, folder)


def file_record(path: Path) -> dict:
    """Path, size and sha256 of a file, or of a directory's files taken together."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        size = 0
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path).as_posix().encode()
            h.update(len(rel).to_bytes(8, "little") + rel)
            size += _hash_into(h, f)
    else:
        size = _hash_into(h, path)
    return {"path": str(path), "bytes": size, "sha256": h.hexdigest()}


def _hash_into(h, path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return n
