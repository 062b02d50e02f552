"""`ExportReport`: what an export wrote and how it was checked (also the JSON `zoo export` saves)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["ExportReport", "Comparison", "compare"]


@dataclass
class Comparison:
    """One numeric check of an exported model against torch on the same inputs.

    rel_diff is ``max |exported - torch| / max |torch|`` over every output.
    """

    batch_size: int
    max_abs_diff: float
    rel_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.rel_diff <= self.tolerance


@dataclass
class ExportReport:
    """Result of `to_onnx` / `to_coreml`.

    files: ``{"path", "bytes", "sha256"}`` per file written (an ``.mlpackage`` counts as one
        entry whose hash covers its files' relative paths and contents, in sorted order).
    inputs, outputs: ``{"name", "shape", "dtype"}`` as stored in the exported file; a dynamic
        dimension appears as its symbolic name (e.g. ``"batch"``).
    checks: structural checks that passed (e.g. ``onnx.checker full_check``).
    comparisons: numeric checks against torch; empty when the format cannot run here.
    """

    format: str
    model: str
    path: str
    files: list[dict]
    inputs: list[dict]
    outputs: list[dict]
    precision: str
    reparameterized: bool
    details: dict = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def summary(self) -> str:
        """One line per comparison (or per skipped check), for printing."""
        lines = [
            f"{self.format} {self.model}: batch {c.batch_size} max|diff| {c.max_abs_diff:.2e} "
            f"rel {c.rel_diff:.2e} (tolerance {c.tolerance:.0e}) {'ok' if c.passed else 'FAILED'}"
            for c in self.comparisons
        ]
        lines += [f"{self.format} {self.model}: {s}" for s in self.skipped]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["comparisons"] = [{**asdict(c), "passed": c.passed} for c in self.comparisons]
        d["verified"] = self.verified
        return d

    def relocate(self, old_dir: Path, new_dir: Path) -> None:
        """Rewrite file paths after the files moved from `old_dir` to `new_dir`."""
        def move(p: str) -> str:
            rel = os.path.relpath(p, old_dir)
            return str(Path(new_dir) / rel)

        self.path = move(self.path)
        for f in self.files:
            f["path"] = move(f["path"])


def compare(got, ref, batch_size: int, tolerance: float) -> Comparison:
    """Compare lists of arrays/tensors (exported, torch) output by output.

    Raises `ExportError` when the shapes differ; a non-finite exported value counts as an
    infinite difference.
    """
    import numpy as np

    from zoo.errors import ExportError

    got = [np.asarray(g, dtype=np.float64) for g in got]
    ref = [np.asarray(r, dtype=np.float64) for r in ref]
    if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref)):
        raise ExportError(
            f"exported outputs have shapes {[g.shape for g in got]} at batch {batch_size}; "
            f"torch gives {[r.shape for r in ref]}."
        )
    max_abs = max((float(np.abs(g - r).max()) for g, r in zip(got, ref) if g.size), default=0.0)
    scale = max((float(np.abs(r).max()) for r in ref if r.size), default=0.0)
    rel = max_abs / max(scale, 1e-12)
    if not all(np.isfinite(g).all() for g in got):
        max_abs = rel = float("inf")
    return Comparison(batch_size, max_abs, rel, tolerance)
