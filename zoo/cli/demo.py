"""`zoo demo`: the main job on built-in data, and its content (the fine-tune recipe on the
pattern images, the rendered scene and its colours, the PSF samples), kept here rather than
in the command plumbing."""
from __future__ import annotations

import time
from pathlib import Path


def _cmd_demo(args) -> int:
    """Build every registered model on CPU and report params, MACs and one forward's time."""
    import torch

    from zoo.errors import MissingAssetError
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
        try:
            model = create_model(name)
        except MissingAssetError as e:  # lsv_smpl without the user's SMPL file
            print(f"{name}: skipped ({str(e).split(':')[0]})")
            report[name] = {"skipped": str(e)}
            continue
        inputs = card.input.example(batch_size=1)
        with torch.inference_mode():
            start = time.perf_counter()
            y = model(*inputs)
            ms = (time.perf_counter() - start) * 1e3
        cx = complexity(name)
        # a detector returns its batch dict; its output is the box set of each sample
        shape = list(y["final_box_dicts"][0]["pred_boxes"].shape) if isinstance(y, dict) else list(y.shape)
        rows.append((name, card.family, human_count(cx["params"]), human_count(cx["macs"]), tuple(shape), f"{ms:.1f}"))
        report[name] = {**cx, "output_shape": shape, "first_forward_ms": ms}
    print(format_table(rows, ("model", "family", "params", "MACs", "output", "first forward ms")))
    atomic_write_json(out / "models.json", report)
    print(f"\nwrote {out / 'models.json'}")
    demo_finetune_and_export(out)
    demo_render(out)
    demo_psf(out)
    demo_psf_completion(out)
    demo_lsv(out)
    demo_lidar(out)
    demo_slim(out)
    return 0


def demo_slim(out: Path) -> None:
    """Latency-driven slimming on a tiny EfficientFormer space: a torch latency table (1 thread,
    32 px) with its additivity report, the supernet trained on the pattern images, the search
    to halfway between the smallest architecture's predicted latency and the full supernet's,
    a short fine-tune."""
    import yaml

    from zoo.cli import build_parser
    from zoo.slim.space import EfficientFormerSpace, FormerArch
    from zoo.slim.table import LatencyTable

    widths, depths = ["32", "32", "48", "64"], ["1", "2", "3", "2"]
    folder = out / "slim"
    lut = folder / "lut.json"
    print(f"\nlatency-driven slimming of a tiny EfficientFormer space (torch, 1 thread, 32 px) -> {folder}")
    run = lambda argv: (a := build_parser().parse_args(argv)).func(a)  # noqa: E731
    run(["latency-table", "--img-size", "32", "--num-classes", "2", "--max-widths", *widths, "--max-depths", *depths,
         "--reps", "20", "--out", str(lut), "--report", "--archs", "6", "--quiet"])
    space = EfficientFormerSpace(32, tuple(map(int, widths)), tuple(map(int, depths)), num_classes=2)
    table = LatencyTable.load(lut)
    full = table.predict(space.keys(FormerArch(space.max_widths, space.max_depths, 0)))
    smallest = table.predict(space.keys(FormerArch((16,) * 4, (1,) * 4, 0)))
    run(["slim", "--target-ms", f"{smallest + 0.5 * (full - smallest):.3f}", "--lut", str(lut), "--data-dir", str(out / "patterns"),
         "--out", str(folder), "--name", "efficientformer_slim_demo", "--supernet-epochs", "3",
         "--finetune-epochs", "3", "--batch-size", "16", "--workers", "0"])
    cfg = yaml.safe_load((folder / "efficientformer_slim_demo.yaml").read_text())
    print(f"slimmed architecture {cfg['config']}, trajectory picture {folder / 'trajectory.png'}")


def demo_lsv(out: Path) -> None:
    """Layered surface volumes: the mannequin in the procedural outfit and two samples of
    lsv_mannequin (its shipped weights; an untrained network where this checkout has none), each
    in the rest and the walking pose from four cameras; the outfit also as a skinned GLB."""
    import torch

    from zoo.cli.sample_humans import write_glbs
    from zoo.data.humans_io import image_grid, save_png
    from zoo.models.lsv import standard_pose
    from zoo.models.lsv.clothing import procedural_outfit
    from zoo.registry import create_model, model_card

    start = time.perf_counter()
    trained = model_card("lsv_mannequin").default_tag is not None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("lsv_mannequin", pretrained=trained).eval()
    with torch.no_grad():
        outfit = procedural_outfit(model, size=model.texture_size, seed=0)[None]
        textures = torch.cat([outfit, model(model.noise(2, seed=0))])
        poses = torch.stack([standard_pose("rest"), standard_pose("walk")])
        mvp = model.cameras(4).expand(len(textures), -1, -1, -1)
        rows = []
        for pose in poses:
            shells = model.pose(pose[None].expand(len(textures), -1, -1))["shells"]
            rows.append(model.render(textures, shells, mvp, 160, background=torch.ones(3))[..., :3])
        images = torch.stack(rows, 1).reshape(-1, 4, 160, 160, 3)  # rows: (sample, pose)
    ms = (time.perf_counter() - start) * 1e3
    folder = out / "lsv"
    folder.mkdir(parents=True, exist_ok=True)
    save_png(folder / "outfit_and_samples.png", image_grid(images.numpy()))
    write_glbs(model, [(folder / "outfit_walk.glb", outfit[0], poses[1])])
    kind = "trained" if trained else "untrained"
    print(f"\nrendered the 5-shell mannequin in the procedural outfit and 2 {kind} lsv_mannequin samples, "
          f"rest and walking, 4 views ({ms:.0f} ms): {folder / 'outfit_and_samples.png'}, "
          f"{folder / 'outfit_walk.glb'}")


def demo_lidar(out: Path) -> None:
    """LiDAR detection on the synthetic KITTI world: a short training run from scratch, then the
    shipped pathfusion_lidar_tiny weights (when this checkout has them) evaluated on held-out
    frames, and a picture of their boxes on one frame."""
    from zoo.cli.train import parse_train_args, run_train
    from zoo.data.kitti_synth import write_world
    from zoo.registry import model_card

    start = time.perf_counter()
    world = write_world(out / "kitti_synth", 12, seed=5, val_fraction=0.25, max_range=36.0)
    print(f"\nwrote a synthetic KITTI world of 12 frames (LiDAR, rendered camera, labels) to {world} "
          f"in {time.perf_counter() - start:.0f} s")
    best = run_train(parse_train_args([
        "--model", "pathfusion_lidar_tiny", "--data-dir", str(world), "--epochs", "3", "-b", "3", "--gt-sample", "none",
        "--log-interval", "0", "--output", str(out), "--experiment", "lidar_train", "--device", "cpu"]))
    import csv

    with open(out / "lidar_train" / "summary.csv") as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f)]
    print(f"trained pathfusion_lidar_tiny from scratch for 3 epochs on 9 frames: loss {losses[0]:.2f} -> "
          f"{losses[-1]:.2f} (Car 3D AP {best['Car_3d_moderate']:.1f}: three epochs are a smoke run)")
    if model_card("pathfusion_lidar_tiny").default_tag is None:
        print("pathfusion_lidar_tiny has no shipped weights in this checkout (run benchmarks/train_lidar_tiny.py); "
              "skipped its evaluation")
        return
    from zoo.cli import main
    from zoo.data.kitti_dataset import KittiDetection
    from zoo.registry import create_model
    from zoo.train.detection import evaluate_detector, summarize

    model = create_model("pathfusion_lidar_tiny", pretrained=True)
    val = KittiDetection(world, "val", model.class_names, model.point_cloud_range)
    summary = summarize(evaluate_detector(model, val), ["Car", "Pedestrian", "Cyclist"])
    print(f"shipped pathfusion_lidar_tiny weights on the {len(val)} held-out frames: Car BEV AP "
          f"{summary['Car_bev_moderate']:.1f}, 3D AP {summary['Car_3d_moderate']:.1f} (R40, moderate; with fewer than "
          "40 objects KITTI's R40 cannot reach 100, see docs/results/lidar_tiny_training.md for 80 frames)")
    main(["detect", "pathfusion_lidar_tiny", "--frame", str(world / "training"), "--index", val.ids[-1],
          "--out", str(out / "lidar_detect")])


def demo_psf(out: Path) -> None:
    """Sample 16 shapes in one step with psf_tiny's shipped weights and write them with a PNG grid."""
    from zoo.data.pointcloud_io import save_clouds
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


def demo_psf_completion(out: Path) -> None:
    """Complete four cut procedural shapes (held out from training) in one step with psf_tiny_completion."""
    import numpy as np

    from zoo.data.humans_io import save_png
    from zoo.data.pointcloud_io import render_grid
    from zoo.data.pointclouds import ProceduralShapes, crop_half
    from zoo.registry import create_model, model_card

    if model_card("psf_tiny_completion").default_tag is None:
        print("\npsf_tiny_completion has no shipped weights in this checkout "
              "(run benchmarks/train_psf_tiny_completion.py); skipped")
        return
    model = create_model("psf_tiny_completion", pretrained=True)
    shapes = ProceduralShapes(4, tr_sample_size=512, te_sample_size=512, seed=2026, random_subsample=False)
    rng = np.random.default_rng(0)
    partials = [crop_half(shapes.points[i, :shapes.half], rng.normal(size=3)) for i in range(4)]
    start = time.perf_counter()
    done = [model.complete(p, steps=1, seed=i)[0].numpy() for i, p in enumerate(partials)]
    ms = (time.perf_counter() - start) * 1e3
    cells = [c for pair in zip(partials, done) for c in pair]
    labels = [t for i in range(4) for t in (f"partial {i} ({len(partials[i])} pts)", f"completed {i}")]
    dest = save_png(out / "psf_completion.png", np.asarray(
        render_grid(cells, cols=4, labels=labels, highlight=[0, model.num_given] * 4, shared_frame=True)))
    print(f"completed 4 cut shapes in one step each with psf_tiny_completion ({ms:.0f} ms in all): {dest}")


def demo_render(out: Path) -> None:
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


def demo_finetune_and_export(out: Path) -> None:
    """Fine-tune efficientvit_m0 on the built-in pattern images for a few epochs, then export it
    (ONNX, CoreML, and int8 ONNX checked against fp32 on the held-out images)."""
    from zoo.export import to_coreml, to_onnx
    from zoo.registry import create_model, model_card
    from zoo.cli.train import parse_train_args, run_train
    from zoo.data.patterns import make_pattern_folder

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
    from zoo.cli.export import _quant_rule
    from zoo.data.images import ImageFolder, eval_transform
    from zoo.export import quantize_onnx

    transform = eval_transform(model_card("efficientvit_m0").input, 32)
    train, val = ImageFolder(data, "train", transform), ImageFolder(data, "val", transform)
    q = quantize_onnx(onnx_r.path, out / "export" / "efficientvit_m0_patterns.int8.onnx",
                      [train[i][0][None].numpy() for i in range(len(train))],
                      [val[i][0][None].numpy() for i in range(len(val))], labels=[val[i][1] for i in range(len(val))],
                      rule=_quant_rule("efficientvit_m0"), min_agreement=0.0)
    print(f"int8 {q.path}: top-1 agrees with fp32 on {q.top1_agreement:.0%} of {q.val_images} held-out images; "
          f"top-1 {q.top1_fp32:.1f}% fp32, {q.top1_int8:.1f}% int8")


def register(sub) -> None:
    s = sub.add_parser("demo", help="the main job on built-in data: build every model, report, write results")
    s.add_argument("--out", default="demo-output", help="folder for results (default: demo-output)")
    s.set_defaults(func=_cmd_demo)
