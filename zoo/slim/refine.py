"""Closing the loop between a latency table and the backend it was measured on.

A table's sum misses what a network does between its blocks: after the ``a * sum + b``
calibration the additivity report still finds errors of 10-20% on some architectures
(``docs/results/slim_*``), so a search that trusts the table lands that far from its target.
Where the table's backend runs here, `refine` measures the architecture the search stopped at
and, when it misses the target by more than ``tol``, searches again with the target corrected
by what the measurement says of the table there: ``target * predicted / measured``.

The searches' choices do not depend on the target (each step takes the action with the least
accuracy or importance lost per millisecond, or per unit of MES, gained; only the stop reads
the target), so every search walks the same trajectory and a corrected target only moves the
stop: earlier when the network ran faster than predicted, later when slower. This is our
addition: EfficientFormer searched on the table alone (section 4.2 of arXiv 2206.01191).

Rounds end when a measured architecture is within ``tol`` of the target, when the corrected
search stops at an architecture already measured, or after ``rounds`` measurements. The pick:
of the measured architectures within ``tol``, the one closest to the target; else the slowest
one under the target; else the fastest one measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from zoo.errors import ConfigError, DataError

__all__ = ["Refinement", "refine"]


@dataclass
class Refinement:
    """The picked search result, its measured latency, and every round
    (``table_target_ms``, ``predicted_ms``, ``measured_ms``, ``arch``)."""

    result: Any
    measured_ms: float
    target_ms: float
    rounds: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"target_ms": self.target_ms, "measured_ms": self.measured_ms, "rounds": self.rounds}


def refine(search: Callable[[float], Any], measure: Callable[[Any], float], target_ms: float, first=None,
           tol: float = 0.05, rounds: int = 3, on_round: Callable[[dict], None] | None = None) -> Refinement:
    """Search (``search(target) -> result`` with ``result.arch``, ``result.predicted_ms``), measure
    (``measure(result) -> ms``), correct the target and search again (module docstring).
    `first`: the result of ``search(target_ms)`` when already at hand."""
    if rounds < 1:
        raise ConfigError(f"refinement needs at least one measurement (rounds {rounds}).")
    if not 0 < tol < 1:
        raise ConfigError(f"the tolerance is a fraction of the target between 0 and 1 (got {tol}).")
    result = first if first is not None else search(target_ms)
    goal = target_ms
    seen: dict = {}  # arch -> (result, measured ms)
    log: list[dict] = []
    while True:
        ms = float(measure(result))
        seen[result.arch] = (result, ms)
        log.append({"table_target_ms": goal, "predicted_ms": float(result.predicted_ms), "measured_ms": ms,
                    "arch": result.arch.to_json()})
        if on_round:
            on_round(log[-1])
        if abs(ms / target_ms - 1) <= tol or len(log) >= rounds:
            break
        goal = target_ms * result.predicted_ms / ms
        try:
            result = search(goal)
        except DataError as e:  # the corrected target lies below what the space reaches on the table
            log[-1]["next"] = str(e)
            break
        if result.arch in seen:
            break
    measured = list(seen.values())
    inside = [(r, m) for r, m in measured if abs(m / target_ms - 1) <= tol]
    under = [(r, m) for r, m in measured if m <= target_ms]
    if inside:
        pick = min(inside, key=lambda rm: abs(rm[1] - target_ms))
    elif under:
        pick = max(under, key=lambda rm: rm[1])
    else:
        pick = min(measured, key=lambda rm: rm[1])
    return Refinement(pick[0], pick[1], target_ms, log)
