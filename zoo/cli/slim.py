"""``zoo latency-table`` (build, import, report on, export for a device) and ``zoo slim`` (train
the supernet, search to a latency target, write the architecture, fine-tune it)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from zoo.errors import ConfigError, DataError

__all__ = ["register", "space_from_args", "SUPERNET"]

SUPERNET = "efficientformer_supernet"


def space_from_args(args, table=None):
    """The search space a table covers: from the table's record, else from the flags."""
    from zoo.slim.space import family_space

    if table is not None and table.provenance.get("space"):
        return family_space(table.family, **table.provenance["space"])
    kwargs = {"img_size": args.img_size, "num_classes": args.num_classes}
    for flag, families in (("max_widths", None), ("max_depths", None), ("max_heads", ("efficientvit",)),
                           ("max_ratio", ("efficientformerv2",)), ("max_vit", ("efficientformer", "efficientformerv2"))):
        value = getattr(args, flag)
        if value is None or value == []:
            continue
        if families and args.family not in families:
            raise ConfigError(f"--{flag.replace('_', '-')} is for {' and '.join(families)}, not {args.family}.")
        kwargs[flag] = tuple(value) if isinstance(value, list) else value
    return family_space(args.family, **kwargs)


def _cmd_latency_table(args) -> int:
    from zoo.slim.additivity import additivity_report, format_report
    from zoo.slim.measure import measure_table
    from zoo.slim.table import LatencyTable

    if args.import_file:
        if not args.out:
            raise ConfigError("--import needs --out lut.json.")
        table = LatencyTable.import_device_file(args.import_file, family=args.family)
        table.save(args.out)
        print(f"imported {len(table.entries)} {table.family} blocks ({table.describe()}) -> {args.out}")
        return 0
    if args.lut:
        table = LatencyTable.load(args.lut)
        out = Path(args.out or args.lut)
    else:
        if not args.out:
            raise ConfigError("give --out lut.json (where the table goes).")
        space = space_from_args(args)
        table = measure_table(space, args.backend, args.threads, args.warmup, args.reps, progress=not args.quiet,
                              chain=args.chain)
        out = Path(args.out)
        table.save(out)
        print(f"measured {len(table.entries)} blocks ({table.describe()}) -> {out}")
    space = space_from_args(args, table)
    if args.export_coreml:
        from zoo.slim.coreml_blocks import export_blocks

        manifest = export_blocks(space, args.export_coreml, networks=args.archs, seed=args.seed,
                                 progress=not args.quiet)
        print(f"wrote {manifest}: measure each package on the device and import the results "
              "(zoo latency-table --import FILE --out lut.json)")
    if args.report:
        report = additivity_report(space, table, num_archs=args.archs, seed=args.seed, reps=args.report_reps)
        print(format_report(report))
        table.save(out)
        if report["calibration_stored"]:
            print(f"calibration a = {report['a']:.4f}, b = {report['b']:.4f} ms stored in {out}")
        else:
            print(f"warning: the fitted line falls (a = {report['a']:.4f}): the table's sums do not rank these networks; "
                  "no calibration stored (re-measure with more --reps, or on a quieter machine)", file=sys.stderr)
        if args.report_json:
            from zoo.io import atomic_write_json

            atomic_write_json(args.report_json, report)
    return 0


def _supernet_config(space, out: Path, args) -> Path:
    """The supernet's model-config over exactly the table's space."""
    import yaml

    from zoo.io import atomic_write

    cfg = {"name": "efficientformer_supernet_slim", "base": SUPERNET,
           "config": {"img_size": space.img_size, "num_classes": space.num_classes,
                      "embed_dims": list(space.max_widths), "depths": list(space.max_depths),
                      "noise": args.noise, "tau_start": args.tau_start, "tau_end": args.tau_end,
                      "tau_steps": _train_steps(args.data_dir, args.batch_size, args.supernet_epochs)},
           "description": "the slimming supernet over the latency table's search space"}
    path = out / "supernet.yaml"
    with atomic_write(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def _train_steps(data_dir: str, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a run: the temperature reaches tau_end at the end of the supernet's training."""
    from zoo.data.images import ImageFolder

    return max(1, math.ceil(len(ImageFolder(data_dir, "train")) / batch_size) * epochs)


def _train(argv: list[str]) -> dict:
    from zoo.cli.train import parse_train_args, run_train

    return run_train(parse_train_args(argv))


def _cmd_slim(args) -> int:
    from zoo.slim.table import LatencyTable

    table = LatencyTable.load(args.lut)
    if table.family != args.family:
        raise DataError(f"{args.lut} holds {table.family} blocks, not {args.family}.")
    space = space_from_args(args, table)
    table.check_covers(space.all_keys())  # before any training
    if args.importance is None:
        args.importance = "alpha" if args.family == "efficientformer" else "accuracy"
    if args.family != "efficientformer" and args.importance == "alpha":
        raise ConfigError(f"--importance alpha needs EfficientFormer's supernet of paths; {args.family} is priced by "
                          "the accuracy its inherited network measures on val/ (--importance accuracy, its default).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--batch-size", str(args.batch_size), "--workers", str(args.workers), "--seed", str(args.seed),
              "--img-size", str(space.img_size)] + (["--lr", str(args.lr)] if args.lr else [])
    setup = _search_supernet if args.family == "efficientformer" else _search_greedy
    info, search, extract = setup(args, space, table, out, common)
    result = search(args.target_ms)
    measured_ms = None
    if args.measure and args.refine_rounds and table.provenance.get("backend") in ("torch", "onnxruntime", "cuda"):
        refinement = _refine(args, space, table, search, extract, result)
        result, measured_ms = refinement.result, refinement.measured_ms
        info["refinement"] = refinement.to_json()
    arch, arch_config, state = extract(result)
    name = args.name or f"{args.family}_slim_{args.target_ms:g}ms".replace(".", "p")
    _finish(args, space, table, out, common, name, arch, arch_config, state, info, result, measured_ms)
    return 0


def _refine(args, space, table, search, extract, result):
    """Measure the found architecture on the table's backend and search again to a corrected
    target while it misses by more than --refine-tol (`zoo.slim.refine`)."""
    from zoo.slim.measure import measure_network
    from zoo.slim.refine import refine

    backend, threads = table.provenance["backend"], int(table.provenance.get("threads") or 1)

    def measure(r) -> float:
        return measure_network(space, extract(r, weights=False)[0], backend, threads, reps=args.measure_reps)

    def show(row: dict) -> None:
        print(f"measured on {backend}: {row['measured_ms']:.3f} ms ({row['measured_ms'] / args.target_ms - 1:+.1%} "
              f"against the target; searched to {row['table_target_ms']:.3f} ms on the table)", file=sys.stderr)

    return refine(search, measure, args.target_ms, first=result, tol=args.refine_tol, rounds=args.refine_rounds,
                  on_round=show)


def _search_supernet(args, space, table, out: Path, common: list[str]):
    """EfficientFormer: train (or load) the supernet, search on its alphas or measured accuracy.
    Returns ``(info, search(target_ms) -> result, extract(result, weights) -> (arch, config, state))``."""
    from zoo.registry import create_model, register_model_config
    from zoo.slim.search import AlphaImportance, slim, start_arch

    if args.supernet:
        if not args.supernet_config:
            raise ConfigError("--supernet CKPT needs --supernet-config FILE (the model-config it was trained with).")
        sn_name = register_model_config(args.supernet_config)
        ckpt = args.supernet
    else:
        if not args.data_dir:
            raise ConfigError("give --data-dir (to train the supernet here) or --supernet CKPT --supernet-config FILE.")
        cfg_path = _supernet_config(space, out, args)
        sn_name = register_model_config(cfg_path)
        print(f"training the supernet ({args.supernet_epochs} epochs) -> {out / 'supernet'}", file=sys.stderr)
        _train(["--model", sn_name, "--model-config", str(cfg_path), "--data-dir", args.data_dir,
                "--epochs", str(args.supernet_epochs), "--output", str(out), "--experiment", "supernet",
                "--smoothing", "0.1", *common])
        ckpt = str(out / "supernet" / "last.pth.tar")
    supernet = create_model(sn_name)
    supernet.load_state_dict(_checkpoint(ckpt))
    if tuple(supernet.embed_dims) != space.max_widths or tuple(supernet.depths) != space.max_depths:
        raise DataError(f"the supernet ({supernet.embed_dims}, {supernet.depths}) is not the table's space "
                        f"({space.max_widths}, {space.max_depths}): build the table for the supernet's size.")
    if args.importance == "accuracy":
        from zoo.slim.accuracy import AccuracyImportance

        calib, val = _calib_val(args, space)
        importance = AccuracyImportance(supernet.eval(), calib, val, metric=args.importance_metric)
    else:
        importance = AlphaImportance.from_supernet(supernet)
    begin = start_arch(importance, supernet.embed_dims)

    def search(target_ms: float):
        return slim(space, table, importance, begin, target_ms, calibrated=not args.raw)

    def extract(result, weights: bool = True):
        arch = result.arch.former()
        state = supernet.extract(result.arch.widths, result.arch.kept).state_dict() if weights else None
        return arch, arch.to_config(), state

    return {"supernet": str(ckpt), "importance": args.importance}, search, extract


def _search_greedy(args, space, table, out: Path, common: list[str]):
    """EfficientViT / EfficientFormerV2: train (or load) the space's full network, then the
    greedy search priced by the accuracy of inherited networks (`zoo.slim.greedy`). Returns
    what `_search_supernet` does."""
    from zoo.slim.accuracy import InheritedAccuracy, recalibrate_batchnorm
    from zoo.slim.greedy import MES, greedy_slim, latency_floor

    if not args.data_dir:
        raise ConfigError(f"slimming {args.family} measures accuracy on --data-dir's val/ images: give --data-dir.")
    floor = latency_floor(space, table, calibrated=not args.raw)
    if floor > args.target_ms:  # before any training
        raise DataError(f"{args.lut} predicts no architecture of this space under {args.target_ms:g} ms (the smallest "
                        f"it reaches is about {floor:.4g} ms): choose a higher target or a smaller input size.")
    if args.supernet:
        ckpt = args.supernet
    else:
        cfg_path = _full_config(space, out)
        from zoo.registry import register_model_config

        name = register_model_config(cfg_path)
        print(f"training the full network ({args.supernet_epochs} epochs) -> {out / 'full'}", file=sys.stderr)
        _train(["--model", name, "--model-config", str(cfg_path), "--data-dir", args.data_dir,
                "--epochs", str(args.supernet_epochs), "--output", str(out), "--experiment", "full",
                "--smoothing", "0.1", *common])
        ckpt = str(out / "full" / "last.pth.tar")
    calib, val = _calib_val(args, space)
    try:
        oracle = InheritedAccuracy(space, _checkpoint(ckpt), calib, val, metric=args.importance_metric)
    except RuntimeError as e:  # load_state_dict: another architecture's checkpoint
        raise DataError(f"{ckpt} is not the full network of this search space ({space.describe()}): {e}") from None
    mes = MES(ms_alpha=args.mes_alphas[0], params_alpha=args.mes_alphas[1])

    def search(target_ms: float):
        return greedy_slim(space, table, oracle, target_ms, efficiency=args.efficiency, mes=mes,
                           calibrated=not args.raw)

    def extract(result, weights: bool = True):
        state = recalibrate_batchnorm(oracle.inherit(result.arch), calib).state_dict() if weights else None
        return result.arch, space.to_config(result.arch), state

    info = {"full_network": str(ckpt), "importance": "accuracy", "metric": args.importance_metric,
            "efficiency": args.efficiency}
    return info, search, extract


def _full_config(space, out: Path) -> Path:
    """The model-config of the space's full network (where slimming starts)."""
    import yaml

    from zoo.io import atomic_write

    cfg = {"name": f"{space.family}_slim_full", "base": space.base_model,
           "config": {**space.to_config(space.full_arch()), "img_size": space.img_size,
                      "num_classes": space.num_classes},
           "description": "the full network of the latency table's search space"}
    path = out / "full.yaml"
    with atomic_write(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def _calib_val(args, space) -> tuple[list, list]:
    if not args.data_dir:
        raise ConfigError("--importance accuracy measures on --data-dir's val/ images: give --data-dir.")
    calib = [x for x, _ in _batches(args.data_dir, "train", space, args.batch_size, args.calib_batches)]
    return calib, _batches(args.data_dir, "val", space, args.batch_size, None)


def _finish(args, space, table, out: Path, common, name, arch, arch_config, state, info, result,
            measured_ms: float | None = None) -> None:
    """Write the trajectory, the inherited weights and the model-config; fine-tune; measure
    `arch` (the space's architecture of the result) on the table's backend unless the
    refinement has (`measured_ms`)."""
    import yaml

    from zoo.hub import read_state_dict
    from zoo.io import atomic_write, atomic_write_json, sha256_file
    from zoo.registry import register_model_config
    from zoo.slim.search import trajectory_png

    atomic_write_json(out / "trajectory.json", {"family": space.family, "target_ms": args.target_ms,
                                                 "table": str(args.lut), "table_provenance": table.provenance,
                                                 **result.to_json()})
    measured = info.get("importance") == "accuracy"
    metric = args.importance_metric
    trajectory_png(out / "trajectory.png", result, ylabel=("minus validation loss" if metric == "loss" else "val top-1 (%)")
                   if measured else "importance kept")
    weights = out / f"{name}_inherited.safetensors"
    _save_weights(weights, state)
    latency = {"target_ms": args.target_ms, "predicted_ms": round(result.predicted_ms, 5), "table": str(args.lut),
               "table_sha256": sha256_file(args.lut), "table_provenance": table.describe(),
               "calibrated": bool(table.calibration) and not args.raw}
    config = {"name": name, "base": space.base_model,
              "config": {**arch_config, "img_size": space.img_size, "num_classes": space.num_classes},
              "weights": weights.name, "latency": latency,
              "search": {"steps": len(result.trajectory) - 1, **info},
              "description": f"{space.family} slimmed to {args.target_ms:g} ms on {table.describe()}"}
    config_path = out / f"{name}.yaml"
    with atomic_write(config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    shape = ", ".join(f"{k} {v}" for k, v in arch_config.items() if k in ("embed_dims", "embed_dim", "depths", "depth",
                                                                          "num_heads", "num_vit", "mlp_ratios"))
    print(f"slimmed in {len(result.trajectory) - 1} steps: {shape}; predicted {result.predicted_ms:.3f} ms "
          f"(target {args.target_ms:g})")
    if args.finetune_epochs:
        register_model_config(config_path)
        _train(["--model", name, "--model-config", str(config_path), "--data-dir", args.data_dir,
                "--pretrained", str(weights), "--epochs", str(args.finetune_epochs), "--output", str(out),
                "--experiment", "finetune", *common])
        tuned = out / f"{name}.safetensors"
        _save_weights(tuned, _state_dict(read_state_dict(out / "finetune" / "model_best.pth.tar")))
        config["weights"] = tuned.name
    if args.measure and table.provenance.get("backend") in ("torch", "onnxruntime", "cuda"):
        from zoo.slim.measure import measure_network

        ms = measured_ms if measured_ms is not None else measure_network(
            space, arch, table.provenance["backend"], int(table.provenance.get("threads") or 1), reps=args.measure_reps)
        config["latency"]["measured_ms"] = round(ms, 5)
        print(f"measured on {table.provenance['backend']}: {config['latency']['measured_ms']:.3f} ms "
              f"({config['latency']['measured_ms'] / args.target_ms - 1:+.1%} against the target)")
    with atomic_write(config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    register_model_config(config_path)
    print(f"wrote {config_path} (use it with --model-config), {out / 'trajectory.json'}, {out / 'trajectory.png'}")


def _checkpoint(path: str) -> dict:
    from zoo.hub import read_state_dict

    return _state_dict(read_state_dict(Path(path)))


def _batches(data_dir: str, split: str, space, batch_size: int, limit: int | None) -> list:
    """``(images, labels)`` batches of an ImageFolder split through the family's eval
    transform at the space's input size (at most `limit` batches)."""
    import torch

    from zoo.data.images import ImageFolder, eval_transform
    from zoo.registry import model_card

    data = ImageFolder(data_dir, split)
    data.transform = eval_transform(model_card(space.base_model).input, space.img_size)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=g).tolist() if split == "train" else list(range(len(data)))
    out = []
    for start in range(0, len(order), batch_size):
        items = [data[i][:2] for i in order[start: start + batch_size]]  # (image, label, skipped)
        out.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
        if limit is not None and len(out) >= limit:
            break
    return out


def _save_weights(path: Path, sd: dict) -> None:
    """A safetensors file, written atomically."""
    from safetensors.torch import save

    from zoo.io import atomic_write

    with atomic_write(path, "wb") as f:
        f.write(save({k: v.contiguous() for k, v in sd.items()}))


def _state_dict(sd: dict) -> dict:
    import torch

    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _space_flags(s: argparse.ArgumentParser) -> None:
    from zoo.slim.space import FAMILY_NAMES

    s.add_argument("--family", default="efficientformer", choices=FAMILY_NAMES)
    s.add_argument("--img-size", type=int, default=224)
    s.add_argument("--num-classes", type=int, default=1000)
    s.add_argument("--max-widths", type=int, nargs="+", default=None,
                   help="the full network's widths per stage (default: EfficientFormer L7, EfficientFormerV2 S1, EfficientViT M5)")
    s.add_argument("--max-depths", type=int, nargs="+", default=None,
                   help="the full network's blocks (EfficientFormer: supernet slots) per stage")
    s.add_argument("--max-heads", type=int, nargs="+", default=None, help="efficientvit: heads per stage")
    s.add_argument("--max-ratio", type=int, default=None, help="efficientformerv2: the largest FFN ratio")
    s.add_argument("--max-vit", type=int, default=None, help="attention blocks at most (EfficientFormer V1 and V2)")


def register(sub) -> None:
    s = sub.add_parser("latency-table", help="build, import or check a per-block latency table for zoo slim")
    _space_flags(s)
    s.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "cuda"))
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--reps", type=int, default=30, help="timed calls per block (median and p90 kept)")
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--chain", type=int, default=4,
                   help="time shape-keeping blocks as chains of this many (weights not hot in the cache, as in a network)")
    s.add_argument("--out", default="", help="the table (JSON)")
    s.add_argument("--import", dest="import_file", default="", help="a device's CSV/JSON measurements (docs/slim.md)")
    s.add_argument("--lut", default="", help="an existing table (for --report / --export-coreml)")
    s.add_argument("--report", action="store_true", help="additivity: random networks measured against the table")
    s.add_argument("--archs", type=int, default=8, help="random architectures for --report / --export-coreml")
    s.add_argument("--report-reps", type=int, default=30)
    s.add_argument("--report-json", default="", help="also write the report here")
    s.add_argument("--export-coreml", default="", help="write every block as a CoreML package and a manifest here")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_latency_table)

    s = sub.add_parser("slim", help="latency-driven slimming: supernet or full network, search to --target-ms, fine-tune")
    _space_flags(s)
    s.add_argument("--target-ms", type=float, required=True)
    s.add_argument("--lut", required=True, help="a latency table (zoo latency-table)")
    s.add_argument("--data-dir", default="", help="ImageFolder with train/ and val/ (supernet training, fine-tuning)")
    s.add_argument("--out", required=True)
    s.add_argument("--name", default="", help="the slimmed model's name (default efficientformer_slim_<T>ms)")
    s.add_argument("--supernet", default="",
                   help="a trained supernet (efficientformer) or full-network (efficientvit, efficientformerv2) "
                        "checkpoint: skips its training")
    s.add_argument("--supernet-config", default="", help="the model-config the --supernet was trained with")
    s.add_argument("--supernet-epochs", type=int, default=10, help="epochs of the supernet / full network")
    s.add_argument("--finetune-epochs", type=int, default=0)
    s.add_argument("--noise", default="uniform", choices=("uniform", "gumbel", "none"))
    s.add_argument("--tau-start", type=float, default=5.0)
    s.add_argument("--tau-end", type=float, default=0.5)
    s.add_argument("--raw", action="store_true", help="search on the table's raw sums, not its calibration")
    s.add_argument("--importance", choices=("alpha", "accuracy"), default=None,
                   help="price actions by the supernet's alphas (efficientformer's default), or by the accuracy "
                        "drop measured on val/ (the only one for the other families)")
    s.add_argument("--efficiency", choices=("ms", "mes"), default="ms",
                   help="efficientvit / efficientformerv2: accuracy lost per ms saved, or per unit of "
                        "EfficientFormerV2's Mean Efficiency Score gained (latency and parameters)")
    s.add_argument("--mes-alphas", type=float, nargs=2, default=(0.5, 0.5), metavar=("LATENCY", "PARAMS"),
                   help="the MES weights of latency and parameters")
    s.add_argument("--importance-metric", choices=("loss", "top1"), default="loss",
                   help="with --importance accuracy: validation loss (smooth) or top-1 (the paper's)")
    s.add_argument("--calib-batches", type=int, default=4, help="training batches for BatchNorm re-estimation")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                   help="time the slimmed network on the table's backend (when it runs here)")
    s.add_argument("--measure-reps", type=int, default=50)
    s.add_argument("--refine-rounds", type=int, default=3,
                   help="measure the found network and search again to a corrected target while it misses by more "
                        "than --refine-tol, at most this many measurements (0: the table alone, as the paper)")
    s.add_argument("--refine-tol", type=float, default=0.05, help="the refinement's tolerance, a fraction of the target")
    s.set_defaults(func=_cmd_slim)
