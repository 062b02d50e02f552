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

    from zoo.data.humans_io import image_grid, save_gif, save_png, write_skinned_glb
    from zoo.errors import ConfigError
    from zoo.io import atomic_write
    from zoo.models.lsv import SMPL_JOINTS, load_pose

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
        rest = model.pose(poses[:1] * 0)["rest"][0].numpy()  # the unposed shells (no shape change here)
    ms = (time.perf_counter() - start) * 1e3
    out.mkdir(parents=True, exist_ok=True)
    written = [save_png(out / "views.png", grid), save_gif(out / "turntable.gif", frames)]
    body, shells_mod = model.body, model.shells
    rest_joints = body.rest(None)[1][0].numpy()
    for s in range(num):
        for k in range(p):
            name = f"sample_{s:03d}.glb" if p == 1 else f"sample_{s:03d}_pose_{k}.glb"
            written.append(write_skinned_glb(
                out / name, rest, body.faces.numpy(), model.uv.numpy(), model.uv_faces.numpy(),
                textures[s].numpy(), shells_mod.skin_weights.numpy(), rest_joints, body.parents, SMPL_JOINTS,
                poses[k].numpy()))
    buf = io.BytesIO()
    np.save(buf, textures.numpy().astype(np.float16))
    with atomic_write(out / "textures.npy", "wb") as f:
        f.write(buf.getvalue())
    written.append(out / "textures.npy")
    print(f"{args.name}: {num} samples x {p} pose(s) x {args.views} views at "
          f"{images.shape[3]}x{images.shape[4]}, {model.num_layers} shells, {ms:.0f} ms; wrote {len(written)} files "
          f"to {out} (grid: {out / 'views.png'}, turntable: {out / 'turntable.gif'})")
    return 0
