"""LSV-GAN training speed: images per second of one engine step (G step, D step, R1 amortised)
on the built-in synthetic humans, split into the texture generator, the shell renderer and the
discriminator (forward and backward each), 2 CPU threads; CUDA with nvdiffrast when present.
The peer is the same step with the render replaced by a resize of the textures to the image
size: what the renderer costs on top of a 2D GAN of the same generator and discriminator.
Writes docs/results/lsv_gan_speed_<device>.md."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.tables import results_file
from zoo.train.engine import setup_distributed
from zoo.train.gan import GANConfig, LSVGANTask

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    env = setup_distributed(args.device)
    dev = env.device
    task = LSVGANTask(GANConfig(resolution=args.resolution, num_images=64, num_outfits=8, batch_size=args.batch_size,
                                blur_fade_kimg=0), env)
    gan = task.build_model().to(dev)
    gen, D = gan.G.generator, gan.D
    loader = task.train_loader(0)
    parts = {"generator": [], "render": [], "discriminator": [], "step": [], "step_2d": []}
    batches = iter(loader)
    for i in range(args.steps + 1):
        batch = next(batches)
        labels = batch["label"].to(dev)
        real = batch["image"].to(dev)
        z = torch.randn(args.batch_size, gen.config.z_dim, device=dev)
        tex, t_g = timed(lambda: gen(z), dev)
        img, t_r = timed(lambda: gan.render_labels(tex, labels, args.resolution, task.bg.to(dev)), dev)
        fake = img[..., :3].permute(0, 3, 1, 2)

        def d_pass():
            loss = F.softplus(-D(fake, labels)).mean() + F.softplus(D(real, labels)).mean()
            loss.backward(retain_graph=True)
            return loss
        _, t_d = timed(d_pass, dev)  # D forward/backward, and the gradient back to the fake images
        (_, t_rb) = timed(lambda: img.sum().backward(retain_graph=True), dev)
        (_, t_gb) = timed(lambda: tex.sum().backward(), dev)

        opts = task.configure_optimizers(gan, 0.0)
        _, t_step = timed(lambda: task.train_step(gan, batch, opts, i), dev)

        def step_2d():  # the same G and D, textures resized in place of the render
            t = gen(z)
            f2 = F.interpolate(t[:, -3, :3], size=(args.resolution,) * 2, mode="bilinear", align_corners=False)
            loss = F.softplus(-D(f2, labels)).mean()
            loss.backward()
            d = F.softplus(D(f2.detach(), labels)).mean() + F.softplus(-D(real, labels)).mean()
            d.backward()
        _, t_2d = timed(step_2d, dev)
        if i == 0:
            continue  # warm-up
        parts["generator"].append(t_g + t_gb)
        parts["render"].append(t_r + t_rb)
        parts["discriminator"].append(t_d)
        parts["step"].append(t_step)
        parts["step_2d"].append(t_2d)
    med = {k: statistics.median(v) for k, v in parts.items()}
    b = args.batch_size
    name = f"{dev.type}" + ("" if dev.type == "cuda" else f"{args.threads}t")
    rows = [f"| {k} | {med[k] * 1e3:.0f} | {100 * med[k] / max(med['generator'] + med['render'] + med['discriminator'], 1e-9):.0f}% |"
            for k in ("generator", "render", "discriminator")]
    body = "\n".join([
        f"lsv_mannequin, {args.resolution}-pixel images, batch {b}, median of {args.steps} steps.", "",
        "| part (forward + backward, one batch) | ms | share |", "|---|---|---|", *rows, "",
        "| step | ms | images/s |", "|---|---|---|",
        f"| LSV-GAN step (G, D, R1 when due, EMA) | {med['step'] * 1e3:.0f} | {b / med['step']:.1f} |",
        f"| same G and D, textures resized instead of rendered | {med['step_2d'] * 1e3:.0f} | {b / med['step_2d']:.1f} |",
        f"| ratio (render-free / LSV-GAN) | {med['step_2d'] / med['step']:.2f} | |"])
    with results_file(ROOT / "docs" / "results" / f"lsv_gan_speed_{name}.md", f"LSV-GAN training speed ({name})"):
        print(body)


if __name__ == "__main__":
    main()
