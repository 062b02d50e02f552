"""The greedy slimming search for backbones whose constructor takes their architecture:
EfficientViT (widths, depths, heads) and EfficientFormerV2 (widths, depths, FFN ratios,
attention blocks). EfficientFormer (V1) has its own supernet and search (`zoo.slim.search`).

A space lists, for an architecture, the actions it allows (`Move`s, in tie-break order).
Each step prices every action by what it loses on an accuracy oracle (``oracle(arch)``,
higher is better: e.g. `zoo.slim.accuracy.InheritedAccuracy`) against what it gains in
efficiency, takes the cheapest, and stops at the first architecture the table predicts at most
the target. Two efficiency measures:

- ``ms`` (EfficientFormer's rule, section 4.2 of arXiv 2206.01191): accuracy lost per
  millisecond saved on the table;
- ``mes``, EfficientFormerV2's Mean Efficiency Score (section 4 of arXiv 2212.08059):
  ``MES = 100 * prod_m (m / u_m) ** -alpha_m`` over latency (table, ms) and size (parameters,
  millions), so an action is priced by accuracy lost per unit of MES gained and a search
  that must cut latency also prefers cuts that shrink the model. The units ``u`` (1 ms, 1 M)
  and weights ``alpha`` (0.5 each) are our choices where the paper gives none; they are
  arguments.

An action that saves no time on the table is never taken (a measured table is not always
monotonic in width); an accuracy that rises after an action counts as zero lost. Ties (on a
small validation set many actions lose nothing) go to the larger efficiency gain, then to the
space's order of actions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from zoo.errors import ConfigError, DataError
from zoo.flops import count_params
from zoo.slim.table import LatencyTable

__all__ = ["Move", "MES", "GreedyResult", "greedy_slim", "latency_floor"]


@dataclass(frozen=True)
class Move:
    """One action: its ``kind`` (``drop``, ``shrink``, ``heads``, ``ratio``, ``fewer_vit``), the
    stage it touches (-1: all), a description, and the architecture it leads to."""

    kind: str
    stage: int
    describe: str
    arch: Any


@dataclass(frozen=True)
class MES:
    """EfficientFormerV2's Mean Efficiency Score over latency and parameters (module docstring)."""

    ms_unit: float = 1.0
    params_unit: float = 1.0  # millions
    ms_alpha: float = 0.5
    params_alpha: float = 0.5

    def __call__(self, ms: float, params_m: float) -> float:
        return 100.0 * (ms / self.ms_unit) ** -self.ms_alpha * (params_m / self.params_unit) ** -self.params_alpha


@dataclass
class GreedyResult:
    """A search's end: the architecture, its predicted latency, the target, every step."""

    arch: Any
    predicted_ms: float
    target_ms: float
    trajectory: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"arch": self.arch.to_json(), "predicted_ms": self.predicted_ms, "target_ms": self.target_ms,
                "trajectory": self.trajectory}


def greedy_slim(space, table: LatencyTable, oracle: Callable[[Any], float], target_ms: float, start=None,
                efficiency: str = "ms", mes: MES = MES(), calibrated: bool = True, max_steps: int = 10000,
                on_step: Callable[[dict], None] | None = None) -> GreedyResult:
    """Slim from `start` (default the space's full network) until the table predicts at most
    `target_ms` (module docstring). Deterministic for a fixed table and oracle."""
    if target_ms <= 0:
        raise ConfigError(f"the target latency must be positive (got {target_ms} ms).")
    if efficiency not in ("ms", "mes"):
        raise ConfigError(f"efficiency must be 'ms' or 'mes', not {efficiency!r}.")
    if table.family != space.family:
        raise DataError(f"{table.where} holds {table.family} blocks; this search slims {space.family}.")
    table.check_covers(space.all_keys())
    params: dict = {}

    def latency(a) -> float:
        return table.predict(space.keys(a), calibrated=calibrated)

    def size(a) -> float:
        if a not in params:
            params[a] = count_params(space.build(a)) / 1e6  # MES counts millions
        return params[a]

    def gain(a, a_ms, b, b_ms) -> float:
        if efficiency == "ms":
            return a_ms - b_ms
        return mes(b_ms, size(b)) - mes(a_ms, size(a))

    arch = start if start is not None else space.full_arch()
    ms, score = latency(arch), oracle(arch)
    trajectory = [_record(0, None, arch, ms, score, 0.0, 0.0, None)]
    if on_step:
        on_step(trajectory[-1])
    for step in range(1, max_steps + 1):
        if ms <= target_ms:
            break
        best = None
        for order, move in enumerate(space.moves(arch)):
            new_ms = latency(move.arch)
            if new_ms >= ms:
                continue
            g = gain(arch, ms, move.arch, new_ms)
            if g <= 0:
                continue
            new_score = oracle(move.arch)
            lost = max(0.0, score - new_score)
            key = (lost / g, -g, order)
            if best is None or key < best[0]:
                best = (key, move, new_ms, new_score, lost, ms - new_ms)
        if best is None:
            raise DataError(f"slimming cannot go below {ms:.4g} ms (target {target_ms:.4g} ms): no action saves time on "
                            "this table (every stage at its smallest, or a table whose smaller blocks are not faster). "
                            "Choose a higher target or re-measure the table.")
        (price, _, _), move, ms, score, lost, saved = best
        arch = move.arch
        trajectory.append(_record(step, move, arch, ms, score, lost, saved, price))
        if on_step:
            on_step(trajectory[-1])
    return GreedyResult(arch, ms, target_ms, trajectory)


def latency_floor(space, table: LatencyTable, calibrated: bool = True) -> float:
    """The latency the search can reach at most down to: from the full network, the action
    saving the most time, until none saves any (a quick check of a target before training)."""
    arch = space.full_arch()
    ms = table.predict(space.keys(arch), calibrated=calibrated)
    while True:
        options = [(table.predict(space.keys(m.arch), calibrated=calibrated), i, m.arch)
                   for i, m in enumerate(space.moves(arch))]
        options = [o for o in options if o[0] < ms]
        if not options:
            return ms
        ms, _, arch = min(options, key=lambda o: (o[0], o[1]))


def _record(step, move, arch, ms, score, lost, saved, price) -> dict:
    # "importance" is the accuracy proxy's name in every trajectory (the PNG's y axis)
    return {"step": step, "action": move.describe if move else "start", "kind": move.kind if move else None,
            "predicted_ms": ms, "importance": score, "importance_lost": lost, "ms_saved": saved, "score": price,
            "arch": arch.to_json()}
