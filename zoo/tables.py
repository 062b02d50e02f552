"""Plain-text and markdown tables for the CLI, the README and benchmark reports."""
from __future__ import annotations

from typing import Sequence

__all__ = ["format_table", "model_rows", "MODEL_HEADERS", "human_count"]

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
                human_count(cx["params"]),
                human_count(cx["macs"]),
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
