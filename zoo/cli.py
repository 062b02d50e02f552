"""The ``zoo`` command (also ``python -m zoo``).

Every subcommand is a function taking parsed arguments and returning an exit status. A
`ZooError` is printed as ``error: <message>`` without a traceback, with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from zoo.errors import ZooError

__all__ = ["main", "build_parser"]


def _cmd_list(args) -> int:
    from zoo.registry import list_models
    from zoo.tables import MODEL_HEADERS, format_table, model_rows

    names = list_models(args.pattern, task=args.task)
    if args.format == "json":
        from zoo.registry import model_card

        print(json.dumps([model_card(n).to_dict() for n in names], indent=2))
    elif args.format == "names":
        print("\n".join(names))
    else:
        print(format_table(model_rows(names), MODEL_HEADERS, args.format))
    return 0


def _cmd_info(args) -> int:
    from zoo.registry import model_card

    print(json.dumps(model_card(args.name).to_dict(), indent=2))
    return 0


def _cmd_download(args) -> int:
    from zoo.errors import UnknownModelError
    from zoo.hub import fetch
    from zoo.io import sha256_file
    from zoo.registry import model_card

    card = model_card(args.name)
    tag = args.tag or card.default_tag
    if tag is None:
        raise UnknownModelError(f"{args.name} has no default weights; choose one with --tag: {sorted(card.weights)}")
    if tag not in card.weights:
        raise UnknownModelError(f"{args.name} has no weights tagged {tag!r}; tags: {sorted(card.weights) or 'none'}")
    path = fetch(args.name, card.weights[tag], progress=sys.stderr.isatty())
    print(f"{path}\nsha256 {sha256_file(path)}")
    return 0


def _cmd_demo(args) -> int:
    """Build every registered model on CPU and report params, MACs and one forward's time."""
    import torch

    from zoo.flops import complexity
    from zoo.io import atomic_write_json
    from zoo.registry import create_model, list_models, model_card
    from zoo.tables import format_table, human_count

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list_models()
    print(f"zoo: {len(names)} registered models\n")
    rows, report = [], {}
    for name in names:
        card = model_card(name)
        model = create_model(name)
        inputs = card.input.example(batch_size=1)
        with torch.inference_mode():
            start = time.perf_counter()
            y = model(*inputs)
            ms = (time.perf_counter() - start) * 1e3
        cx = complexity(name)
        rows.append((name, card.family, human_count(cx["params"]), human_count(cx["macs"]), tuple(y.shape), f"{ms:.1f}"))
        report[name] = {**cx, "output_shape": list(y.shape), "first_forward_ms": ms}
    print(format_table(rows, ("model", "family", "params", "MACs", "output", "first forward ms")))
    atomic_write_json(out / "models.json", report)
    print(f"\nwrote {out / 'models.json'}")
    _demo_finetune_and_export(out)
    _demo_render(out)
    _demo_psf(out)
    return 0


def _demo_psf(out: Path) -> None:
    """Sample 16 shapes in one step with psf_tiny's shipped weights and write them with a PNG grid."""
    from zoo.pointclouds import save_clouds
    from zoo.registry import create_model, model_card

    if model_card("psf_tiny").default_tag is None:
        print("\npsf_tiny has no shipped weights in this checkout (run benchmarks/train_psf_tiny.py); skipped")
        return
    model = create_model("psf_tiny", pretrained=True)
    start = time.perf_counter()
    clouds = model.sample(16, steps=1, seed=0)
    ms = (time.perf_counter() - start) * 1e3
    save_clouds(out / "psf_samples", clouds.numpy())
    print(f"\nsampled 16 point clouds ({model.num_points} points) with psf_tiny in one step ({ms:.0f} ms): "
          f"{out / 'psf_samples' / 'samples.png'}")


def _demo_render(out: Path) -> None:
    """Render two interpenetrating translucent capsules with zoo.render (torch backend) to a PNG."""
    import numpy as np
    import torch
    from PIL import Image

    import zoo.render as R
    from zoo.io import atomic_write

    verts, tri = R.capsule(segments=48, rings=32)
    tilt = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # second shell lies across
    shells = [verts, verts @ tilt.T * 0.9]
    normals = [v / v.norm(dim=1, keepdim=True) for v in shells]
    pos_w = torch.cat(shells)
    tri_all = torch.cat([tri, tri + verts.shape[0]])
    colour = torch.cat([torch.tensor([0.95, 0.55, 0.2]).expand(len(verts), 3),
                        torch.tensor([0.2, 0.6, 0.95]).expand(len(verts), 3)])
    view = R.look_at((1.2, 1.0, 3.2), (0.0, 0.0, 0.0))
    pos = R.world_to_clip(pos_w, view, R.perspective(40, 1.0, 0.5, 10))
    light = torch.nn.functional.normalize(torch.tensor([0.5, 0.8, 1.0]), dim=0)
    attr = torch.cat([colour, torch.cat(normals)], 1)
    start = time.perf_counter()
    layers = []
    for rast, _ in R.depth_peel(pos, tri_all, (384, 384), 4, backend="torch"):
        a, _ = R.interpolate(attr, rast, tri_all, backend="torch")
        n = torch.nn.functional.normalize(a[..., 3:], dim=-1)
        shade = a[..., :3] * (0.35 + 0.65 * (n @ light).abs().unsqueeze(-1))
        rgba = torch.cat([shade, (rast[..., 3:] > 0).float() * 0.55], -1)
        layers.append(R.antialias(rgba, rast, pos, tri_all, backend="torch"))
    img = R.composite(layers, background=torch.ones(3))[0, ..., :3]
    ms = (time.perf_counter() - start) * 1e3
    pixels = (img.flip(0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # row 0 is the bottom
    path = out / "render_shells.png"
    with atomic_write(path, "wb") as f:
        Image.fromarray(np.ascontiguousarray(pixels)).save(f, format="PNG")
    print(f"\nrendered two interpenetrating translucent shells ({tri_all.shape[0]} triangles, 4 depth-peeled "
          f"layers, antialiased, 384x384) with the torch backend in {ms:.0f} ms: {path}")


def _demo_finetune_and_export(out: Path) -> None:
    """Fine-tune efficientvit_m0 on the built-in pattern images for a few epochs, then export it."""
    from zoo.export import to_coreml, to_onnx
    from zoo.registry import create_model
    from zoo.train import parse_train_args, run_train
    from zoo.train.synthetic import make_pattern_folder

    data = make_pattern_folder(out / "patterns", num_classes=2, train_per_class=32, val_per_class=12, size=32)
    print(f"\nfine-tuning efficientvit_m0 on {data} (2 synthetic pattern classes, 32x32, 6 epochs, CPU)")
    best = run_train(parse_train_args([
        "--model", "efficientvit_m0", "--data-dir", str(data), "--img-size", "32", "-b", "8", "--lr", "3e-3",
        "--epochs", "6", "--workers", "0", "--scale", "0.6", "1.0", "--color-jitter", "0", "--smoothing", "0",
        "--log-interval", "0", "--output", str(out), "--experiment", "finetune", "--device", "cpu"]))
    ckpt = out / "finetune" / "model_best.pth.tar"
    model = create_model("efficientvit_m0", pretrained=str(ckpt), num_classes=2, img_size=32)
    onnx_r = to_onnx(model, out / "export" / "efficientvit_m0_patterns.onnx", verbose=False)
    coreml_r = to_coreml(model, out / "export" / "efficientvit_m0_patterns.mlpackage",
                         class_labels=["hstripes", "vstripes"], verbose=False)
    worst = max(c.rel_diff for c in onnx_r.comparisons)
    print(f"best val top-1 {best['top1']:.1f}% (chance 50%) at epoch {best['epoch']}; checkpoint {ckpt}")
    print(f"exported {onnx_r.path} (onnxruntime vs torch rel diff {worst:.1e})")
    print(f"exported {coreml_r.path} (structural checks: {len(coreml_r.checks)} passed)")


def _cmd_export(args) -> int:
    """Export one model to every asked format; publish all files and the report together."""
    import shutil

    import torch

    import zoo
    from zoo.errors import ConfigError
    from zoo.export import to_coreml, to_onnx
    from zoo.export.files import make_stage, publish
    from zoo.io import atomic_write_json
    from zoo.registry import model_card
    from zoo.tables import format_table

    card = model_card(args.name)  # unknown names fail before anything is written
    if args.batch_size is not None and args.dynamic_batch:
        raise ConfigError("--batch-size fixes the batch; --dynamic-batch leaves it free: choose one.")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1.")
    shape = None
    if card.input.kind != "image" and args.img_size is not None:
        raise ConfigError(f"--img-size is for image models; {args.name} takes {card.input.kind} {card.input.shape}.")
    if card.input.kind != "image" and args.batch_size is not None:
        shape = (args.batch_size, *card.input.shape)
    elif args.img_size is not None or args.batch_size is not None:
        c, h, w = card.input.shape
        if args.img_size is not None:
            h = w = args.img_size
        shape = (args.batch_size or 1, c, h, w)
    out = Path(args.out)
    stage = make_stage(out)
    reports = []
    try:
        for fmt in dict.fromkeys(args.format):
            if fmt == "onnx":
                r = to_onnx(args.name, stage / f"{args.name}.onnx", pretrained=args.pretrained, input_shape=shape,
                            opset=args.opset, dynamic_batch=args.batch_size is None, exporter=args.exporter,
                            fp16=args.fp16, reparam=not args.no_reparam, verbose=False)
            else:
                labels = args.class_labels
                r = to_coreml(args.name, stage / f"{args.name}.mlpackage", pretrained=args.pretrained,
                              input_shape=shape, precision="fp16" if args.fp16 else args.coreml_precision,
                              image_input=not args.tensor_input, class_labels=labels,
                              minimum_target=args.coreml_target, reparam=not args.no_reparam, verbose=False)
            reports.append(r)
        for r in reports:
            r.relocate(stage, Path("."))  # the report lists files relative to its own folder
        atomic_write_json(stage / "export-report.json", {
            "model": args.name, "pretrained": args.pretrained, "zoo_version": zoo.__version__,
            "torch_version": torch.__version__, "exports": [r.to_dict() for r in reports],
        })
        publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    rows = []
    for r in reports:
        worst = max((c.rel_diff for c in r.comparisons), default=None)
        batches = ",".join(str(c.batch_size) for c in r.comparisons)
        check = f"rel {worst:.1e} at batch {batches}" if worst is not None else "structural only"
        size = sum(f["bytes"] for f in r.files) / 1e6
        rows.append((r.format, str(out / r.path), f"{size:.1f}", r.precision, check, f"{r.seconds:.1f}"))
    print(format_table(rows, ("format", "file", "MB", "precision", "verification", "seconds")))
    print(f"\nwrote {out / 'export-report.json'}")
    return 0


def _cmd_benchmark(args) -> int:
    from zoo.benchmark import benchmark
    from zoo.io import atomic_write
    from zoo.tables import format_table, human_count

    headers = ["model", "backend", "params", "MACs", "batch", "median ms", "p90 ms", "img/s"]
    if args.compare:
        headers += ["timm median ms", "timm p90 ms", "zoo/timm"]
    rows = []

    def row(r):
        cells = [r.model, r.backend, human_count(r.params), human_count(r.macs), str(r.batch_size),
                 f"{r.median_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.throughput:.1f}"]
        if args.compare:
            cells += [f"{r.peer_median_ms:.2f}", f"{r.peer_p90_ms:.2f}", f"{r.ratio:.2f}"]
        return cells

    def progress(r):
        if not args.quiet and args.format == "table":
            print(f"  {r.model} on {r.backend}: {r.median_ms:.2f} ms" + (
                f" (timm {r.peer_median_ms:.2f} ms, ratio {r.ratio:.2f}, outputs agree to {r.max_rel_diff:.1e})"
                if r.ratio is not None else ""), file=sys.stderr)

    results = []
    for backend in dict.fromkeys(args.backend):
        results += benchmark(args.names, backend=backend, threads=args.threads, batch_size=args.batch_size,
                             img_size=args.img_size, compare=args.compare, reps=args.reps, warmup=args.warmup,
                             dtype=args.dtype, channels_last=args.channels_last, progress=progress)
    rows = [row(r) for r in results]
    import torch

    if args.format == "table":
        print(f"torch {torch.__version__}, {results[0].threads} threads, fp32 unless noted; "
              f"{args.reps} interleaved rounds after {args.warmup} warm-up calls")
    if args.format == "json":
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(format_table(rows, headers, args.format))
    if args.csv:
        import csv

        with atomic_write(args.csv, "w") as f:
            w = csv.DictWriter(f, fieldnames=list(results[0].to_dict()))
            w.writeheader()
            for r in results:
                w.writerow(r.to_dict())
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0


def _cmd_train(args) -> int:
    from zoo.train.cli import _apply_config, add_train_arguments, run_train

    p = argparse.ArgumentParser(prog="zoo train")
    add_train_arguments(p)
    run_train(_apply_config(p, args.rest))
    return 0


def _cmd_validate(args) -> int:
    from zoo.train.cli import run_validate

    run_validate(args)
    return 0


def _generator(args):
    """The point cloud generator named in `args`, with weights (``--random`` allows none)."""
    from zoo.errors import ConfigError
    from zoo.registry import create_model, model_card

    card = model_card(args.name)
    if card.task != "point-cloud-generation":
        raise ConfigError(f"{args.name} is not a point cloud generator (its task is {card.task}); sample and "
                          f"evaluate take {', '.join(_names('point-cloud-generation'))}.")
    pretrained = args.pretrained if args.pretrained is not None else (True if card.default_tag else False)
    if pretrained is False and not args.random:
        raise ConfigError(f"{args.name} has no default weights; pass --pretrained FILE (a checkpoint from the PSF "
                          "stages) or --random to sample from an untrained network.")
    return create_model(args.name, pretrained=pretrained)


def _names(task: str) -> list[str]:
    from zoo.registry import list_models

    return list_models(task=task)


def _sample_args(s) -> None:
    s.add_argument("name")
    s.add_argument("--pretrained", default=None, help="weight tag or checkpoint file (default: the model's weights)")
    s.add_argument("--random", action="store_true", help="allow an untrained network (no weights)")
    s.add_argument("--steps", type=int, default=1, help="Euler steps (default 1: the distilled one-step map)")
    s.add_argument("--method", choices=("euler", "rk45"), default="euler")
    s.add_argument("--seed", type=int, default=0)


def _cmd_sample(args) -> int:
    import time as _time

    from zoo.errors import ConfigError
    from zoo.pointclouds import save_clouds

    if args.num < 1 or args.steps < 1:
        raise ConfigError("--num and --steps must be at least 1.")
    model = _generator(args)
    start = _time.perf_counter()
    clouds = model.sample(args.num, steps=args.steps, method=args.method, seed=args.seed)
    ms = (_time.perf_counter() - start) * 1e3
    written = save_clouds(args.out, clouds.numpy())
    how = f"{args.steps}-step Euler" if args.method == "euler" else "adaptive RK45"
    print(f"{args.name}: {args.num} clouds of {model.num_points} points, {how}, {ms:.0f} ms; "
          f"wrote {len(written)} files to {args.out} (grid: {Path(args.out) / 'samples.png'})")
    return 0


def _cmd_evaluate(args) -> int:
    import numpy as np
    import torch

    from zoo.errors import ConfigError, DataError
    from zoo.io import atomic_write_json
    from zoo.metrics import compute_all_metrics
    from zoo.tables import format_table

    model = _generator(args)
    n = model.num_points
    if args.ref == "procedural":
        from zoo.train.pointcloud_data import procedural_references

        refs = procedural_references(args.num, n, seed=args.ref_seed)
    else:
        ref = Path(args.ref)
        files = [ref] if ref.is_file() else sorted(ref.glob("*.npy"))
        if not files:
            raise DataError(f"{ref} holds no .npy reference clouds ([N,3] per file or one [K,N,3] file).")
        arrays = [np.load(f) for f in files]
        refs = torch.from_numpy(np.concatenate([a[None] if a.ndim == 2 else a for a in arrays])).float()
        if refs.shape[1:] != (n, 3):
            raise ConfigError(f"reference clouds are {tuple(refs.shape[1:])}; {args.name} makes ({n}, 3).")
    samples = model.sample(len(refs), steps=args.steps, method=args.method, seed=args.seed)
    m = compute_all_metrics(samples, refs)
    print(format_table([(k, f"{v:.4g}") for k, v in m.items()], ("metric", "value")))
    if args.json:
        atomic_write_json(args.json, {"model": args.name, "steps": args.steps, "method": args.method,
                                      "num": len(refs), "ref": args.ref, "metrics": m})
    return 0


def build_parser() -> argparse.ArgumentParser:
    from zoo import __version__

    p = argparse.ArgumentParser(prog="zoo", description="An efficient vision and 3D generation model zoo.")
    p.add_argument("--version", action="version", version=f"zoo {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list", help="list registered models")
    s.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern, e.g. 'efficientvit_*'")
    s.add_argument("--task", default=None, help="only models for this task, e.g. image-classification")
    s.add_argument("--format", choices=("table", "json", "markdown", "names"), default="table")
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser("info", help="print a model card as JSON")
    s.add_argument("name")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("download", help="fetch a model's weights into the cache; print path and sha256")
    s.add_argument("name")
    s.add_argument("--tag", default=None, help="weight tag (default: the model's default weights)")
    s.set_defaults(func=_cmd_download)

    s = sub.add_parser("demo", help="the main job on built-in data: build every model, report, write results")
    s.add_argument("--out", default="demo-output", help="folder for results (default: demo-output)")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("export", help="export a model to ONNX and/or CoreML, verified, with export-report.json")
    s.add_argument("name")
    s.add_argument("--pretrained", default=None, help="weight tag or local file (default: random init)")
    s.add_argument("--format", nargs="+", choices=("onnx", "coreml"), default=["onnx", "coreml"])
    s.add_argument("--out", required=True, help="output folder; files appear only when every export passed")
    s.add_argument("--img-size", type=int, default=None, help="square input side (default: the model's)")
    s.add_argument("--batch-size", type=int, default=None, help="fixed batch size (default: dynamic for ONNX, 1 for CoreML)")
    s.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension in ONNX (the default)")
    s.add_argument("--opset", type=int, default=18, help="ONNX opset (dynamo: 18+, torchscript: 7-20)")
    s.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="auto: the one the model names (PSF: torchscript), else dynamo")
    s.add_argument("--fp16", action="store_true", help="fp16 ONNX (float16 input/output) and fp16 CoreML")
    s.add_argument("--coreml-precision", choices=("fp16", "fp32"), default="fp16",
                   help="CoreML compute precision when --fp16 is not given (default fp16, as the Neural Engine runs)")
    s.add_argument("--coreml-target", default="iOS16", help="minimum deployment target (iOS15 or newer)")
    s.add_argument("--class-labels", default=None, help="text file, one label per line: CoreML classifier output")
    s.add_argument("--tensor-input", action="store_true", help="CoreML takes a normalised tensor instead of an image")
    s.add_argument("--no-reparam", action="store_true", help="export the training form (no BatchNorm folding)")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("benchmark", help="params, MACs, latency and throughput; --compare timm for the ratio")
    s.add_argument("names", nargs="+", help="model names, family names or patterns")
    s.add_argument("--backend", nargs="+", choices=("torch", "onnxruntime", "cuda"), default=["torch"])
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's setting)")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--img-size", type=int, default=None)
    s.add_argument("--compare", choices=("timm",), default=None, help="time timm's model too, interleaved")
    s.add_argument("--reps", type=int, default=100)
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="cuda backend only")
    s.add_argument("--channels-last", action="store_true", help="cuda backend only")
    s.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    s.add_argument("--csv", default=None, help="also write every figure to this CSV file")
    s.add_argument("--quiet", action="store_true", help="no per-model progress lines")
    s.set_defaults(func=_cmd_benchmark)

    # `zoo train` re-parses its arguments itself, so a YAML --config can supply defaults.
    s = sub.add_parser("train", help="fine-tune a model with timm's train.py flags (also under torchrun)",
                       add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="generate point clouds: .npy, .ply and a PNG grid")
    _sample_args(s)
    s.add_argument("--num", type=int, default=16)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_sample)

    s = sub.add_parser("evaluate", help="MMD/COV/1-NNA (CD, EMD) and JSD of generated clouds against references")
    _sample_args(s)
    s.add_argument("--ref", default="procedural", help="'procedural' (built-in shapes) or a folder/file of .npy clouds")
    s.add_argument("--num", type=int, default=32, help="number of procedural references (and samples)")
    s.add_argument("--ref-seed", type=int, default=1234, help="seed of the procedural references")
    s.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("validate", help="top-1/top-5 of a checkpoint on an image folder")
    from zoo.train.cli import add_validate_arguments

    add_validate_arguments(s)
    s.set_defaults(func=_cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser (YAML --config defaults); argparse's REMAINDER drops flags
        args = argparse.Namespace(func=_cmd_train, rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ZooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
