"""Latency-driven slimming of EfficientFormer, end to end on the CPU (not a test).

1. Latency tables for an L1-wide search space at 64 px, 1 thread, on torch and onnxruntime:
   build time, and the additivity report (8 random architectures, whole network against the
   table's sum, raw and leave-one-out calibrated, Spearman's rho).
2. On the built-in pattern images: the supernet trained once (`zoo slim`'s training), then for
   three latency targets the search, on the table alone and refined by measurement
   (`zoo.slim.refine`), a fine-tune of the refined slimmed model, its measured latency
   against the target, and a uniformly width-scaled EfficientFormer (L1's depths, every width
   scaled by one factor, rounded to 16) of about the same measured latency trained from
   scratch with the same fine-tuning budget: top-1 of both on the held-out images.

Writes ``docs/results/slim_efficientformer_cpu.md``. ``--quick`` is a smoke run (tiny space,
one target, nothing written to docs/).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import zoo  # noqa: F401  (registers the families)
from zoo.slim.additivity import additivity_report, format_report
from zoo.slim.measure import closest_measured, measure_network, measure_networks, measure_table
from zoo.slim.refine import refine
from zoo.slim.search import AlphaImportance, slim, start_arch
from zoo.slim.space import EfficientFormerSpace, FormerArch
from zoo.tables import results_file

ROOT = Path(__file__).resolve().parents[1]


def train(name_or_args: list[str]) -> dict:
    from zoo.cli.train import parse_train_args, run_train

    return run_train(parse_train_args(name_or_args))


def uniform_arch(space, base_widths, depths, num_vit, scale: float) -> FormerArch:
    widths = tuple(int(min(m, max(16, round(w * scale / 16) * 16))) for w, m in zip(base_widths, space.max_widths))
    return FormerArch(widths, tuple(depths), num_vit)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/slim_bench")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--supernet-epochs", type=int, default=12)
    p.add_argument("--finetune-epochs", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(2)
    q = args.quick
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    widths, depths = ((32, 32, 48, 64), (1, 2, 2, 2)) if q else ((48, 96, 224, 448), (4, 3, 8, 5))
    space = EfficientFormerSpace(img_size=64 if not q else 32, max_widths=widths, max_depths=depths, num_classes=4)
    reps, reps_net = (5, 10) if q else (30, 50)
    tables, sections = {}, []
    for backend in ("torch", "onnxruntime"):
        start = time.perf_counter()
        table = measure_table(space, backend, threads=1, reps=reps, progress=False)
        build_s = time.perf_counter() - start
        report = additivity_report(space, table, num_archs=4 if q else 8, reps=reps, seed=1)
        table.save(out / f"lut_{backend}.json")
        tables[backend] = table
        sections.append((backend, build_s, len(table.entries), report))

    from zoo.data.patterns import make_pattern_folder

    data = make_pattern_folder(out / "patterns", num_classes=4, train_per_class=16 if q else 48,
                               val_per_class=8 if q else 24, size=space.img_size, seed=3)
    sn_epochs, ft_epochs = (1, 1) if q else (args.supernet_epochs, args.finetune_epochs)
    from zoo.cli.slim import _supernet_config
    from zoo.registry import create_model, register_model_config

    cfg_args = argparse.Namespace(noise="uniform", tau_start=5.0, tau_end=0.5, data_dir=str(data), batch_size=16,
                                  supernet_epochs=sn_epochs)
    sn_cfg = _supernet_config(space, out, cfg_args)
    sn_name = register_model_config(sn_cfg)
    common = ["--batch-size", "16", "--workers", "0", "--img-size", str(space.img_size), "--log-interval", "0",
              "--smoothing", "0", "--device", "cpu", "--seed", "0"]
    start = time.perf_counter()
    train(["--model", sn_name, "--model-config", str(sn_cfg), "--data-dir", str(data), "--epochs", str(sn_epochs),
           "--output", str(out), "--experiment", "supernet", *common])
    sn_minutes = (time.perf_counter() - start) / 60
    from zoo.hub import read_state_dict

    supernet = create_model(sn_name)
    supernet.load_state_dict({k: v for k, v in read_state_dict(out / "supernet" / "last.pth.tar").items()
                              if isinstance(v, torch.Tensor)})
    importance = AlphaImportance.from_supernet(supernet)
    table = tables["torch"]
    begin = start_arch(importance, space.max_widths)
    full = table.predict(space.keys(begin.former()))
    smallest = table.predict(space.keys(FormerArch((16,) * 4, (1,) * 4, 0)))
    import yaml
    from safetensors.torch import save_file

    found = []
    for frac in ((0.5,) if q else (0.2, 0.4, 0.6)):  # of the way from the smallest architecture to the full one
        target = smallest + frac * (full - smallest)

        def search(t):
            return slim(space, table, importance, begin, t)

        found.append((frac, target, refine(search, lambda r: measure_network(space, r.arch.former(), "torch",
                                                                             reps=reps_net), target)))
    archs = [f[2].result.arch.former() for f in found]
    # the uniform baseline: of the width scales the table puts nearest, the one measured closest to the slimmed model
    l1 = (48, 96, 224, 448)
    grid = list(dict.fromkeys(uniform_arch(space, l1, (3, 2, 6, 4) if not q else (1, 1, 1, 1), 1, s)
                              for s in np.linspace(0.2, 1.0, 33)))
    bases = [closest_measured(space, grid, table, f[2].measured_ms, reps_net) for f in found]
    rows = []
    for (frac, target, refined), arch, base in zip(found, archs, bases):
        result = refined.result
        name = f"slim_{int(frac * 100)}"
        sub = supernet.extract(result.arch.widths, result.arch.kept)
        save_file({k: v.contiguous() for k, v in sub.state_dict().items()}, str(out / f"{name}.safetensors"))
        cfg = {"name": name, "base": "efficientformer_l1",
               "config": {**arch.to_config(), "img_size": space.img_size, "num_classes": 4}}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        register_model_config(out / f"{name}.yaml")
        slim_best = train(["--model", name, "--data-dir", str(data), "--pretrained", str(out / f"{name}.safetensors"),
                           "--epochs", str(ft_epochs), "--output", str(out), "--experiment", name, *common])
        bname = f"uniform_{int(frac * 100)}"
        (out / f"{bname}.yaml").write_text(yaml.safe_dump({"name": bname, "base": "efficientformer_l1", "config": {
            **base.to_config(), "img_size": space.img_size, "num_classes": 4}}))
        register_model_config(out / f"{bname}.yaml")
        base_best = train(["--model", bname, "--data-dir", str(data), "--epochs", str(ft_epochs), "--output", str(out),
                           "--experiment", bname, *common])
        rows.append(dict(target=target, first=refined.rounds[0], rounds=len(refined.rounds), arch=arch,
                         top1=slim_best["top1"], base=base, base_top1=base_best["top1"],
                         steps=len(result.trajectory) - 1))
    # at the end every slimmed and uniform network again, together in interleaved rounds (the table)
    final = measure_networks(space, archs + bases, "torch", reps=reps_net)
    for i, row in enumerate(rows):
        row.update(measured=final[i], base_ms=final[len(rows) + i])

    path = None if q else ROOT / "docs" / "results" / "slim_efficientformer_cpu.md"
    with results_file(path, "Latency-driven slimming of EfficientFormer (CPU, 1 thread)"):
        print(f"Search space: widths up to {list(space.max_widths)} (multiples of 16), up to {list(space.max_depths)} "
              f"blocks per stage, {space.img_size} px, 4 classes. Tables and timings on 1 thread.\n")
        for backend, build_s, n, report in sections:
            print(f"### {backend}: {n} blocks measured in {build_s:.0f} s\n")
            print(format_report(report) + "\n")
        print(f"### End to end on the pattern images ({sn_epochs}-epoch supernet, {sn_minutes:.1f} min; "
              f"{ft_epochs}-epoch fine-tune each)\n")
        print(f"The full supernet (every slot kept) is predicted at {full:.3f} ms on the torch table (calibrated), the "
              f"smallest architecture (one 16-channel block per stage) at {smallest:.3f} ms; the targets lie 20%, 40% "
              "and 60% of the way from the one to the other. "
              "Uniform: L1's depths (3, 2, 6, 4), one Meta3D block, every width scaled by one factor (rounded to "
              "16), of the 4 factors the table puts nearest the one measured closest to the slimmed model; trained from "
              "scratch for the same epochs. Top-1 on the held-out images (24 per class).\n\n"
              "Table only: the search on the table alone (the paper's), its network measured. Refined "
              "(`zoo.slim.refine`, as `zoo slim` does by default): the found network measured and the search run "
              "again to the target corrected by measured / predicted, while more than 5% off (at most 3 "
              f"measurements). Measured: median of {reps_net} interleaved rounds; the refined and uniform columns "
              "from one run of all those networks together, after the fine-tunes.\n")
        print("| target ms | table only: predicted ms | measured ms | vs target | refined: architecture (widths / "
              "depths / num_vit) | steps | measurements | measured ms | vs target | top-1 | uniform: architecture | "
              "measured ms | top-1 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for w in rows:
            a, b, t = w["arch"], w["base"], w["target"]
            print(f"| {t:.3f} | {w['first']['predicted_ms']:.3f} | {w['first']['measured_ms']:.3f} | "
                  f"{w['first']['measured_ms'] / t - 1:+.1%} | {list(a.widths)} / {list(a.depths)} / {a.num_vit} | "
                  f"{w['steps']} | {w['rounds']} | {w['measured']:.3f} | {w['measured'] / t - 1:+.1%} | "
                  f"{w['top1']:.1f} | {list(b.widths)} / {list(b.depths)} / {b.num_vit} | {w['base_ms']:.3f} | "
                  f"{w['base_top1']:.1f} |")

if __name__ == "__main__":
    main()
