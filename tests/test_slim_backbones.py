"""Latency-driven slimming of EfficientViT and EfficientFormerV2: their spaces, weight
inheritance, the greedy search (with a fixed table and a fixed oracle) and `zoo slim`.

No test asserts on a measured time: tables measured here only have to exist and be used
consistently; the search is tested on hand-made tables."""
from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from zoo.cli import main
from zoo.errors import ConfigError, DataError
from zoo.slim.greedy import MES, greedy_slim, latency_floor
from zoo.slim.inherit import inherit_state
from zoo.slim.space_v2 import EfficientFormerV2Space, V2Arch
from zoo.slim.space_vit import EfficientVitSpace, VitArch
from zoo.slim.table import Entry, LatencyTable

VIT = dict(img_size=32, max_widths=(32, 48, 64), max_depths=(1, 2, 2), max_heads=(2, 3, 4), num_classes=3)
V2 = dict(img_size=64, max_widths=(16, 24, 32, 48), max_depths=(1, 2, 3, 3), max_vit=2, num_classes=3)
SPACES = {"efficientvit": lambda: EfficientVitSpace(**VIT), "efficientformerv2": lambda: EfficientFormerV2Space(**V2)}


def formula_table(space) -> LatencyTable:
    """A fixed table: each block's time from its size, attention dearer than convolution."""
    entries = {}
    for key in space.all_keys():
        kind, f = space.parse_key(key)
        c, r = f["c"], f["r"]
        ms = 1e-5 * c * r * r * (f.get("e", 2) + 4 * (kind in ("attn", "blk")) + f.get("h", 0)) + 1e-5 * f.get("i", 0) * c
        entries[key] = Entry(round(ms + 0.01, 6), round(ms * 1.1 + 0.01, 6), 10)
    return LatencyTable(space.family, entries, {"device": "test", "os": "test", "runtime": "formula",
                                                 "backend": "torch", "threads": 1, "space": space.describe()})


def walk(space, rng: random.Random, steps: int = 200):
    """Architectures reached from the full one by random actions."""
    arch, seen = space.full_arch(), []
    for _ in range(steps):
        moves = space.moves(arch)
        if not moves:
            break
        arch = rng.choice(moves).arch
        seen.append(arch)
    return seen


@pytest.mark.parametrize("family", sorted(SPACES))
def test_every_architecture_builds_runs_and_its_keys_are_covered(family):
    space = SPACES[family]()
    every = set(space.all_keys())
    rng = random.Random(0)
    archs = [space.full_arch(), *(space.random_arch(rng) for _ in range(4)), *walk(space, rng)[::7]]
    for arch in archs:
        keys = space.keys(arch)
        assert set(keys) <= every
        model = space.build(arch).eval()
        assert sum(k.split(".")[0] in ("blk", "ffn", "attn") for k in keys) == sum(arch.depths)
        with torch.no_grad():
            assert model(torch.randn(1, 3, space.img_size, space.img_size)).shape == (1, 3)
    for key in list(every)[::9]:
        block, shape = space.block(key)
        with torch.no_grad():
            assert torch.isfinite(block(torch.randn(shape))).all()


@pytest.mark.parametrize("family", sorted(SPACES))
def test_every_action_leads_to_a_valid_architecture_of_its_kind(family):
    space = SPACES[family]()
    for arch in [space.full_arch(), *walk(space, random.Random(1))]:
        for move in space.moves(arch):
            space.check(move.arch)  # widths on the grid, a block per stage, attention blocks last
            new, old = move.arch, arch
            if move.kind == "drop":
                assert sum(new.depths) == sum(old.depths) - 1
            elif move.kind == "shrink":
                assert new.widths[move.stage] < old.widths[move.stage] and new.widths[move.stage] % space.step == 0
            elif move.kind == "heads":
                assert new.heads[move.stage] < old.heads[move.stage] and new.widths == old.widths
            elif move.kind == "ratio":
                assert sum(new.ratios[move.stage]) == sum(old.ratios[move.stage]) - 1
            else:
                assert move.kind == "fewer_vit" and new.num_vit == old.num_vit - 1


def test_bad_architectures_and_spaces_are_config_errors():
    vit, v2 = EfficientVitSpace(**VIT), EfficientFormerV2Space(**V2)
    with pytest.raises(ConfigError, match="divisible"):
        vit.check(VitArch((32, 32, 64), (2, 3, 4), ((0,), (0,), (0,))))
    with pytest.raises(ConfigError, match="blocks"):
        vit.check(VitArch((32, 48, 64), (2, 3, 4), ((0,), (), (0,))))
    with pytest.raises(ConfigError, match="multiple of 8"):
        v2.check(V2Arch((16, 20, 32, 48), ((0,), (0,), (0,), (0,)), ((4,), (4,), (4,), (4,)), 0))
    with pytest.raises(ConfigError, match="attention blocks"):  # an attention block from an FFN-only one
        v2.check(V2Arch((16, 24, 32, 48), ((0,), (0,), (0,), (1,)), ((4,), (4,), (4,), (4,)), 1))
    with pytest.raises(ConfigError, match="heads"):
        EfficientVitSpace(img_size=32, max_widths=(48, 48, 48), max_depths=(1, 1, 1), max_heads=(5, 1, 1))
    with pytest.raises(ConfigError, match="multiple of 32"):
        EfficientFormerV2Space(img_size=48)


@pytest.mark.parametrize("family", sorted(SPACES))
def test_a_slimmed_network_inherits_the_full_networks_weights(family):
    space = SPACES[family]()
    torch.manual_seed(0)
    full = space.build(space.full_arch()).eval()
    state = full.state_dict()
    same = space.build(space.full_arch()).eval()
    same.load_state_dict(inherit_state(state, same.state_dict(), space.block_map(space.full_arch())))
    x = torch.randn(2, 3, space.img_size, space.img_size)
    with torch.no_grad():
        torch.testing.assert_close(same(x), full(x))
    # a dropped block: the later blocks keep their own weights
    drop = next(m for m in space.moves(space.full_arch()) if m.kind == "drop")
    sub = space.build(drop.arch)
    got = inherit_state(state, sub.state_dict(), space.block_map(drop.arch))
    stage = drop.stage
    for k, j in enumerate(drop.arch.blocks[stage]):
        for name, v in got.items():
            prefix = f"stages.{stage}.blocks.{k}."
            if name.startswith(prefix):
                src = state[f"stages.{stage}.blocks.{j}." + name[len(prefix):]]
                assert torch.equal(v, src[tuple(slice(0, n) for n in v.shape)])
    # a narrower stage takes the leading channels
    shrink = next(m for m in space.moves(space.full_arch()) if m.kind == "shrink")
    got = inherit_state(state, space.build(shrink.arch).state_dict(), space.block_map(shrink.arch))
    key = next(k for k in got if k.startswith(f"stages.{shrink.stage}.") and got[k].dim() == 4
               and got[k].shape[0] < state[k].shape[0])
    assert torch.equal(got[key], state[key][: got[key].shape[0], : got[key].shape[1]])
    with pytest.raises(DataError, match="full network"):
        inherit_state({}, sub.state_dict(), space.block_map(drop.arch))


def test_fewer_heads_inherit_the_overlap_and_keep_their_own_initialisation_elsewhere():
    space = EfficientVitSpace(**VIT)
    full_arch = space.full_arch()
    state = space.build(full_arch).state_dict()
    move = next(m for m in space.moves(full_arch) if m.kind == "heads")
    sub = space.build(move.arch).state_dict()
    got = inherit_state(state, sub, space.block_map(move.arch))
    key = f"stages.{move.stage}.blocks.0.mixer.m.attn.qkvs.0.conv.weight"
    old, new = state[key], got[key]
    assert new.shape[1] > old.shape[1]  # each head now reads more channels
    assert torch.equal(new[: old.shape[0], : old.shape[1]], old[: new.shape[0]])
    assert torch.equal(new[:, old.shape[1]:], sub[key][:, old.shape[1]:])


@pytest.mark.parametrize("family", sorted(SPACES))
def test_the_search_is_deterministic_greedy_and_stops_at_the_first_architecture_under_target(family):
    space = SPACES[family]()
    table = formula_table(space)

    def oracle(arch):  # a fixed importance: what each stage keeps, weighted unevenly
        size = sum((i + 1) * w * d for i, (w, d) in enumerate(zip(arch.widths, arch.depths)))
        extra = sum(arch.heads) if hasattr(arch, "heads") else arch.num_vit * 10 + sum(map(sum, arch.ratios))
        return size / 100 + extra

    full = table.predict(space.keys(space.full_arch()))
    floor = latency_floor(space, table)
    target = floor + 0.4 * (full - floor)
    a = greedy_slim(space, table, oracle, target)
    b = greedy_slim(space, table, oracle, target)
    assert a.to_json() == b.to_json()
    assert a.predicted_ms <= target < a.trajectory[-2]["predicted_ms"]
    assert all(t["predicted_ms"] > target for t in a.trajectory[:-1])
    arch = space.full_arch()
    for step in a.trajectory[1:]:  # each step took the cheapest action by (lost / saved, -saved, order)
        ms = table.predict(space.keys(arch))
        options = []
        for order, m in enumerate(space.moves(arch)):
            new_ms = table.predict(space.keys(m.arch))
            if new_ms < ms:
                lost = max(0.0, oracle(arch) - oracle(m.arch))
                options.append(((lost / (ms - new_ms), -(ms - new_ms), order), m))
        best = min(options, key=lambda o: o[0])[1]
        assert step["action"] == best.describe
        arch = best.arch
        space.check(arch)
    assert arch == a.arch
    # MES prices by efficiency score gained: a different, still valid, search
    m = greedy_slim(space, table, oracle, target, efficiency="mes", mes=MES(params_alpha=1.0))
    assert m.predicted_ms <= target and m.trajectory[-1]["arch"] == m.arch.to_json()
    with pytest.raises(DataError, match="cannot go below"):
        greedy_slim(space, table, oracle, floor * 0.5)
    with pytest.raises(ConfigError, match="efficiency"):
        greedy_slim(space, table, oracle, target, efficiency="flops")


@pytest.mark.parametrize("efficiency", ["ms", "mes"])
def test_refinement_moves_the_stop_along_the_same_trajectory_to_the_measured_target(efficiency):
    """A backend 30% slower than the table: the refined search goes on along the table-only
    search's trajectory to the corrected target; 30% faster: it stops earlier. A correction
    below what the space reaches ends the rounds with what was measured."""
    from zoo.slim.refine import refine

    space = SPACES["efficientformerv2"]()
    table = formula_table(space)

    def oracle(arch):
        return sum((i + 1) * w * d for i, (w, d) in enumerate(zip(arch.widths, arch.depths))) / 100 + arch.num_vit

    def search(target):
        return greedy_slim(space, table, oracle, target, efficiency=efficiency)

    steps = [t["predicted_ms"] for t in search(latency_floor(space, table) * 1.01).trajectory]
    target = (steps[10] + steps[11]) / 2  # between two small steps: no measurement lands within 2% by chance
    first = search(target)
    for slow in (1.3, 0.7):
        def measure(r, slow=slow):
            return slow * r.predicted_ms

        refined = refine(search, measure, target, first=first, tol=0.02, rounds=4)
        corrected = search(target / slow)
        assert refined.rounds[0]["measured_ms"] == pytest.approx(slow * first.predicted_ms)
        assert refined.rounds[1]["table_target_ms"] == pytest.approx(target / slow)
        assert refined.result.arch == corrected.arch != first.arch
        assert refined.measured_ms <= target  # the slowest measured one under the target unless one is within 2%
        longer, shorter = (corrected, first) if slow > 1 else (first, corrected)
        assert longer.trajectory[:len(shorter.trajectory)] == shorter.trajectory
    exact = refine(search, lambda r: r.predicted_ms * target / first.predicted_ms, target, first=first)
    assert len(exact.rounds) == 1 and exact.result is first
    hopeless = refine(search, lambda r: 10 * r.predicted_ms, target, first=first)
    assert "cannot go below" in hopeless.rounds[-1]["next"] and hopeless.measured_ms > target
    assert hopeless.measured_ms == min(r["measured_ms"] for r in hopeless.rounds)
    with pytest.raises(ConfigError, match="at least one"):
        refine(search, lambda r: 1.0, target, rounds=0)
    with pytest.raises(ConfigError, match="tolerance"):
        refine(search, lambda r: 1.0, target, tol=1.5)


def test_the_baseline_of_the_same_measured_latency_is_picked_by_measurement():
    from zoo.slim.measure import closest_measured, measure_network

    space = SPACES["efficientformerv2"]()
    small = V2Arch((8, 8, 8, 8), ((0,), (0,), (0,), (0,)), ((1,), (1,), (1,), (1,)), 0)
    full = space.full_arch()
    ms = measure_network(space, full, "torch", reps=5)
    assert closest_measured(space, [small, full], formula_table(space), ms, reps=5) == full
    assert closest_measured(space, [small, full], formula_table(space), ms / 100, reps=5) == small


def test_the_mes_is_the_papers_product():
    mes = MES(ms_unit=2.0, params_unit=4.0, ms_alpha=0.5, params_alpha=0.25)
    assert mes(2.0, 4.0) == pytest.approx(100.0)
    assert mes(8.0, 4.0) == pytest.approx(50.0)
    assert mes(2.0, 64.0) == pytest.approx(50.0)


def test_a_table_of_one_family_is_refused_by_another():
    table = formula_table(EfficientVitSpace(**VIT))
    with pytest.raises(DataError, match="efficientvit"):
        greedy_slim(EfficientFormerV2Space(**V2), table, lambda a: 0.0, 1.0)
    with pytest.raises(DataError, match="not a block of this family"):
        LatencyTable("efficientformerv2", dict(table.entries), table.provenance)


@pytest.mark.parametrize("family,flags", [
    ("efficientvit", ["--img-size", "32", "--max-widths", "32", "48", "64", "--max-depths", "1", "2", "2",
                      "--max-heads", "2", "3", "4"]),
    ("efficientformerv2", ["--img-size", "64", "--max-widths", "16", "24", "32", "48", "--max-depths", "1", "2", "2",
                           "2", "--max-vit", "1"]),
])
def test_zoo_latency_table_and_slim_for_the_family(tmp_path, capsys, family, flags):
    from zoo.data.patterns import make_pattern_folder

    size = int(flags[1])
    data = make_pattern_folder(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=3, size=size)
    lut = tmp_path / "lut.json"
    assert main(["latency-table", "--family", family, *flags, "--num-classes", "3", "--reps", "3", "--warmup", "1",
                 "--out", str(lut), "--quiet"]) == 0
    table = LatencyTable.load(lut)
    space = SPACES[family]().__class__(**table.provenance["space"])
    assert table.family == family and set(space.all_keys()) == set(table.entries)
    full, floor = table.predict(space.keys(space.full_arch())), latency_floor(space, table)
    assert main(["slim", "--family", family, "--target-ms", "0.0001", "--lut", str(lut), "--data-dir", str(data),
                 "--out", str(tmp_path / "no")]) == 2
    assert "no architecture" in capsys.readouterr().err and not (tmp_path / "no" / "full").exists()
    target = floor + 0.5 * (full - floor)
    out = tmp_path / "slim"
    assert main(["slim", "--family", family, "--target-ms", f"{target:.5f}", "--lut", str(lut), "--data-dir",
                 str(data), "--out", str(out), "--supernet-epochs", "1", "--batch-size", "6", "--workers", "0",
                 "--name", f"{family}_slim_test", "--measure-reps", "3", "--refine-rounds", "2",
                 "--efficiency", "mes"]) == 0
    cfg = yaml.safe_load((out / f"{family}_slim_test.yaml").read_text())
    refinement = cfg["search"]["refinement"]  # the found network measured, the search corrected at most once
    picked = [r for r in refinement["rounds"] if r["measured_ms"] == refinement["measured_ms"]]
    assert 1 <= len(refinement["rounds"]) <= 2 and len(picked) == 1
    assert cfg["latency"]["measured_ms"] == round(refinement["measured_ms"], 5)
    assert cfg["latency"]["predicted_ms"] == round(picked[0]["predicted_ms"], 5)
    assert picked[0]["predicted_ms"] <= picked[0]["table_target_ms"]
    assert refinement["rounds"][0]["table_target_ms"] == pytest.approx(float(f"{target:.5f}"))
    assert cfg["base"] == space.base_model
    assert cfg["search"]["efficiency"] == "mes" and cfg["latency"]["table_provenance"]
    traj = json.loads((out / "trajectory.json").read_text())
    arch = type(space.full_arch()).from_json(traj["arch"])
    assert space.to_config(arch).items() <= {**cfg["config"]}.items() and traj["arch"] == picked[0]["arch"]
    capsys.readouterr()
    assert main(["info", "--model-config", str(out / f"{family}_slim_test.yaml")]) == 0
    assert "latency_predicted_ms" in json.loads(capsys.readouterr().out)["metrics"]
    from zoo.registry import create_model

    model = create_model(f"{family}_slim_test", pretrained=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 3)
    assert main(["slim", "--family", family, "--target-ms", "1", "--lut", str(lut), "--data-dir", str(data),
                 "--out", str(tmp_path / "alpha"), "--importance", "alpha"]) == 2
    assert "supernet of paths" in capsys.readouterr().err
