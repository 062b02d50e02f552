"""LSV-GAN on the shared engine: the texture generator learns from posed, single-view images
through the differentiable shell renderer, against a camera- and pose-conditioned discriminator.

The recipe is StyleGAN2's (arXiv 1912.04958) as Gaussian Shell Maps and EG3D use it, each
setting in `GANConfig`:

- **Losses**: non-saturating, ``softplus(-D(G(z)))`` for G and ``softplus(D(fake)) +
  softplus(-D(real))`` for D.
- **Lazy R1**: every ``d_reg_interval``-th D step (16) a separate step on ``gamma / 2 *
  |grad_x D(x)|^2`` over the reals, scaled by the interval; D's Adam then runs at ``lr * c`` with
  betas ``beta ** c``, ``c = interval / (interval + 1)``, as StyleGAN2 compensates for the extra
  steps. ``r1_gamma=None`` is StyleGAN2-ADA's heuristic ``0.0002 * resolution^2 / batch``.
- **Optimizers**: Adam, betas (0, 0.99), G lr 0.0025, D lr 0.002.
- **EMA of G**: ``beta = 0.5 ** (batch / ema_nimg)``, ``ema_nimg = ema_kimg * 1000``, ramped up as
  ``min(ema_nimg, seen_images * ema_rampup)``; only the texture generator is averaged (the
  shells have no weights). Buffers (``w_avg``) are copied.
- **Blur fade-in** (EG3D): reals and fakes are blurred by a Gaussian whose sigma falls linearly
  from ``blur_sigma`` to 0 over ``blur_fade_kimg`` thousand images, so D starts on coarse shapes.
- **Conditioning**: each fake is rendered with the pose and camera of a label drawn from the
  data (EG3D's choice), and D sees that label; style mixing with probability 0.9.

One engine step is one batch: a G step, then a D step on the reals and on the same batch's fakes
(detached: rendering again with fresh latents doubles the cost on a CPU; a choice), then R1
when due, then the EMA. Counters (images seen, D steps, the D steps that carried R1) are the
task's state, checkpointed with the optimizers, so a resumed run continues exactly.

Data: a `zoo.data.humans.PosedImageFolder` (EG3D's ``dataset.json``), or the built-in set
(`synthetic_humans`): the mannequin in random walking poses from random cameras, dressed in
procedural outfits whose outer layer (hair and a translucent skirt) stands off the body, so a
single textured surface cannot explain the images.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.data.charts import line_chart
from zoo.data.humans import PosedImageFolder, composite_over, split_label
from zoo.data.humans_io import image_grid, save_png
from zoo.errors import ConfigError
from zoo.metrics.fid import SmallFeatureNet, fid_kid
from zoo.models.lsv import LayeredSurfaceVolumes, procedural_outfit, standard_pose
from zoo.models.lsv.discriminator import Discriminator, DiscriminatorConfig
from zoo.models.lsv.render import opencv_to_clip, orbit_opencv
from zoo.train.engine import Dist, epoch_loader

__all__ = ["GANConfig", "LSVGAN", "LSVGANTask", "synthetic_humans", "random_poses", "r1_penalty", "blur_images",
           "silhouette_iou"]


@dataclass
class GANConfig:
    model: str = "lsv_mannequin"
    model_overrides: dict = field(default_factory=dict)
    resolution: int = 64                 # images: rendered and seen by D at this size
    data_dir: str = ""                   # a dataset.json folder; "" = the built-in synthetic set
    num_images: int = 256                # built-in set size
    num_outfits: int = 64                # built-in set: distinct procedural outfits
    background: tuple = (1.0, 1.0, 1.0)
    batch_size: int = 8
    g_lr: float = 0.0025
    d_lr: float = 0.002
    betas: tuple = (0.0, 0.99)
    r1_gamma: float | None = None
    d_reg_interval: int = 16
    ema_kimg: float = 10.0
    ema_rampup: float | None = 0.05
    style_mixing: float = 0.9
    blur_sigma: float = 10.0
    blur_fade_kimg: float = 200.0
    d_channel_base: int = 4096
    d_channel_max: int = 128
    d_mapping_layers: int = 2
    eval_images: int = 32
    seed: int = 42

    def gamma(self) -> float:
        return 0.0002 * self.resolution ** 2 / self.batch_size if self.r1_gamma is None else self.r1_gamma


# ----------------------------------------------------------------------------- data

def random_poses(num: int, generator: torch.Generator) -> torch.Tensor:
    """``[num, 24, 3]`` walking poses: the ``walk`` pose's stride scaled by a random phase in
    ``[-1, 1]`` (either leg forward), a random turn of the root and small joint jitter."""
    walk = standard_pose("walk")
    arms = torch.zeros(24, 3)
    arms[16, 2], arms[17, 2] = walk[16, 2], walk[17, 2]  # arms down in every pose
    swing = walk - arms
    phase = torch.rand(num, 1, 1, generator=generator) * 2 - 1
    pose = arms + phase * swing
    pose[:, [16, 17], 2] += (torch.rand(num, 2, generator=generator) - 0.5) * 0.6  # arms a little out or in
    pose[:, 1:] += torch.randn(num, 23, 3, generator=generator) * 0.05
    pose[:, 0, 1] = (torch.rand(num, generator=generator) - 0.5) * 0.6  # root yaw
    return pose


@torch.no_grad()
def synthetic_humans(model: LayeredSurfaceVolumes, num: int, resolution: int, seed: int = 0,
                     num_outfits: int = 32, elevation=(-0.1, 0.35)) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in LSV-GAN data: ``images [num, H, W, 4]`` (straight RGBA, coverage alpha) and
    ``labels [num, 107]`` in the `zoo.data.humans` layout. Each image is one of ``num_outfits``
    procedural outfits (`procedural_outfit`), a `random_poses` pose, and a camera at a random
    azimuth and elevation (radians) framed as the model frames its own views."""
    g = torch.Generator().manual_seed(seed)
    outfits = torch.stack([procedural_outfit(model, model.texture_size, seed=seed * 1000 + k,
                                             num_layers=model.num_layers) for k in range(num_outfits)])
    which = torch.randint(num_outfits, (num,), generator=g)
    pose = random_poses(num, g)
    az = torch.rand(num, generator=g) * 2 * math.pi
    el = torch.rand(num, generator=g) * (elevation[1] - elevation[0]) + elevation[0]
    c2w, k = orbit_opencv(az, el, model.camera_distance, model.fov, model.camera_target)
    labels = torch.cat([c2w.reshape(num, 16), k.reshape(num, 9), pose.reshape(num, 72), torch.zeros(num, 10)], 1)
    images = []
    for s in range(0, num, 16):
        sl = slice(s, min(s + 16, num))
        shells = model.pose(pose[sl].to(model.device))["shells"]
        mvp = opencv_to_clip(c2w[sl], k[sl])[:, None].to(model.device)
        images.append(model.render(outfits[which[sl]].to(model.device), shells, mvp, resolution)[:, 0].cpu())
    images = torch.cat(images)
    rgb = images[..., :3] / images[..., 3:].clamp_min(1e-6)  # un-premultiply: files hold straight RGBA
    return torch.cat([rgb.clamp(0, 1) * (images[..., 3:] > 0), images[..., 3:]], -1), labels


class TensorPosedImages(torch.utils.data.Dataset):
    """`PosedImageFolder`'s items from tensors in memory (the built-in set)."""

    def __init__(self, rgba: torch.Tensor, labels: torch.Tensor, background=(1.0, 1.0, 1.0)):
        rgba = rgba.permute(0, 3, 1, 2)
        self.images = composite_over(rgba, background)
        self.alpha, self.labels, self.resolution = rgba[:, 3], labels.float(), rgba.shape[-1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


# ----------------------------------------------------------------------------- losses and filters

def r1_penalty(discriminator: nn.Module, real: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|grad_x D(x, c)|^2 per sample [B], logits [B])`` at the real images (Mescheder et al. 2018)."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real, labels)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)), logits


def blur_images(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` (EG3D's fade-in filter: taps ``2^-(x/sigma)^2``
    over ``|x| <= 3 sigma``, at most the image size, normalised; reflect padding); identity for ``sigma <= 0``."""
    r = min(int(math.floor(sigma * 3)), images.shape[-1] - 1, images.shape[-2] - 1)
    if sigma <= 0 or r < 1:
        return images
    x = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    f = torch.exp2(-(x / sigma).square())
    f = f / f.sum()
    c = images.shape[1]
    y = F.conv2d(F.pad(images, (r, r, 0, 0), mode="reflect"), f.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), f.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# ----------------------------------------------------------------------------- the model

class LSVGAN(nn.Module):
    """The trained parts in one module, so one state dict holds them: ``G`` (the LSV model),
    ``D`` and ``G_ema`` (a copy of ``G.generator``)."""

    def __init__(self, G: LayeredSurfaceVolumes, D: Discriminator):
        super().__init__()
        self.G, self.D = G, D
        self.G_ema = copy.deepcopy(G.generator).eval().requires_grad_(False)

    def ema_model(self) -> LayeredSurfaceVolumes:
        """``G`` with the EMA generator's weights (a copy: for sampling, evaluation, export)."""
        m = copy.deepcopy(self.G)
        m.generator.load_state_dict(self.G_ema.state_dict())
        return m.eval()

    def render_labels(self, textures: torch.Tensor, labels: torch.Tensor, resolution: int,
                      background: torch.Tensor | None = None) -> torch.Tensor:
        """Render ``textures [B, N, 4, T, T]`` with each label's pose and camera: ``[B, H, W, 4]``."""
        parts = split_label(labels)
        betas = parts["betas"] if self.G.body.num_betas else None
        shells = self.G.pose(parts["pose"], betas)["shells"]
        mvp = opencv_to_clip(parts["c2w"], parts["K"])[:, None]
        return self.G.render(textures, shells, mvp, resolution, background=background)[:, 0]


class LSVGANTask:
    """The engine task (`zoo.train.engine.MultiOptimizerTask`): optimizers ``G`` and ``D``."""

    eval_metric = "fid"
    higher_is_better = False

    def __init__(self, cfg: GANConfig, env: Dist):
        from zoo.registry import create_model

        self.cfg, self.env = cfg, env
        self.arch = f"{cfg.model}_gan"
        if cfg.d_reg_interval < 1 or cfg.batch_size < 1:
            raise ConfigError("--d-reg-interval and --batch-size must be at least 1")
        if cfg.resolution < 8 or cfg.resolution & (cfg.resolution - 1):
            raise ConfigError(f"--img-size must be a power of two of at least 8, not {cfg.resolution}")
        torch.manual_seed(cfg.seed)  # the generator's initial weights
        self._G = create_model(cfg.model, **cfg.model_overrides)
        if cfg.data_dir:
            self.data = PosedImageFolder(cfg.data_dir, 3, cfg.background, cfg.resolution)
        else:
            rgba, labels = synthetic_humans(self._G, cfg.num_images, cfg.resolution, cfg.seed, cfg.num_outfits)
            self.data = TensorPosedImages(rgba, labels, cfg.background)
        self.bg = torch.tensor(cfg.background, dtype=torch.float32)
        self.seen, self.d_steps, self.r1_steps = 0, 0, []
        g = torch.Generator().manual_seed(cfg.seed + 7)
        self.eval_index = torch.randperm(len(self.data), generator=g)[:cfg.eval_images]
        self.eval_z = torch.randn(len(self.eval_index), self._G.generator.config.z_dim, generator=g)
        self.features = SmallFeatureNet()

    # --- the engine's interface ---------------------------------------------------------------

    def build_model(self) -> nn.Module:
        c = self.cfg
        D = Discriminator(DiscriminatorConfig(resolution=c.resolution, channel_base=c.d_channel_base,
                                              channel_max=c.d_channel_max, mapping_layers=c.d_mapping_layers))
        return LSVGAN(self._G, D)

    def configure_optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        c = self.cfg
        ratio = c.d_reg_interval / (c.d_reg_interval + 1)
        gan = _unwrap(model)
        return {"G": torch.optim.Adam(gan.G.generator.parameters(), lr=c.g_lr, betas=c.betas, eps=1e-8),
                "D": torch.optim.Adam(gan.D.parameters(), lr=c.d_lr * ratio,
                                      betas=tuple(b ** ratio for b in c.betas), eps=1e-8)}

    def train_loader(self, epoch: int):
        return epoch_loader(self.data, self.cfg.batch_size, epoch, self.cfg.seed, self.env, drop_last=True)

    def blur_sigma(self) -> float:
        c = self.cfg
        if c.blur_fade_kimg <= 0:
            return 0.0
        return max(1 - self.seen / (c.blur_fade_kimg * 1000), 0.0) * c.blur_sigma

    def fake_images(self, gan: LSVGAN, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gen = gan.G.generator
        ws = gen.mapping(z, update_w_avg=True)
        ws = gen.style_mixing(z, ws, self.cfg.style_mixing)
        textures = gen.synthesize(ws)
        img = gan.render_labels(textures, labels, self.cfg.resolution, self.bg.to(z.device))
        return img[..., :3].permute(0, 3, 1, 2)

    def train_step(self, model: nn.Module, batch, optimizers: dict, step: int) -> tuple[dict, int]:
        c, dev = self.cfg, self.env.device
        gan = _unwrap(model)
        real, real_c = batch["image"].to(dev), batch["label"].to(dev)
        b = real.shape[0]
        gen_c = self.data.labels[torch.randint(len(self.data), (b,))].to(dev)
        z = torch.randn(b, gan.G.generator.config.z_dim, device=dev)
        sigma = self.blur_sigma()

        # G: non-saturating loss through the renderer
        gan.D.requires_grad_(False)
        fake = self.fake_images(gan, z, gen_c)
        loss_g = F.softplus(-gan.D(blur_images(fake, sigma), gen_c)).mean()
        optimizers["G"].zero_grad(set_to_none=True)
        loss_g.backward()
        optimizers["G"].step()
        gan.D.requires_grad_(True)

        # D: the reals against this batch's fakes
        fake_logits = gan.D(blur_images(fake.detach(), sigma), gen_c)
        real_logits = gan.D(blur_images(real, sigma), real_c)
        loss_d = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        optimizers["D"].zero_grad(set_to_none=True)
        loss_d.backward()
        optimizers["D"].step()
        values = {"loss_G": loss_g.item(), "loss_D": loss_d.item(),
                  "D_accuracy": 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()).item(),
                  "D_real": real_logits.mean().item(), "D_fake": fake_logits.mean().item()}

        # lazy R1 on its own step, every d_reg_interval-th D step
        if self.d_steps % c.d_reg_interval == 0 and c.gamma() > 0:
            penalty, _ = r1_penalty(gan.D, blur_images(real, sigma), real_c)
            loss_r1 = penalty.mean() * (c.gamma() / 2) * c.d_reg_interval
            optimizers["D"].zero_grad(set_to_none=True)
            loss_r1.backward()
            optimizers["D"].step()
            self.r1_steps.append(self.d_steps)
            values["R1"] = penalty.mean().item()
        self.d_steps += 1
        self.seen += b * self.env.world_size

        self._update_ema(gan, b * self.env.world_size)
        return values, b

    def _update_ema(self, gan: LSVGAN, batch: int) -> None:
        c = self.cfg
        ema_nimg = c.ema_kimg * 1000
        if c.ema_rampup is not None:
            ema_nimg = min(ema_nimg, self.seen * c.ema_rampup)
        beta = 0.5 ** (batch / max(ema_nimg, 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(gan.G_ema.parameters(), gan.G.generator.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, beta))
            for b_ema, b in zip(gan.G_ema.buffers(), gan.G.generator.buffers()):
                b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"seen": self.seen, "d_steps": self.d_steps, "r1_steps": list(self.r1_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.d_steps, self.r1_steps = int(state["seen"]), int(state["d_steps"]), list(state["r1_steps"])

    @torch.no_grad()
    def ema_images(self, gan: LSVGAN) -> torch.Tensor:
        """EMA samples ``[E, H, W, 4]`` for the fixed evaluation latents, each in the pose and camera of
        a fixed data label (over the background; alpha is coverage). Rendered once per state of
        the EMA weights: `evaluate` and `epoch_figures` of one epoch share them."""
        # every in-place change of a parameter (the EMA update, a load) bumps its version
        key = (id(gan), self.seen, sum(p._version for p in gan.G_ema.parameters()))
        cached = getattr(self, "_ema_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        dev = self.env.device
        textures = gan.G_ema(self.eval_z.to(dev))
        labels = self.data.labels[self.eval_index].to(dev)
        img = gan.render_labels(textures, labels, self.cfg.resolution, self.bg.to(dev)).cpu()
        self._ema_cache = (key, img)
        return img

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        """FID and KID (`zoo.metrics.fid`, the small feature network) of the EMA generator's
        samples against the evaluation images, and the silhouette IoU with them (same labels)."""
        gan = _unwrap(model)
        state = torch.get_rng_state()
        img = self.ema_images(gan)
        torch.set_rng_state(state)
        real = self.data.images[self.eval_index]
        scores = fid_kid(real, img[..., :3].permute(0, 3, 1, 2), self.features, seed=self.cfg.seed)
        return {"fid": scores["fid"], "kid": scores["kid"],
                "silhouette_iou": silhouette_iou(img[..., 3], self.data.alpha[self.eval_index])}

    def epoch_figures(self, model: nn.Module, epoch: int, out_dir: Path, history: list[dict]) -> None:
        gan = _unwrap(model)
        state = torch.get_rng_state()
        fake = self.ema_images(gan)[:16, ..., :3]
        torch.set_rng_state(state)
        real = self.data.images[self.eval_index[:16]].permute(0, 2, 3, 1)
        cols = min(8, len(fake))
        rows = [real[i:i + cols] for i in range(0, len(real), cols)] + [fake[i:i + cols] for i in range(0, len(fake), cols)]
        rows = [r for r in rows if len(r) == cols]
        save_png(out_dir / f"samples_epoch{epoch:03d}.png", image_grid(torch.stack(rows).numpy()))
        keys = [k for k in ("train_loss_G", "train_loss_D", "train_D_accuracy", "eval_fid", "eval_silhouette_iou")
                if k in history[-1]]
        line_chart(out_dir / "curves.png", {k: [h.get(k, float("nan")) for h in history] for k in keys},
                   title=f"{self.arch}: losses and figures per epoch")

    def epoch_notes(self) -> dict:
        return {"kimg": self.seen / 1000, "blur_sigma": self.blur_sigma()}


def silhouette_iou(alpha: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """Mean over images of the IoU of ``alpha > threshold`` with ``target > threshold`` (``[B, H, W]``)."""
    pred, true = alpha > threshold, target > threshold
    inter = (pred & true).sum((1, 2)).float()
    union = (pred | true).sum((1, 2)).clamp_min(1).float()
    return (inter / union).mean().item()


def _unwrap(model: nn.Module) -> LSVGAN:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
