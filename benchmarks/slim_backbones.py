"""Latency-driven slimming of EfficientViT and EfficientFormerV2, end to end on the CPU (not a test).

For each family, on a search space at one input size (EfficientViT 224 px, EfficientFormerV2 64 px):

1. latency tables on torch and onnxruntime (1 thread): build time and the additivity report
   (8 random architectures, whole network against the table's sum, raw and leave-one-out
   calibrated, Spearman's rho);
2. on the built-in pattern images: the space's full network trained once, then for two latency
   targets the greedy search priced by the inherited networks' validation loss, on the table
   alone and refined by measurement (`zoo.slim.refine`), a fine-tune of the refined slimmed
   model, its measured latency against the target, and a uniformly width-scaled
   network (the full depths, every width scaled by one factor) of about the same measured
   latency trained from scratch for the same epochs: top-1 of both on the held-out images.
   EfficientFormerV2 is searched with both efficiency measures (ms and MES).

Writes ``docs/results/slim_backbones_cpu.md``. ``--quick`` is a smoke run (nothing written to docs/).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml

import zoo  # noqa: F401  (registers the families)
from zoo.slim.accuracy import InheritedAccuracy, recalibrate_batchnorm
from zoo.slim.additivity import additivity_report, format_report
from zoo.slim.greedy import greedy_slim, latency_floor
from zoo.slim.measure import closest_measured, measure_network, measure_networks, measure_table
from zoo.slim.refine import refine
from zoo.slim.space_v2 import EfficientFormerV2Space, V2Arch
from zoo.slim.space_vit import EfficientVitSpace, VitArch
from zoo.tables import results_file

ROOT = Path(__file__).resolve().parents[1]


def train(argv: list[str]) -> dict:
    from zoo.cli.train import parse_train_args, run_train

    return run_train(parse_train_args(argv))


def uniform(space, scale: float):
    """The full network with every width scaled by `scale` (rounded to the space's grid)."""
    full = space.full_arch()
    if isinstance(full, VitArch):
        widths = []
        for i, (w, h) in enumerate(zip(full.widths, full.heads)):
            valid = space.widths_for(i, h)
            widths.append(min(valid, key=lambda c: abs(c - w * scale)))
        return VitArch(tuple(widths), full.heads, full.blocks)
    widths = tuple(int(min(m, max(space.step, round(w * scale / space.step) * space.step)))
                   for w, m in zip(full.widths, space.max_widths))
    return V2Arch(widths, full.blocks, full.ratios, full.num_vit)


def register(out: Path, name: str, space, arch) -> str:
    from zoo.registry import register_model_config

    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": space.base_model, "config": {
        **space.to_config(arch), "img_size": space.img_size, "num_classes": space.num_classes}}))
    return register_model_config(path)


def run_family(space, out: Path, args, q: bool) -> dict:
    from safetensors.torch import save_file

    from zoo.cli.slim import _batches
    from zoo.data.patterns import make_pattern_folder
    from zoo.hub import read_state_dict

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

    data = make_pattern_folder(out / "patterns", num_classes=4, train_per_class=16 if q else 48,
                               val_per_class=8 if q else 24, size=space.img_size, seed=3)
    full_epochs, ft_epochs = (1, 1) if q else (args.full_epochs, args.finetune_epochs)
    common = ["--batch-size", "16", "--workers", "0", "--img-size", str(space.img_size), "--log-interval", "0",
              "--smoothing", "0", "--device", "cpu", "--seed", "0"]
    full_name = register(out, f"{space.family}_full", space, space.full_arch())
    start = time.perf_counter()
    full_best = train(["--model", full_name, "--data-dir", str(data), "--epochs", str(full_epochs), "--output", str(out),
                       "--experiment", "full", *common, "--smoothing", "0.1"])
    full_minutes = (time.perf_counter() - start) / 60
    full_state = {k: v for k, v in read_state_dict(out / "full" / "last.pth.tar").items() if isinstance(v, torch.Tensor)}
    calib = [x for x, _ in _batches(str(data), "train", space, 16, 4)]
    val = _batches(str(data), "val", space, 16, None)
    oracle = InheritedAccuracy(space, full_state, calib, val)
    table = tables["torch"]
    top = table.predict(space.keys(space.full_arch()))
    floor = latency_floor(space, table)
    searches = [("ms", 0.3), ("ms", 0.6)] + ([("mes", 0.3)] if isinstance(space, EfficientFormerV2Space) else [])
    found = []
    for efficiency, frac in (searches[:1] if q else searches):
        target = floor + frac * (top - floor)
        start = time.perf_counter()

        def search(t, efficiency=efficiency):
            return greedy_slim(space, table, oracle, t, efficiency=efficiency)

        refined = refine(search, lambda r: measure_network(space, r.arch, "torch", reps=reps_net), target)
        found.append((efficiency, frac, target, refined, time.perf_counter() - start))
    grid = list(dict.fromkeys(uniform(space, s) for s in np.linspace(0.15, 1.0, 35)))
    bases = [closest_measured(space, grid, table, f[3].measured_ms, reps_net) for f in found]
    rows = []
    for (efficiency, frac, target, refined, search_s), base in zip(found, bases):
        result = refined.result
        name = f"{space.family}_slim_{efficiency}_{int(frac * 100)}"
        model = recalibrate_batchnorm(oracle.inherit(result.arch), calib)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
        register(out, name, space, result.arch)
        slim_best = train(["--model", name, "--data-dir", str(data), "--pretrained", str(out / f"{name}.safetensors"),
                           "--epochs", str(ft_epochs), "--output", str(out), "--experiment", name, *common])
        bname = f"{space.family}_uniform_{efficiency}_{int(frac * 100)}"
        register(out, bname, space, base)
        base_best = train(["--model", bname, "--data-dir", str(data), "--epochs", str(ft_epochs), "--output", str(out),
                           "--experiment", bname, *common])
        first = refined.rounds[0]
        rows.append(dict(efficiency=efficiency, target=target, predicted=first["predicted_ms"], first=first["measured_ms"],
                         rounds=len(refined.rounds), arch=result.arch.describe(), steps=len(result.trajectory) - 1,
                         search_s=search_s, top1=slim_best["top1"], base=base.describe(), base_top1=base_best["top1"]))
    # at the end every slimmed and uniform network again, together in interleaved rounds (the table)
    final = measure_networks(space, [f[3].result.arch for f in found] + bases, "torch", reps=reps_net)
    for i, row in enumerate(rows):
        row.update(measured=final[i], base_ms=final[len(rows) + i])
    return dict(sections=sections, rows=rows, reps_net=reps_net, full_minutes=full_minutes, full_epochs=full_epochs,
                ft_epochs=ft_epochs, full_top1=full_best["top1"], top=top, floor=floor, evaluations=len(oracle.cache))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/slim_backbones")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--families", nargs="+", default=["efficientvit", "efficientformerv2"])
    p.add_argument("--full-epochs", type=int, default=12)
    p.add_argument("--finetune-epochs", type=int, default=8)
    p.add_argument("--vit-img-size", type=int, default=224,
                   help="EfficientViT's input (at 64 px its grids are 4, 2, 1 and its blocks take tens of microseconds: "
                        "timing noise)")
    p.add_argument("--v2-img-size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(2)
    q = args.quick
    spaces = {
        "efficientvit": EfficientVitSpace(img_size=32 if q else args.vit_img_size, max_widths=(64, 128, 192), max_depths=(1, 2, 3),
                                          max_heads=(4, 4, 4), kernels=(5, 5, 5, 5), num_classes=4),
        "efficientformerv2": EfficientFormerV2Space(img_size=64 if q else args.v2_img_size, max_widths=(32, 48, 96, 176), max_depths=(2, 2, 6, 4),
                                                    max_vit=2, num_classes=4),
    }
    results = {}
    for fam in args.families:
        out = Path(args.out) / fam
        out.mkdir(parents=True, exist_ok=True)
        results[fam] = (spaces[fam], run_family(spaces[fam], out, args, q))
    path = None if q else ROOT / "docs" / "results" / "slim_backbones_cpu.md"
    with results_file(path, "Latency-driven slimming of EfficientViT and EfficientFormerV2 (CPU, 1 thread)"):
        for fam, (space, r) in results.items():
            print(f"## {fam}\n\nSearch space: {space.describe()}. Tables and timings on 1 thread.\n")
            for backend, build_s, n, report in r["sections"]:
                print(f"### {backend}: {n} blocks measured in {build_s:.0f} s\n")
                print(format_report(report) + "\n")
            print(f"### End to end on the pattern images\n\nThe full network trained {r['full_epochs']} epochs "
                  f"({r['full_minutes']:.1f} min, top-1 {r['full_top1']:.1f}); it is predicted at {r['top']:.3f} ms "
                  f"on the torch table (calibrated), the search's floor at {r['floor']:.3f} ms; targets lie 30% and "
                  f"60% of the way up. Each action priced by the validation loss of the inherited, BatchNorm-"
                  f"re-estimated network ({r['evaluations']} networks evaluated in all). Fine-tune "
                  f"{r['ft_epochs']} epochs; the uniform baseline (full depths, every width scaled by one factor, "
                  "of the 4 factors the table puts nearest, the one measured closest to the slimmed model) trains from "
                  "scratch for the same epochs. Top-1 on the held-out images (24 per class).\n\n"
                  "Table only: the search on the table alone (the paper's), its network measured. Refined "
                  "(`zoo.slim.refine`, as `zoo slim` does by default): the found network measured and the search "
                  "run again to the target corrected by measured / predicted, while more than 5% off (at most 3 "
                  "measurements; the search's time includes them). Measured: median of "
                  f"{r['reps_net']} interleaved rounds; the refined and uniform columns from one run of all those "
                  "networks together, after the fine-tunes.\n")
            print("| efficiency | target ms | table only: predicted ms | measured ms | vs target | refined: "
                  "architecture | steps | measurements | search s | measured ms | vs target | top-1 | "
                  "uniform architecture | measured ms | top-1 |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for w in r["rows"]:
                print(f"| {w['efficiency']} | {w['target']:.3f} | {w['predicted']:.3f} | {w['first']:.3f} | "
                      f"{w['first'] / w['target'] - 1:+.1%} | {w['arch']} | {w['steps']} | {w['rounds']} | "
                      f"{w['search_s']:.0f} | {w['measured']:.3f} | {w['measured'] / w['target'] - 1:+.1%} | "
                      f"{w['top1']:.1f} | {w['base']} | {w['base_ms']:.3f} | {w['base_top1']:.1f} |")
            print()


if __name__ == "__main__":
    main()
