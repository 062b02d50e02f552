"""The latency-driven slimming search of EfficientFormer (arXiv 2206.01191, section 4.2).

State: a slimmed architecture (`SlotArch`): each stage's width and the supernet slots it
keeps, with the choice each makes (``mb4d`` or ``mb3d``). Each step considers the paper's
three actions:

1. ``drop``: turn the least important kept slot into identity (a stage keeps at least one);
2. ``mb3d_to_mb4d``: turn the first Meta3D block (stage 4) into a Meta4D block;
3. ``shrink``: narrow the least important stage by 16 channels (down to 16);

(for drop and shrink, the least important one whose change saves time on the table);

prices each by the latency it saves (from the table: the architecture's predicted latency
before minus after) and the importance it loses (an `Importance` oracle), and takes the one
losing the least importance per millisecond saved (ties: the order above). It stops at the
first architecture whose predicted latency is at most the target.

Choices the paper leaves open (documented in ``docs/slim.md``; the defaults):

- **Start**: the supernet with every slot kept; a slot's choice is whichever of mb4d / mb3d
  has the larger probability, except that Meta3D blocks must be the last blocks of stage 4:
  only the trailing run of stage-4 slots preferring mb3d stays mb3d (everything else is mb4d).
- **Importance** (`AlphaImportance`): a slot's importance is ``p_mb4d / p_identity`` in
  stages 1-2 and ``(p_mb3d + p_mb4d) / p_identity`` in stages 3-4 (the paper's), with ``p``
  its ``softmax(alpha)``. Dropping a slot loses its importance; turning its mb3d into mb4d
  loses the share of it that prefers attention, ``I * max(0, p_mb3d - p_mb4d) / (p_mb3d +
  p_mb4d)``; shrinking stage j loses ``16 / width_j`` of the stage's summed importance. The
  least important stage is the one whose kept slots have the lowest mean importance.
- **Latency**: the table's prediction (calibrated when the table has a fit; the ranking of
  actions is the same either way, only the stopping point moves).
- **Accuracy proxy** of an architecture (the trajectory's y axis): the importance it keeps,
  the start's total importance minus what every action so far lost.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from zoo.errors import ConfigError, DataError
from zoo.slim.greedy import GreedyResult
from zoo.slim.space import EfficientFormerSpace, FormerArch
from zoo.slim.table import LatencyTable

__all__ = ["SlotArch", "Action", "AlphaImportance", "SearchResult", "slim", "start_arch", "ACTIONS"]

ACTIONS = ("drop", "mb3d_to_mb4d", "shrink")


@dataclass(frozen=True)
class SlotArch:
    """A slimmed EfficientFormer in supernet terms: ``widths`` per stage and ``kept[i]``, the
    ``(slot index, choice)`` pairs stage i keeps, in order (Meta3D ones last in stage 4)."""

    widths: tuple[int, ...]
    kept: tuple[tuple[tuple[int, str], ...], ...]

    def former(self) -> FormerArch:
        return FormerArch(tuple(self.widths), tuple(len(k) for k in self.kept),
                          sum(c == "mb3d" for _, c in self.kept[-1]))

    def to_json(self) -> dict:
        return {"widths": list(self.widths), "kept": [[[j, c] for j, c in k] for k in self.kept]}

    @classmethod
    def from_json(cls, obj: dict) -> "SlotArch":
        return cls(tuple(obj["widths"]), tuple(tuple((int(j), str(c)) for j, c in k) for k in obj["kept"]))


@dataclass(frozen=True)
class Action:
    kind: str
    stage: int
    slot: int | None = None  # drop and mb3d_to_mb4d: which supernet slot

    def apply(self, arch: SlotArch, step: int = 16) -> SlotArch:
        kept = [list(k) for k in arch.kept]
        widths = list(arch.widths)
        if self.kind == "drop":
            kept[self.stage] = [(j, c) for j, c in kept[self.stage] if j != self.slot]
        elif self.kind == "mb3d_to_mb4d":
            kept[self.stage] = [(j, "mb4d" if j == self.slot else c) for j, c in kept[self.stage]]
        else:
            widths[self.stage] -= step
        return SlotArch(tuple(widths), tuple(tuple(k) for k in kept))

    def describe(self) -> str:
        if self.kind == "shrink":
            return f"shrink stage {self.stage + 1} by 16"
        return f"{self.kind} stage {self.stage + 1} slot {self.slot}"


class AlphaImportance:
    """The paper's importance from the supernet's softmaxed alphas (module docstring).

    probabilities: per stage, per slot, ``{choice: p}`` (`EfficientFormerSupernet.probabilities`
    regrouped by stage, see `from_supernet`)."""

    def __init__(self, probabilities: Sequence[Sequence[dict[str, float]]]):
        self.p = [[dict(s) for s in stage] for stage in probabilities]

    @classmethod
    def from_supernet(cls, supernet) -> "AlphaImportance":
        probs = supernet.probabilities()
        out, k = [], 0
        for depth in supernet.depths:
            out.append(probs[k: k + depth])
            k += depth
        return cls(out)

    def slot(self, stage: int, slot: int) -> float:
        p = self.p[stage][slot]
        keep = p.get("mb4d", 0.0) + (p.get("mb3d", 0.0) if stage >= 2 else 0.0)
        return keep / max(p["identity"], 1e-12)

    def stage_mean(self, arch: SlotArch, stage: int) -> float:
        kept = arch.kept[stage]
        return sum(self.slot(stage, j) for j, _ in kept) / max(len(kept), 1)

    def lost(self, arch: SlotArch, action: Action) -> float:
        """Importance lost by taking `action` from `arch`."""
        if action.kind == "drop":
            return self.slot(action.stage, action.slot)
        if action.kind == "mb3d_to_mb4d":
            p = self.p[action.stage][action.slot]
            both = p.get("mb3d", 0.0) + p.get("mb4d", 0.0)
            return self.slot(action.stage, action.slot) * max(0.0, p.get("mb3d", 0.0) - p.get("mb4d", 0.0)) / max(both, 1e-12)
        total = sum(self.slot(action.stage, j) for j, _ in arch.kept[action.stage])
        return total * 16 / arch.widths[action.stage]

    def after(self, kept: float, lost: float, new: SlotArch) -> float:
        """The accuracy proxy after an action that lost `lost` and led to `new`."""
        return kept - lost

    def kept(self, arch: SlotArch) -> float:
        """The summed importance of the slots `arch` keeps (the search's starting proxy)."""
        return sum(self.slot(i, j) for i, k in enumerate(arch.kept) for j, _ in k)



def start_arch(importance: AlphaImportance, widths: Sequence[int]) -> SlotArch:
    """The search's starting point (module docstring): every slot kept."""
    kept = []
    for i, stage in enumerate(importance.p):
        prefers3 = [i == 3 and p.get("mb3d", 0.0) > p.get("mb4d", 0.0) for p in stage]
        trailing = 0
        while trailing < len(stage) and prefers3[len(stage) - 1 - trailing]:
            trailing += 1
        kept.append(tuple((j, "mb3d" if j >= len(stage) - trailing else "mb4d") for j in range(len(stage))))
    return SlotArch(tuple(widths), tuple(kept))


class SearchResult(GreedyResult):
    """`GreedyResult` of an EfficientFormer search (``arch`` a `SlotArch`), with the
    EfficientFormer architecture it names."""

    def to_json(self) -> dict:
        return {**super().to_json(), "former": self.arch.former().to_json()}


def candidate_actions(arch: SlotArch, importance: AlphaImportance, step: int = 16,
                      saves: Callable[[Action], bool] | None = None) -> list[Action]:
    """The three actions available from `arch`, in tie-break order. With `saves` (whether an
    action lowers the predicted latency), drop and shrink take the least important slot or
    stage *whose change saves time*: on a measured table a narrower or shallower variant is
    not always faster (noise, or kernels that favour some widths), and the paper's search
    would otherwise stop short of the target."""
    out = []
    slots = sorted((importance.slot(i, j), i, j) for i, k in enumerate(arch.kept) if len(k) > 1 for j, _ in k)
    for _, i, j in slots:
        a = Action("drop", i, j)
        if saves is None or saves(a):
            out.append(a)
            break
    for j, c in arch.kept[-1]:
        if c == "mb3d":
            out.append(Action("mb3d_to_mb4d", len(arch.kept) - 1, j))
            break
    stages = sorted((importance.stage_mean(arch, i), i) for i in range(len(arch.widths))
                    if arch.widths[i] - step >= step)
    for _, i in stages:
        a = Action("shrink", i)
        if saves is None or saves(a):
            out.append(a)
            break
    return out


def slim(space: EfficientFormerSpace, table: LatencyTable, importance: AlphaImportance, start: SlotArch,
         target_ms: float, calibrated: bool = True, max_steps: int = 10000,
         on_step: Callable[[dict], None] | None = None) -> SearchResult:
    """Greedy slimming from `start` until the table predicts at most `target_ms` (module docstring)."""
    if target_ms <= 0:
        raise ConfigError(f"the target latency must be positive (got {target_ms} ms).")
    if table.family != space.family:
        raise DataError(f"{table.where} holds {table.family} blocks; this search slims {space.family}.")
    table.check_covers(space.all_keys())

    def latency(a: SlotArch) -> float:
        return table.predict(space.keys(a.former()), calibrated=calibrated)

    arch, ms = start, latency(start)
    kept = importance.kept(arch)
    trajectory = [_record(0, None, arch, ms, kept, 0.0, 0.0, None)]
    if on_step:
        on_step(trajectory[-1])
    for step in range(1, max_steps + 1):
        if ms <= target_ms:
            break
        best = None
        saves = lambda a, arch=arch, ms=ms: latency(a.apply(arch, space.step)) < ms  # noqa: E731
        for order, action in enumerate(candidate_actions(arch, importance, space.step, saves)):
            new = action.apply(arch, space.step)
            new_ms = latency(new)
            saved = ms - new_ms
            if saved <= 0:
                continue
            lost = importance.lost(arch, action)
            key = (lost / saved, order)
            if best is None or key < best[0]:
                best = (key, action, new, new_ms, lost, saved)
        if best is None:
            raise DataError(f"slimming cannot go below {ms:.4g} ms (target {target_ms:.4g} ms): no action saves time on "
                            f"this table (every stage at one block of {space.step} channels, or a table whose "
                            "smaller blocks are not faster). Choose a higher target or re-measure the table.")
        (score, _), action, arch, ms, lost, saved = best
        kept = importance.after(kept, lost, arch)
        trajectory.append(_record(step, action, arch, ms, kept, lost, saved, score))
        if on_step:
            on_step(trajectory[-1])
    return SearchResult(arch, ms, target_ms, trajectory)


def _record(step, action, arch, ms, kept, lost, saved, score) -> dict:
    return {"step": step, "action": action.describe() if action else "start",
            "kind": action.kind if action else None, "predicted_ms": ms, "importance": kept,
            "importance_lost": lost, "ms_saved": saved, "score": score, "arch": arch.to_json(),
            "former": arch.former().to_json()}


def trajectory_png(path: str | Path, result: SearchResult, title: str = "", ylabel: str = "importance kept") -> Path:
    """The accuracy proxy (`ylabel`: what the importance oracle measures) against predicted
    latency, one point per step."""
    from zoo.data.charts import xy_chart

    xs = [t["predicted_ms"] for t in result.trajectory]
    ys = [t["importance"] for t in result.trajectory]
    return xy_chart(path, {"slimming": (xs, ys)}, title=title or f"slimming to {result.target_ms:g} ms",
                    xlabel="predicted latency (ms)", ylabel=ylabel, vline=result.target_ms)
