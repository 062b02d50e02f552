"""`zoo sample` and `zoo evaluate`: point cloud generation and its metrics."""
from __future__ import annotations

from pathlib import Path


def _generator(args, tasks=("point-cloud-generation",)):
    """The generator named in `args`, with weights (``--random`` allows none)."""
    from zoo.errors import ConfigError
    from zoo.registry import create_model, model_card

    card = model_card(args.name)
    if card.task not in tasks:
        names = [n for t in tasks for n in _names(t)]
        raise ConfigError(f"{args.name} is not a generator zoo {args.cmd} runs (its task is {card.task}); it takes "
                          f"{', '.join(names)}.")
    pretrained = args.pretrained if args.pretrained is not None else (True if card.default_tag else False)
    if pretrained is False and not args.random:
        raise ConfigError(f"{args.name} has no default weights; pass --pretrained FILE (a checkpoint) or --random "
                          "to sample from an untrained network.")
    if pretrained is False:
        import torch

        with torch.random.fork_rng():  # an untrained network drawn from --seed: the same one every run
            torch.manual_seed(args.seed)
            return create_model(args.name, pretrained=False)
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
    from zoo.data.pointcloud_io import save_clouds

    model = _generator(args, ("point-cloud-generation", "3d-human-generation"))
    humans = not hasattr(model, "num_points")
    args.num = (4 if humans else 16) if args.num is None else args.num
    if args.num < 1 or args.steps < 1:
        raise ConfigError("--num and --steps must be at least 1.")
    if humans:
        from zoo.cli.sample_humans import sample_humans

        return sample_humans(args, model)
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
    from zoo.registry import model_card
    from zoo.tables import format_table

    if model_card(args.name).task == "3d-human-generation":
        from zoo.cli.sample_humans import evaluate_humans

        return evaluate_humans(args, _generator(args, ("3d-human-generation",)))
    if args.num < 2:
        raise ConfigError("--num must be at least 2: 1-NNA and coverage compare each cloud with the others, "
                          "so one sample and one reference give a degenerate figure.")
    model = _generator(args)
    n = model.num_points
    if args.ref == "procedural":
        from zoo.data.pointclouds import procedural_references

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


def register(sub) -> None:
    s = sub.add_parser("sample", help="generate point clouds (.npy, .ply, a PNG grid) or layered-surface humans "
                                      "(a PNG grid of views, a turntable GIF, skinned GLB files)")
    _sample_args(s)
    s.add_argument("--num", type=int, default=None, help="samples (default 16 clouds, 4 humans)")
    s.add_argument("--out", required=True)
    h = s.add_argument_group("layered-surface humans (lsv_*)")
    h.add_argument("--pose", default="rest", help="rest, walk, or a .npy of axis-angles [24, 3], [72] or [P, 24, 3]")
    h.add_argument("--views", type=int, default=4, help="cameras around the body (default 4)")
    h.add_argument("--psi", type=float, default=1.0, help="truncation psi (1: none)")
    h.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    s.set_defaults(func=_cmd_sample, cmd="sample")

    s = sub.add_parser("evaluate", help="MMD/COV/1-NNA (CD, EMD) and JSD of generated clouds against references; "
                                        "FID/KID, silhouette IoU and multi-view consistency of generated humans")
    _sample_args(s)
    s.add_argument("--ref", default="procedural", help="'procedural' (built-in shapes) or a folder/file of .npy clouds")
    s.add_argument("--num", type=int, default=32, help="number of procedural references (and samples)")
    s.add_argument("--ref-seed", type=int, default=1234, help="seed of the procedural references")
    s.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    h = s.add_argument_group("layered-surface humans (lsv_*); --data-dir: a dataset.json folder (default: built-in)")
    h.add_argument("--features", choices=("small", "inception"), default="small",
                   help="FID/KID features: zoo's small fixed network, or InceptionV3 from a local file")
    h.add_argument("--inception", default=None, help="InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth)")
    h.add_argument("--img-size", type=int, default=64, help="built-in data: image size (default 64)")
    s.set_defaults(func=_cmd_evaluate, cmd="evaluate")
