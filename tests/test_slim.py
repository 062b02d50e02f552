"""Latency-driven slimming: tables, the supernet, the search, model-config files, the commands.

Nothing here asserts on a measured time: tables measured in tests only have to exist, be
positive and be used consistently; the search is tested on hand-made tables."""
from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pytest
import torch
import yaml

import zoo
from zoo.cli import main
from zoo.errors import ConfigError, DataError
from zoo.models.efficientformer_supernet import EfficientFormerSupernet
from zoo.registry import create_model, register_model_config
from zoo.slim.search import Action, AlphaImportance, SlotArch, candidate_actions, slim, start_arch
from zoo.slim.space import EfficientFormerSpace, FormerArch
from zoo.slim.table import Entry, LatencyTable

TINY = dict(img_size=32, max_widths=(32, 32, 48, 64), max_depths=(2, 2, 3, 3), num_classes=3)


def synthetic_table(space: EfficientFormerSpace) -> LatencyTable:
    """A fixed table: each block's time from its size (MAC-like), attention dearer than pooling."""
    entries = {}
    for key in space.all_keys():
        kind, f = space.parse_key(key)
        c, r = f["c"], f["r"]
        ms = {"stem": 1e-4 * c * r, "down": 2e-5 * f.get("i", 1) * c * r / 2, "mb4d": 3e-5 * c * r * r,
              "flat": 0.01, "mb3d": 8e-5 * c * r * r + 0.05, "head": 0.02}[kind]
        entries[key] = Entry(round(ms + 0.01, 6), round(ms * 1.1 + 0.01, 6), 10)
    return LatencyTable(space.family, entries, {"device": "test", "os": "test", "runtime": "formula",
                                                 "backend": "torch", "threads": 1, "space": space.describe()})


def random_importance(space: EfficientFormerSpace, seed: int = 0) -> AlphaImportance:
    rng = np.random.default_rng(seed)
    probs = []
    for i, depth in enumerate(space.max_depths):
        stage = []
        for _ in range(depth):
            names = ("mb4d", "identity") if i < 2 else ("mb4d", "mb3d", "identity")
            p = rng.dirichlet(np.ones(len(names)))
            stage.append(dict(zip(names, p.tolist())))
        probs.append(stage)
    return AlphaImportance(probs)


# --- keys and the space --------------------------------------------------------------------


def test_an_architectures_keys_name_every_block_it_runs_and_the_space_covers_them():
    space = EfficientFormerSpace(**TINY)
    arch = FormerArch((16, 32, 48, 64), (1, 2, 3, 3), 2)
    keys = space.keys(arch)
    assert keys[0] == "stem.i3.c16.r32" and keys[-1] == "head.c64.r1.t1.n3"
    assert keys.count("mb3d.c64.r1.e4") == 2 and keys.count("mb4d.c64.r1.e4") == 1 and "flat.c64.r1" in keys
    assert "down.i16.c32.r8" in keys  # stage 2's downsampling sees stage 1's 8x8 grid
    model = space.build(arch)
    blocks = [m for s in model.stages for m in s.blocks]
    assert len([k for k in keys if k.startswith(("mb4d", "mb3d", "flat"))]) == len(blocks)
    everything = set(space.all_keys())
    rng = random.Random(0)
    for _ in range(20):
        a = space.random_arch(rng)
        assert set(space.keys(a)) <= everything
    with pytest.raises(ConfigError, match="multiple of 16"):
        space.keys(FormerArch((24, 32, 48, 64), (1, 1, 1, 1), 0))
    with pytest.raises(ConfigError, match="blocks"):
        space.keys(FormerArch((16, 32, 48, 64), (0, 1, 1, 1), 0))


def test_every_block_runs_in_its_deploy_form_on_its_shape():
    space = EfficientFormerSpace(**TINY)
    for key in ("stem.i3.c32.r32", "down.i32.c48.r4", "mb4d.c48.r2.e4", "mb3d.c64.r1.e4", "head.c64.r1.t1.n3"):
        module, shape = space.block(key)
        y = module(torch.randn(shape))
        assert torch.isfinite(y).all()
    module, _ = space.block("mb4d.c32.r8.e4")
    assert module[0].deployed  # folded, as zoo export writes it


# --- tables --------------------------------------------------------------------------------


def test_a_table_round_trips_and_names_what_it_lacks(tmp_path):
    space = EfficientFormerSpace(**TINY)
    table = synthetic_table(space)
    path = table.save(tmp_path / "lut.json")
    again = LatencyTable.load(path)
    assert again.entries == table.entries and again.provenance == table.provenance
    arch = FormerArch((16, 32, 48, 64), (1, 2, 3, 3), 1)
    assert again.predict(space.keys(arch)) == pytest.approx(sum(table.ms(k) for k in space.keys(arch)))
    again.overhead_ms = 0.002  # every block's time carries one empty call; the network pays it once
    keys = space.keys(arch)
    assert again.predict(keys) == pytest.approx(sum(table.ms(k) for k in keys) - 0.002 * (len(keys) - 1))
    assert LatencyTable.load(again.save(tmp_path / "lut2.json")).overhead_ms == 0.002
    again.calibration = {"a": 2.0, "b": 0.5}
    assert again.predict(space.keys(arch)) == pytest.approx(2 * again.predict(space.keys(arch), False) + 0.5)
    del again.entries["mb4d.c48.r2.e4"]
    with pytest.raises(DataError, match="mb4d.c48.r2.e4.*zoo latency-table"):
        again.check_covers(space.all_keys())
    assert json.loads(path.read_text())["format"] == "zoo-latency-table/1"
    (tmp_path / "pickle.json").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(DataError, match="not JSON"):
        LatencyTable.load(tmp_path / "pickle.json")


DEVICE_CSV = """device,iPhone 12
os,iOS 17.5
runtime,CoreML 7 (compute units ALL)
family,efficientformer
img_size,32
key,median_ms,p90_ms,n
{rows}
"""


def test_a_device_csv_imports_with_its_provenance_and_bad_ones_are_refused(tmp_path):
    space = EfficientFormerSpace(**TINY)
    rows = "\n".join(f"{k},{e.median_ms},{e.p90_ms},{e.n}" for k, e in synthetic_table(space).entries.items())
    good = tmp_path / "phone.csv"
    good.write_text(DEVICE_CSV.format(rows=rows))
    table = LatencyTable.import_device_file(good)
    assert table.provenance["device"] == "iPhone 12" and table.provenance["runtime"].startswith("CoreML 7")
    assert table.provenance["source"] == "imported from phone.csv" and table.provenance["img_size"] == 32
    table.check_covers(space.all_keys())

    bad = tmp_path / "bad.csv"
    for text, match in [
        (DEVICE_CSV.format(rows=rows.replace(",0.", ",-0.", 1)), "finite and >= 0"),
        (DEVICE_CSV.format(rows=rows + "\nfused_mbconv.c32.r8.e4,0.1,0.1,5"), "not a block of this family"),
        (DEVICE_CSV.format(rows=rows).replace("device,iPhone 12\n", ""), "device"),
        (DEVICE_CSV.format(rows=rows + "\nstem.i3.c16.r32,0.1,0.1,5"), "twice"),
    ]:
        bad.write_text(text)
        out = tmp_path / "lut.json"
        assert main(["latency-table", "--import", str(bad), "--out", str(out)]) == 2
        assert not out.exists()  # nothing written on failure
        with pytest.raises(DataError, match=match):
            LatencyTable.import_device_file(bad)
    with pytest.raises(DataError, match="not efficientformerv2"):
        LatencyTable.import_device_file(good, family="efficientformerv2")


def test_a_measured_table_covers_the_space_on_torch_and_onnxruntime():
    pytest.importorskip("onnxruntime")
    from zoo.slim.measure import measure_blocks, measure_table

    space = EfficientFormerSpace(img_size=32, max_widths=(16, 16, 16, 32), max_depths=(1, 1, 1, 2), num_classes=3)
    table = measure_table(space, "torch", threads=1, warmup=1, reps=3, progress=False)
    assert set(table.entries) == set(space.all_keys())
    assert all(e.median_ms > 0 and e.p90_ms >= e.median_ms and e.n == 3 for e in table.entries.values())
    assert table.provenance["backend"] == "torch" and table.provenance["threads"] == 1
    assert 0 < table.overhead_ms < min(e.median_ms for k, e in table.entries.items() if k.startswith("mb4d"))
    assert table.provenance["chain"] == 4  # Meta4D/3D blocks timed as chains of 4 (weights not cache-hot)
    assert table.provenance["space"]["max_widths"] == [16, 16, 16, 32]
    keys = ["mb4d.c16.r8.e4", "mb3d.c32.r1.e4", "flat.c32.r1"]
    ort = measure_blocks(space, keys, "onnxruntime", threads=1, warmup=1, reps=3, progress=False)
    assert set(ort) == set(keys) and all(e.median_ms > 0 for e in ort.values())


def test_the_additivity_report_fits_its_line_and_predicts_left_out_architectures():
    from zoo.slim.additivity import additivity_report, fit_line, format_report

    space = EfficientFormerSpace(img_size=32, max_widths=(16, 16, 16, 32), max_depths=(1, 1, 1, 2), num_classes=3)
    table = synthetic_table(space)  # a formula table: the fit has real work to do
    report = additivity_report(space, table, num_archs=4, reps=3, warmup=1)
    rows = report["rows"]
    measured = np.array([r["measured_ms"] for r in rows])
    summed = np.array([r["table_sum_ms"] for r in rows])
    assert (report["a"], report["b"]) == pytest.approx(fit_line(summed, measured))
    for i, r in enumerate(rows):  # leave-one-out: the line through the other three
        keep = np.arange(len(rows)) != i
        a, b = np.polyfit(summed[keep], measured[keep], 1)
        assert r["calibrated_ms"] == pytest.approx(a * summed[i] + b)
        assert r["raw_error"] == pytest.approx(summed[i] / measured[i] - 1)
    assert table.calibration["a"] == report["a"] and table.calibration["fitted_on"] == 4
    assert "Spearman" in format_report(report)


# --- the supernet --------------------------------------------------------------------------


def tiny_supernet(**kw) -> EfficientFormerSupernet:
    torch.manual_seed(0)
    return EfficientFormerSupernet(img_size=32, num_classes=3, depths=(2, 2, 3, 3), embed_dims=(32, 32, 48, 64), **kw)


def test_alphas_get_gradients_and_a_low_temperature_makes_the_mixture_one_hot():
    net = tiny_supernet(tau_steps=4)
    net.train()
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in net.arch_parameters())
    assert "stages.0.blocks.0.alpha" in net.state_dict() and int(net.num_updates) == 1
    alpha = torch.tensor([0.3, 0.2, 0.1])
    w = net.mixture_weights(alpha, 1e-3, noisy=False)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.0]), rtol=0, atol=1e-30)
    torch.manual_seed(1)
    noisy = [net.mixture_weights(alpha, 1e-3, noisy=True).argmax().item() for _ in range(50)]
    assert len(set(noisy)) > 1  # the noise explores: one-hot, but not always on the same path
    assert net.temperature() == pytest.approx(5.0 * (0.5 / 5.0) ** 0.25)
    net.num_updates.fill_(10)
    assert net.temperature() == pytest.approx(0.5)
    lin = tiny_supernet(tau_steps=4, tau_schedule="linear")
    lin.num_updates.fill_(2)
    assert lin.temperature() == pytest.approx(2.75)
    with pytest.raises(ConfigError, match="noise"):
        tiny_supernet(noise="normal")


def test_a_path_made_useless_ends_with_the_lowest_importance():
    class Harmful(torch.nn.Module):
        def forward(self, x):
            return x + 10 * torch.randn_like(x)

    # stage 2 (index 1), so the slot competes with slots of its own baseline: with three choices
    # a stage-3/4 slot starts at (1/3 + 1/3) / (1/3) = 2, a two-choice one at 1
    net = tiny_supernet(noise="none", tau_steps=0, tau_start=1.0, tau_end=1.0)
    net.stages[1].blocks[1].choices["mb4d"] = Harmful()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0].mean(dim=(1, 2)) > 0).long()
    net.train()
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    imp = AlphaImportance.from_supernet(net)
    scores = {(i, j): imp.slot(i, j) for i, d in enumerate(net.depths) for j in range(d)}
    assert min(scores, key=scores.get) == (1, 1), scores


def test_a_slimmed_subnet_inherits_the_supernets_function():
    net = tiny_supernet().eval()
    # one-hot alphas: stages keep every slot as mb4d, stage 4's last two as mb3d
    with torch.no_grad():
        for i, j, p in net.slots():
            choice = "mb3d" if i == 3 and j >= 1 else "mb4d"
            p.alpha.copy_(torch.tensor([60.0 if n == choice else -60.0 for n in p.names]))
    net.tau_override = 1.0
    kept = [[(j, "mb3d" if i == 3 and j >= 1 else "mb4d") for j in range(d)] for i, d in enumerate(net.depths)]
    sub = net.extract(net.embed_dims, kept)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert sub.num_vit == 2
        torch.testing.assert_close(sub(x), net(x), rtol=1e-5, atol=1e-5)
    narrow = net.extract((16, 32, 32, 48), [[(1, "mb4d")], [(0, "mb4d")], [(0, "mb4d"), (2, "mb4d")], [(2, "mb3d")]])
    assert narrow.num_vit == 1 and narrow(x).shape == (2, 3)
    w = net.stages[3].blocks[2].choices["mb3d"].block.mlp.fc1.weight
    torch.testing.assert_close(narrow.stages[3].blocks[1].mlp.fc1.weight, w[: 48 * 4, :48])  # after Flat
    with pytest.raises(ConfigError, match="last ones of stage 4"):
        net.extract(net.embed_dims, [[(0, "mb4d")], [(0, "mb4d")], [(0, "mb3d")], [(0, "mb4d")]])
    with pytest.raises(ConfigError, match="not deployed"):
        net.reparameterize()


# --- the search ----------------------------------------------------------------------------


def test_the_search_is_deterministic_greedy_and_stops_at_the_first_architecture_under_target():
    space = EfficientFormerSpace(**TINY)
    table = synthetic_table(space)
    imp = random_importance(space, seed=3)
    start = start_arch(imp, space.max_widths)
    full = table.predict(space.keys(start.former()))
    target = 0.45 * full
    result = slim(space, table, imp, start, target)
    again = slim(space, table, imp, start, target)
    assert again.trajectory == result.trajectory
    traj = result.trajectory
    assert [t["predicted_ms"] > target for t in traj[:-1]] == [True] * (len(traj) - 1)
    assert traj[-1]["predicted_ms"] <= target == result.target_ms
    kinds = set()
    for before, after in zip(traj, traj[1:]):
        arch = SlotArch.from_json(before["arch"])
        ms = lambda a: table.predict(space.keys(a.apply(arch).former()))  # noqa: E731
        cands = candidate_actions(arch, imp, saves=lambda a: ms(a) < before["predicted_ms"])
        best = min((imp.lost(arch, a) / (before["predicted_ms"] - ms(a)), k, a) for k, a in enumerate(cands))
        assert SlotArch.from_json(after["arch"]) == best[2].apply(arch)  # the best-scoring action
        assert after["score"] == pytest.approx(best[0])
        kinds.add(after["kind"])
    assert kinds >= {"drop", "shrink"}
    for t in traj:  # every visited architecture is valid and builds
        arch = SlotArch.from_json(t["arch"])
        former = arch.former()
        assert all(w % 16 == 0 and w >= 16 for w in former.widths) and min(former.depths) >= 1
        assert all(c == "mb4d" for k in arch.kept[:3] for _, c in k)
        choices = [c for _, c in arch.kept[3]]
        assert choices == sorted(choices, key=lambda c: c == "mb3d")  # Meta3D only at the end of stage 4
        assert space.build(former).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(DataError, match="cannot go below"):
        slim(space, table, imp, start, 1e-6)


def test_the_first_mb3d_turns_into_mb4d_when_attention_is_what_costs():
    space = EfficientFormerSpace(**TINY)
    table = synthetic_table(space)
    for k in table.entries:
        if k.startswith("mb3d"):
            table.entries[k] = Entry(50.0, 50.0, 1)  # attention dominates the latency
    probs = [[{"mb4d": 0.8, "identity": 0.2}] * d for d in space.max_depths[:2]]
    probs += [[{"mb4d": 0.4, "mb3d": 0.4, "identity": 0.2}] * space.max_depths[2]]
    probs += [[{"mb4d": 0.3, "mb3d": 0.6, "identity": 0.1}] * space.max_depths[3]]
    imp = AlphaImportance(probs)
    start = start_arch(imp, space.max_widths)
    assert [c for _, c in start.kept[3]] == ["mb3d"] * 3
    result = slim(space, table, imp, start, table.predict(space.keys(start.former())) - 60)
    assert result.trajectory[1]["kind"] == "mb3d_to_mb4d" and result.trajectory[1]["action"].endswith("slot 0")


# --- model-config files and the commands ---------------------------------------------------


def test_a_model_config_registers_an_architecture_with_its_table_provenance(tmp_path):
    cfg = {"name": "efficientformer_test_slim", "base": "efficientformer_l1",
           "config": {"embed_dims": [16, 32, 48, 64], "depths": [1, 1, 2, 2], "num_vit": 1, "img_size": 32,
                      "num_classes": 3},
           "latency": {"predicted_ms": 1.5, "target_ms": 1.6, "table": "phone.json",
                       "table_provenance": "device, iPhone 12, iOS 17.5, CoreML 7 (imported from phone.csv)"}}
    path = tmp_path / "slim.yaml"
    path.write_text(yaml.safe_dump(cfg))
    name = register_model_config(path)
    model = create_model(name)
    assert model.num_vit == 1 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    card = zoo.model_card(name)
    assert card.input.shape == (3, 32, 32)
    assert "iPhone 12" in card.metrics["latency_predicted_ms"].dataset
    assert register_model_config(path) == name  # again: replaced, not a clash
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "name": "efficientformer_l1"}))
    with pytest.raises(ConfigError, match="built-in"):
        register_model_config(bad)
    bad.write_text(yaml.safe_dump({**cfg, "config": {"widths": [1]}}))
    with pytest.raises(ConfigError, match="does not take"):
        register_model_config(bad)


def test_latency_table_slim_and_the_slimmed_model_through_every_command(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from zoo.data.patterns import make_pattern_folder

    data = make_pattern_folder(tmp_path / "data", num_classes=3, train_per_class=8, val_per_class=4, size=32)
    lut = tmp_path / "lut.json"
    assert main(["latency-table", "--img-size", "32", "--num-classes", "3", "--max-widths", "32", "32", "32", "48",
                 "--max-depths", "1", "2", "2", "2", "--reps", "3", "--warmup", "1", "--out", str(lut), "--quiet",
                 "--report", "--archs", "3", "--report-reps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Spearman" in printed and json.loads(lut.read_text())["calibration"]["fitted_on"] == 3
    space = EfficientFormerSpace(32, (32, 32, 32, 48), (1, 2, 2, 2), num_classes=3)
    table = LatencyTable.load(lut)
    full = table.predict(space.keys(FormerArch((32, 32, 32, 48), (1, 2, 2, 2), 0)))
    smallest = table.predict(space.keys(FormerArch((16, 16, 16, 16), (1, 1, 1, 1), 0)))
    target = smallest + 0.5 * (full - smallest)
    out = tmp_path / "slim"
    assert main(["slim", "--target-ms", f"{target:.4f}", "--lut", str(lut), "--data-dir", str(data),
                 "--out", str(out), "--supernet-epochs", "1", "--finetune-epochs", "1", "--batch-size", "8",
                 "--workers", "0", "--name", "efficientformer_slim_test", "--measure-reps", "5"]) == 0
    config = out / "efficientformer_slim_test.yaml"
    cfg = yaml.safe_load(config.read_text())
    refinement = cfg["search"]["refinement"]  # measured, and searched again while more than 5% off
    picked = [r for r in refinement["rounds"] if r["measured_ms"] == refinement["measured_ms"]][0]
    assert refinement["rounds"][0]["table_target_ms"] == pytest.approx(float(f"{target:.4f}"))
    assert cfg["latency"]["predicted_ms"] == round(picked["predicted_ms"], 5) <= picked["table_target_ms"] + 1e-5
    assert cfg["latency"]["measured_ms"] == round(refinement["measured_ms"], 5) > 0
    assert cfg["latency"]["table_sha256"] and (out / "trajectory.png").is_file()
    traj = json.loads((out / "trajectory.json").read_text())
    assert traj["trajectory"][-1]["predicted_ms"] == pytest.approx(cfg["latency"]["predicted_ms"], rel=1e-4)
    assert (out / cfg["weights"]).is_file()
    capsys.readouterr()

    assert main(["info", "--model-config", str(config)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "efficientformer_slim_test" and "latency_predicted_ms" in info["metrics"]
    formats = ["onnx", "coreml"] if importlib.util.find_spec("coremltools") else ["onnx"]
    assert main(["export", "--model-config", str(config), "--pretrained", "config", "--format", *formats,
                 "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "efficientformer_slim_test.onnx").is_file()
    if "coreml" in formats:
        assert (tmp_path / "exp" / "efficientformer_slim_test.mlpackage").is_dir()
    assert main(["benchmark", "--model-config", str(config), "--reps", "2", "--warmup", "0", "--quiet"]) == 0
    assert "efficientformer_slim_test" in capsys.readouterr().out
    assert main(["validate", "--model-config", str(config), "--checkpoint", str(out / cfg["weights"]),
                 "--data-dir", str(data), "--reparam", "--workers", "0"]) == 0
    model = create_model("efficientformer_slim_test", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(zoo.export.reparameterize(model)(x), model(x), rtol=1e-5, atol=1e-5)
    # the same supernet, priced by the measured accuracy drop instead of the alphas
    again = tmp_path / "slim_acc"
    assert main(["slim", "--target-ms", f"{target:.4f}", "--lut", str(lut), "--data-dir", str(data), "--out",
                 str(again), "--supernet", str(out / "supernet" / "last.pth.tar"), "--supernet-config",
                 str(out / "supernet.yaml"), "--importance", "accuracy", "--name", "efficientformer_slim_acc",
                 "--no-measure", "--batch-size", "8"]) == 0
    acc = yaml.safe_load((again / "efficientformer_slim_acc.yaml").read_text())
    assert acc["search"]["importance"] == "accuracy" and acc["latency"]["predicted_ms"] <= float(f"{target:.4f}")


def test_coreml_block_packages_and_a_manifest_the_device_results_import_from(tmp_path):
    pytest.importorskip("coremltools")
    from zoo.slim.coreml_blocks import export_blocks

    space = EfficientFormerSpace(img_size=32, max_widths=(16, 16, 16, 32), max_depths=(1, 1, 1, 2), num_classes=3)
    keys = ["stem.i3.c16.r32", "mb4d.c16.r8.e4", "flat.c32.r1", "mb3d.c32.r1.e4"]
    manifest = json.loads(export_blocks(space, tmp_path / "phone", networks=1, keys=keys, progress=False).read_text())
    assert [b["key"] for b in manifest["blocks"]] == keys
    for b in manifest["blocks"] + manifest["networks"]:
        assert (tmp_path / "phone" / b["file"] / "Manifest.json").is_file()
    assert manifest["blocks"][3]["input_shape"] == [1, 1, 32]  # Meta3D blocks take tokens
    assert manifest["networks"][0]["table_keys"] == space.keys(FormerArch(**manifest["networks"][0]["arch"]))
    # what a device app sends back, in the form the manifest asks for
    back = {**manifest["return"], "device": "iPhone 12", "os": "iOS 17.5", "runtime": "CoreML 7",
            "space": manifest["space"],
            "entries": [{"key": k, "median_ms": e.median_ms, "p90_ms": e.p90_ms, "n": e.n}
                        for k, e in synthetic_table(space).entries.items()]}
    (tmp_path / "phone.json").write_text(json.dumps(back))
    assert main(["latency-table", "--import", str(tmp_path / "phone.json"), "--out", str(tmp_path / "lut.json")]) == 0
    table = LatencyTable.load(tmp_path / "lut.json")
    assert table.provenance["device"] == "iPhone 12" and table.provenance["space"] == space.describe()


def test_drop_and_shrink_skip_changes_the_table_says_are_not_faster():
    space = EfficientFormerSpace(**TINY)
    table = synthetic_table(space)
    imp = random_importance(space, seed=3)
    arch = start_arch(imp, space.max_widths)
    least = min(((imp.slot(i, j), i, j) for i, k in enumerate(arch.kept) for j, _ in k))[1:]
    plain = candidate_actions(arch, imp)
    assert plain[0] == Action("drop", *least)
    skip = candidate_actions(arch, imp, saves=lambda a: (a.stage, a.slot) != least)
    assert skip[0].kind == "drop" and (skip[0].stage, skip[0].slot) != least


def test_the_accuracy_importance_prices_actions_by_the_measured_drop():
    from zoo.slim.accuracy import AccuracyImportance, recalibrate_batchnorm

    net = tiny_supernet().eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    val = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g))]
    imp = AccuracyImportance(net, calib, val, metric="loss")
    start = start_arch(imp, net.embed_dims)
    for action in candidate_actions(start, imp):
        new = action.apply(start)
        assert imp.lost(start, action) == pytest.approx(max(0.0, imp.score(start) - imp.score(new)))
        assert imp.after(imp.kept(start), imp.lost(start, action), new) == imp.score(new)
    # the score is the re-estimated slimmed network's loss on the validation batch
    model = recalibrate_batchnorm(net.extract(start.widths, start.kept), calib)
    with torch.no_grad():
        want = -torch.nn.functional.cross_entropy(model(val[0][0]), val[0][1]).item()
    assert imp.score(start) == pytest.approx(want, rel=1e-5)
    bn = model.stem.norm1
    assert not torch.allclose(bn.running_mean, net.stem.norm1.running_mean)  # statistics re-estimated
    space = EfficientFormerSpace(**TINY)
    result = slim(space, synthetic_table(space), imp, start, 0.6 * synthetic_table(space).predict(
        space.keys(start.former())))
    assert result.trajectory[-1]["importance"] == pytest.approx(imp.score(result.arch))
    with pytest.raises(ConfigError, match="metric"):
        AccuracyImportance(net, calib, val, metric="f1")
