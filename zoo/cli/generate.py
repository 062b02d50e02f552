"""`zoo sample`, `zoo evaluate` and `zoo complete`: point cloud generation, its metrics, completion."""
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
    if humans and (args.prompt is not None or args.clip is not None):
        raise ConfigError(f"--prompt/--clip steer point cloud generators (psf_*); {args.name} takes none.")
    if humans:
        from zoo.cli.sample_humans import sample_humans

        return sample_humans(args, model)
    if args.prompt is not None or args.clip is not None:
        return _sample_guided(args, model)
    start = _time.perf_counter()
    clouds = model.sample(args.num, steps=args.steps, method=args.method, seed=args.seed)
    ms = (_time.perf_counter() - start) * 1e3
    written = save_clouds(args.out, clouds.numpy())
    how = f"{args.steps}-step Euler" if args.method == "euler" else "adaptive RK45"
    print(f"{args.name}: {args.num} clouds of {model.num_points} points, {how}, {ms:.0f} ms; "
          f"wrote {len(written)} files to {args.out} (grid: {Path(args.out) / 'samples.png'})")
    return 0


def _sample_guided(args, model) -> int:
    """``--prompt`` with ``--clip``: one-step samples whose noise climbed the CLIP score of the prompt."""
    import time as _time

    from zoo.data.pointcloud_io import save_clouds
    from zoo.errors import ConfigError
    from zoo.io import atomic_write_json
    from zoo.models.psf.guidance import load_clip, text_guided_sample

    if args.prompt is None:
        raise ConfigError("--clip is for text guidance: add --prompt \"a chair\" (or drop --clip).")
    if args.clip is None:
        raise ConfigError("--prompt needs CLIP weights, which zoo never downloads: pass --clip DIR (a folder with "
                          "open_clip_config.json and its weights, e.g. an open_clip model from the Hugging Face Hub "
                          "downloaded beforehand) or --clip FILE --clip-arch ViT-B-32 (an open_clip checkpoint).")
    if args.steps != 1 or args.method != "euler":
        raise ConfigError("text guidance steers the one-step generator: drop --steps/--method.")
    if args.guidance_steps < 0:
        raise ConfigError("--guidance-steps must be at least 0.")
    encoder = load_clip(args.clip, args.clip_arch)
    start = _time.perf_counter()
    result = text_guided_sample(model, encoder, args.prompt, num=args.num, steps=args.guidance_steps,
                                lr=args.guidance_lr, seed=args.seed)
    ms = (_time.perf_counter() - start) * 1e3
    written = save_clouds(args.out, result.points.numpy())
    sim = result.similarity
    atomic_write_json(Path(args.out) / "guidance.json", {
        "model": args.name, "prompt": args.prompt, "clip": str(args.clip), "clip_arch": args.clip_arch,
        "guidance_steps": args.guidance_steps, "lr": args.guidance_lr, "seed": args.seed,
        "similarity_per_step": sim.mean(1).tolist(), "similarity_per_cloud": sim.T.tolist()})
    print(f"{args.name}: {args.num} clouds guided by {args.prompt!r} ({args.guidance_steps} steps, {ms:.0f} ms); "
          f"CLIP similarity {sim[0].mean():.4f} -> {sim[-1].mean():.4f} (best kept per cloud: "
          f"{sim.max(0).values.mean():.4f}); wrote {len(written)} files and guidance.json to {args.out}")
    return 0


def _cmd_complete(args) -> int:
    """A partial cloud (``--input``) completed by a completion model: ``.npy``/``.ply`` and a PNG."""
    import time as _time

    import numpy as np

    from zoo.data.humans_io import save_png
    from zoo.data.pointcloud_io import read_cloud, render_grid, save_clouds
    from zoo.errors import ConfigError
    from zoo.io import atomic_write_json

    if args.num < 1 or args.steps < 1:
        raise ConfigError("--num and --steps must be at least 1.")
    partial = read_cloud(args.input)  # read and checked before the model is built
    model = _generator(args, ("point-cloud-completion",))
    start = _time.perf_counter()
    clouds = model.complete(partial, steps=args.steps, seed=args.seed, num=args.num)
    ms = (_time.perf_counter() - start) * 1e3
    out = Path(args.out)
    written = save_clouds(out, clouds.numpy(), prefix="completion", grid=False)
    cells = [partial] + list(clouds.numpy())
    labels = [f"partial ({len(partial)} points)"] + [f"completed {i}" for i in range(args.num)]
    save_png(out / "completion.png", np.asarray(render_grid(cells, cols=len(cells), labels=labels, shared_frame=True,
                                                            highlight=[0] + [model.num_given] * args.num)))
    atomic_write_json(out / "completion.json", {
        "model": args.name, "input": str(args.input), "input_points": int(len(partial)), "steps": args.steps,
        "seed": args.seed, "num": args.num, "given_points": model.num_given, "output_points": model.num_points,
        "ms": ms, "note": f"each completed cloud starts with the {model.num_given} given points "
                          "(the input, resampled), then the generated ones"})
    # every input point's distance to the nearest output point, against the output's extent
    done = clouds[0].numpy()
    gap = np.sqrt(((partial[:, None] - done[None]) ** 2).sum(-1)).min(1).max()
    extent = float(np.linalg.norm(done.max(0) - done.min(0)))
    print(f"{args.name}: {len(partial)} given points -> {args.num} cloud(s) of {model.num_points} points, "
          f"{args.steps}-step Euler, {ms:.0f} ms; wrote {len(written) + 2} files to {out} "
          f"(picture: {out / 'completion.png'}); every input point lies within {gap:.3g} of the output "
          f"({gap / max(extent, 1e-12):.1%} of its extent)")
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
    t = s.add_argument_group("text guidance (point cloud generators; needs CLIP weights you provide)")
    t.add_argument("--prompt", default=None, help="steer the one-step samples toward this text")
    t.add_argument("--clip", default=None, help="an open_clip model folder (open_clip_config.json + weights), or a "
                                                "checkpoint file with --clip-arch; nothing is downloaded")
    t.add_argument("--clip-arch", default=None, help="open_clip architecture of a --clip checkpoint file (ViT-B-32...)")
    t.add_argument("--guidance-steps", type=int, default=20, help="gradient steps on the noise (default 20)")
    t.add_argument("--guidance-lr", type=float, default=0.05, help="Adam learning rate on the noise")
    h = s.add_argument_group("layered-surface humans (lsv_*)")
    h.add_argument("--pose", default="rest", help="rest, walk, or a .npy of axis-angles [24, 3], [72] or [P, 24, 3]")
    h.add_argument("--views", type=int, default=4, help="cameras around the body (default 4)")
    h.add_argument("--psi", type=float, default=1.0, help="truncation psi (1: none)")
    h.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    s.set_defaults(func=_cmd_sample, cmd="sample")

    s = sub.add_parser("complete", help="complete a partial point cloud (.npy or .ply) with a completion model "
                                        "(psf_tiny_completion): .npy, .ply and a PNG of partial vs completed")
    s.add_argument("name")
    s.add_argument("--input", required=True, help="the partial cloud: .npy [M, 3] or .ply, at least 16 points")
    s.add_argument("--out", required=True)
    s.add_argument("--pretrained", default=None, help="weight tag or checkpoint file (default: the model's weights)")
    s.add_argument("--random", action="store_true", help="allow an untrained network (no weights)")
    s.add_argument("--steps", type=int, default=1, help="Euler steps (default 1: the distilled one-step map)")
    s.add_argument("--num", type=int, default=1, help="completions of the same input (different noise)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_complete, cmd="complete")

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
