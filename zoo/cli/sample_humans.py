"""`zoo sample` for layered-surface-volume humans: a PNG grid of views, a turntable GIF and one
skinned, textured GLB per sample (and pose)."""
from __future__ import annotations

import io
import time
from pathlib import Path

GIF_FRAMES = 24


def sample_humans(args, model) -> int:
    import numpy as np
    import torch

    from zoo.data.humans_io import image_grid, save_gif, save_png
    from zoo.errors import ConfigError
    from zoo.io import atomic_write
    from zoo.models.lsv import load_pose

    if args.views < 1:
        raise ConfigError("--views must be at least 1.")
    if args.resolution is not None and not 16 <= args.resolution <= 2048:
        raise ConfigError("--resolution must be between 16 and 2048 pixels.")
    poses = load_pose(args.pose)  # checked before anything is rendered or written
    out = Path(args.out)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        result = model.sample(args.num, seed=args.seed, pose=poses, views=args.views, resolution=args.resolution,
                              psi=args.psi)
        images = result["images"].numpy()  # [P, num, views, H, W, 4] over white
        p, num = images.shape[:2]
        grid = image_grid(images[..., :3].reshape(p * num, args.views, *images.shape[3:5], 3))
        textures = result["textures"]
        gif_res = min(args.resolution or model.render_resolution, 128)
        shells = model.pose(poses[:1].expand(num, -1, -1))["shells"]
        frames = []
        for i in range(GIF_FRAMES):
            mvp = model.cameras(1, start=360.0 * i / GIF_FRAMES)[None].expand(num, -1, -1, -1)
            img = model.render(textures, shells, mvp, gif_res, background=torch.ones(3))[:, 0, ..., :3]
            frames.append(image_grid(img.numpy()[None]))
    ms = (time.perf_counter() - start) * 1e3
    out.mkdir(parents=True, exist_ok=True)
    written = [save_png(out / "views.png", grid), save_gif(out / "turntable.gif", frames)]
    written += write_glbs(model, [(out / (f"sample_{s:03d}.glb" if p == 1 else f"sample_{s:03d}_pose_{k}.glb"),
                                   textures[s], poses[k]) for s in range(num) for k in range(p)])
    buf = io.BytesIO()
    np.save(buf, textures.numpy().astype(np.float16))
    with atomic_write(out / "textures.npy", "wb") as f:
        f.write(buf.getvalue())
    written.append(out / "textures.npy")
    print(f"{args.name}: {num} samples x {p} pose(s) x {args.views} views at "
          f"{images.shape[3]}x{images.shape[4]}, {model.num_layers} shells, {ms:.0f} ms; wrote {len(written)} files "
          f"to {out} (grid: {out / 'views.png'}, turntable: {out / 'turntable.gif'})")
    return 0


def write_glbs(model, files) -> list[Path]:
    """One skinned GLB per ``(path, textures [N, 4, T, T], pose [24, 3])`` of an LSV model: its rest
    shells (zero pose, so no pose blend shapes), skin weights and skeleton, posed by ``pose``."""
    import torch

    from zoo.data.humans_io import write_skinned_glb
    from zoo.models.lsv import SMPL_JOINTS

    body = model.body
    with torch.no_grad():
        rest = model.pose(torch.zeros(1, 24, 3, device=model.device))["rest"][0].cpu().numpy()
        rest_joints = body.rest(None)[1][0].cpu().numpy()
    mesh = (body.faces.cpu().numpy(), model.uv.cpu().numpy(), model.uv_faces.cpu().numpy())
    weights = model.shells.skin_weights.cpu().numpy()
    return [write_skinned_glb(path, rest, *mesh, textures.detach().cpu().numpy(), weights, rest_joints, body.parents,
                              SMPL_JOINTS, pose.detach().cpu().numpy()) for path, textures, pose in files]


def evaluate_humans(args, model) -> int:
    """``zoo evaluate lsv_*``: the generator's samples rendered with the data's poses and cameras
    against the data's images: FID and KID, silhouette IoU, multi-view consistency."""
    import torch

    from zoo.data.humans import PosedImageFolder, split_label
    from zoo.errors import ConfigError
    from zoo.io import atomic_write_json
    from zoo.metrics.fid import SmallFeatureNet, fid_kid, inception_features
    from zoo.models.lsv.consistency import multiview_consistency
    from zoo.models.lsv.render import opencv_to_clip
    from zoo.tables import format_table
    from zoo.train.gan import TensorPosedImages, silhouette_iou, synthetic_humans

    if args.num < 2:
        raise ConfigError("--num must be at least 2: FID and KID compare two sets of images.")
    features = inception_features(args.inception) if args.features == "inception" else SmallFeatureNet()
    model.eval()
    if args.data_dir:
        data = PosedImageFolder(args.data_dir)
        index = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.num]
        source = args.data_dir
    else:
        rgba, labels = synthetic_humans(model, args.num, args.img_size, seed=args.ref_seed)
        data, index, source = TensorPosedImages(rgba, labels), torch.arange(args.num), "built-in synthetic humans"
    if len(index) < 2:
        raise ConfigError(f"{source} has {len(index)} image(s); FID and KID need at least 2.")
    labels = data.labels[index]
    parts = split_label(labels)
    res = data.resolution
    bg = torch.ones(3)
    start = time.perf_counter()
    with torch.no_grad():
        textures = model(model.noise(len(index), seed=args.seed))
        shells = model.pose(parts["pose"], parts["betas"] if model.body.num_betas else None)["shells"]
        mvp = opencv_to_clip(parts["c2w"], parts["K"])
        images = model.render(textures, shells, mvp[:, None], res, background=bg)[:, 0]
        # a second camera 30 degrees round the body's vertical axis through the world origin
        turn = torch.tensor([[0.866, 0, 0.5, 0], [0, 1, 0, 0], [-0.5, 0, 0.866, 0], [0, 0, 0, 1.0]])
        mvp_b = opencv_to_clip(turn @ parts["c2w"], parts["K"])
        mv = multiview_consistency(model, textures, parts["pose"], mvp, mvp_b, res)
        mv_other = multiview_consistency(model, textures, parts["pose"], mvp, mvp_b, res, mismatched=True)
    scores = fid_kid(data.images[index], images[..., :3].permute(0, 3, 1, 2), features, seed=args.seed)
    m = {"fid": scores["fid"], "kid": scores["kid"], "kid_std": scores["kid_std"],
         "silhouette_iou": silhouette_iou(images[..., 3], data.alpha[index]),
         "multiview_l1": mv["l1"], "multiview_l1_mismatched": mv_other["l1"]}
    print(f"{args.name}: {len(index)} samples against {source} at {res} pixels, {args.features} features "
          f"(KID subsets of {scores['subset_size']}), {time.perf_counter() - start:.1f} s")
    print(format_table([(k, f"{v:.4g}") for k, v in m.items()], ("metric", "value")))
    if args.json:
        atomic_write_json(args.json, {"model": args.name, "num": len(index), "data": source,
                                      "features": args.features, "metrics": m})
    return 0
