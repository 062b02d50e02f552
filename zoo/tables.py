"""Plain-text and markdown tables for the CLI, the README and benchmark reports, and the
results files (``docs/results/*.md``) the benchmark scripts write."""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import sys
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["format_table", "model_rows", "MODEL_HEADERS", "human_count", "environment", "results_file"]

MODEL_HEADERS = ("model", "family", "task", "params", "MACs", "input", "paper top-1", "default weights")


def human_count(n: int | float) -> str:
    """12_473_772 -> '12.47M', 79_193_600 -> '79.19M', 1_300_000_000 -> '1.30G'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return str(int(n))


def model_rows(names: Sequence[str]) -> list[tuple[str, ...]]:
    """One row per model for `MODEL_HEADERS`, params and MACs computed (and cached)."""
    from zoo.flops import complexity
    from zoo.registry import model_card

    rows = []
    for name in names:
        card = model_card(name)
        cx = complexity(name)
        top1 = card.metrics.get("imagenet_top1")
        rows.append(
            (
                name,
                card.family,
                card.task,
                "-" if cx["params"] is None else human_count(cx["params"]),
                "-" if cx["macs"] is None else human_count(cx["macs"]),
                "x".join(map(str, card.input.shape)),
                f"{top1.value:.1f}" if top1 else "-",
                card.default_tag or "-",
            )
        )
    return rows


def format_table(rows: Sequence[Sequence], headers: Sequence[str], fmt: str = "table") -> str:
    """Render rows as an aligned text table (``table``) or a GitHub markdown table (``markdown``)."""
    cells = [[str(c) for c in r] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def environment() -> str:
    """One line: the machine, its CPUs and the versions of everything the figures depend on."""
    import torch

    parts = [f"{platform.machine()} {platform.processor() or ''}".strip(), f"{os.cpu_count()} CPUs",
             f"{torch.get_num_threads()} torch threads", f"Python {platform.python_version()}",
             f"torch {torch.__version__}"]
    for module in ("timm", "onnxruntime", "nvdiffrast"):
        mod = sys.modules.get(module)
        if mod is not None:
            parts.append(f"{module} {getattr(mod, '__version__', '?')}")
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    from zoo._version import __version__

    parts.append(f"zoo {__version__}")
    return ", ".join(parts)


@contextlib.contextmanager
def results_file(path: str | os.PathLike | None, title: str) -> Iterator[None]:
    """Print as usual and, when `path` is given, also write everything printed inside the block
    to `path` (markdown, atomically) under a header: `title`, the command that made it, the
    date, and `environment()` at the end of the run. An exception writes nothing."""
    if path is None:
        yield
        return
    from zoo.io import atomic_write

    buffer = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            buffer.write(text)
            return stdout.write(text)

        def flush(self) -> None:
            stdout.flush()

    stdout = sys.stdout
    sys.stdout = Tee()
    try:
        yield
    finally:
        sys.stdout = stdout
    command = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if sys.argv and sys.argv[0] else "?"
    head = (f"# {title}\n\nWritten by `python {command}` on {datetime.date.today().isoformat()}.\n\n"
            f"Environment: {environment()}.\n\n")
    with atomic_write(path, "w") as f:
        f.write(head + buffer.getvalue().strip() + "\n")
    print(f"wrote {path}", file=sys.stderr)
