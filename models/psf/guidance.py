"""Training-free text-guided generation: steer the one-step generator's noise toward a prompt.

PSF (arXiv 2212.01747) turns its one-step generator into a text-to-shape model without
training: the noise ``x0`` is the only free variable, a differentiable render of the
generated cloud is scored by CLIP against the prompt, and a few gradient steps on ``x0``
raise the score. One step costs one generator forward and backward, which is what the
distilled model makes cheap.

Choices the paper leaves open, each an argument of :func:`text_guided_sample`:

- **Views**: ``views`` orthographic cameras at even azimuths around the vertical (y) axis and
  one ``elevation``, the camera of `zoo.data.pointcloud_io.render_grid`. Each cloud is
  centred and scaled by its own extent before it is drawn, so the score sees shape, not size.
- **Renderer** (:func:`render_views`): each point is a Gaussian splat (``sigma`` pixels)
  scattered onto a ``resolution``-pixel grid, coverage ``1 - exp(-sum of splats)``, grey
  shade by depth (near dark, far light; the nearer point wins by a soft depth weight), on
  white; then resized to the encoder's input size and normalized with its mean and std.
  Each point touches only its ``(2k+1)^2`` neighbouring pixels, so memory is linear in
  the number of points.
- **Score**: the cosine similarity between the image embedding of each view and the
  embedding of the prompt, averaged over views. The prompt goes to the encoder as written.
- **Noise prior**: Adam on ``x0`` (``lr``), and after every step each cloud's noise is
  rescaled to its starting norm, which keeps it on the shell where ``N(0, I)`` noise of
  this size lives (the generator was trained there; far from it its output degrades).

The encoder is anything with ``encode_image(images [B,3,S,S]) -> [B,D]``,
``encode_text(prompts: list[str]) -> [B,D]``, ``image_size``, ``mean`` and ``std`` (see
:class:`OpenClipEncoder`, which :func:`load_clip` builds from local open_clip files; nothing
is downloaded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.errors import ConfigError, require

__all__ = ["render_views", "OpenClipEncoder", "load_clip", "text_guided_sample", "GuidanceResult"]

# CLIP's image normalization (OpenAI's), used when the encoder states none
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _rotation(azimuth: float, elevation: float, device, dtype) -> torch.Tensor:
    """``[3,3]``: turn by ``azimuth`` about y, then tilt by ``elevation`` about x (degrees)."""
    a, e = math.radians(azimuth), math.radians(elevation)
    rot_y = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rot_x = torch.tensor([[1, 0, 0], [0, math.cos(e), -math.sin(e)], [0, math.sin(e), math.cos(e)]])
    return (rot_x @ rot_y).to(device=device, dtype=dtype)


def render_views(points: torch.Tensor, views: int = 4, elevation: float = 20.0, resolution: int = 64,
                 sigma: float = 0.8, radius: int = 2, depth_sharpness: float = 8.0) -> torch.Tensor:
    """Grey depth renders ``[B, views, resolution, resolution]`` in ``[0, 1]`` of ``points [B,N,3]``.

    White background (1), near surfaces dark. Differentiable in ``points``; the pixel each
    splat centres on is chosen without gradient, its Gaussian weights carry it.
    Pixel ``(row, col)``: row 0 at the top (screen y up), col 0 on the left.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ConfigError(f"render_views takes clouds [B, N, 3], not {tuple(points.shape)}")
    b, n, _ = points.shape
    r = resolution
    p = points - points.mean(1, keepdim=True)
    extent = p.detach().norm(dim=2).amax(1).clamp_min(1e-6).view(b, 1, 1)
    p = p / extent  # inside the unit ball
    rots = torch.stack([_rotation(360.0 * v / views, elevation, p.device, p.dtype) for v in range(views)])
    cam = torch.einsum("vij,bnj->bvni", rots, p).reshape(b * views, n, 3)
    # unit ball -> pixels with a margin; screen y up is row 0 at the top
    col = (cam[..., 0] * 0.45 + 0.5) * (r - 1)
    row = (0.5 - cam[..., 1] * 0.45) * (r - 1)
    near = (cam[..., 2] + 1) / 2  # 1: nearest to the camera (z towards the viewer), 0: farthest
    centre = torch.stack([row, col], -1)  # [BV,N,2]
    base = centre.detach().round().long()
    span = torch.arange(-radius, radius + 1, device=p.device)
    offs = torch.stack(torch.meshgrid(span, span, indexing="ij"), -1).reshape(-1, 2)  # [K,2]
    cells = base[:, :, None, :] + offs  # [BV,N,K,2]
    inside = ((cells >= 0) & (cells < r)).all(-1)
    d2 = (cells.to(p.dtype) - centre[:, :, None, :]).pow(2).sum(-1)
    w = torch.exp(-d2 / (2 * sigma * sigma)) * inside
    flat = (cells[..., 0].clamp(0, r - 1) * r + cells[..., 1].clamp(0, r - 1)).reshape(b * views, -1)
    # the nearer point dominates a pixel's shade: softmax-like weight on depth
    pref = torch.exp(depth_sharpness * (near - 1))[:, :, None] * w
    shade = (0.15 + 0.6 * (1 - near))[:, :, None]
    zeros = p.new_zeros(b * views, r * r)
    cover = zeros.scatter_add(1, flat, w.reshape(b * views, -1))
    num = zeros.scatter_add(1, flat, (pref * shade).reshape(b * views, -1))
    den = zeros.scatter_add(1, flat, pref.reshape(b * views, -1))
    alpha = 1 - torch.exp(-cover)
    grey = num / den.clamp_min(1e-8)
    img = alpha * grey + (1 - alpha)
    return img.view(b, views, r, r)


class OpenClipEncoder(torch.nn.Module):
    """An open_clip model behind the encoder interface :func:`text_guided_sample` uses."""

    def __init__(self, model, tokenizer, image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.model, self.tokenizer, self.image_size = model.eval(), tokenizer, int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.mean.device))


def load_clip(source: str | Path, arch: str | None = None) -> OpenClipEncoder:
    """A CLIP from local files through open_clip; nothing is downloaded.

    ``source``: a folder holding ``open_clip_config.json`` and its weights (the layout of an
    open_clip model on the Hugging Face Hub, e.g. a downloaded
    ``laion/CLIP-ViT-B-32-laion2B-s34B-b79K``), or a checkpoint file with ``arch`` naming its
    open_clip architecture (``ViT-B-32``...). The tokenizer is open_clip's for that model.
    """
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"CLIP weights {path} do not exist: pass --clip a folder with open_clip_config.json and "
                          "its weights (an open_clip model from the Hugging Face Hub, downloaded beforehand), or a "
                          "checkpoint file with --clip-arch naming its open_clip architecture (e.g. ViT-B-32).")
    open_clip = require("open_clip", "clip", "text-guided generation (CLIP)")
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise ConfigError(f"{path} holds no open_clip_config.json: pass the folder of an open_clip model (its "
                              "config and weights), or a checkpoint file with --clip-arch.")
        name = f"local-dir:{path}"
        model = open_clip.create_model(name)
    else:
        if not arch:
            raise ConfigError(f"{path} is a checkpoint file: name its open_clip architecture with --clip-arch "
                              "(e.g. ViT-B-32; open_clip.list_models() lists them), or pass a model folder.")
        if arch not in open_clip.list_models():
            raise ConfigError(f"--clip-arch {arch!r} is not an open_clip architecture; "
                              f"open_clip.list_models() has e.g. {open_clip.list_models()[:4]}.")
        name = arch
        model = open_clip.create_model(arch, pretrained=str(path))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    return OpenClipEncoder(model, open_clip.get_tokenizer(name), size, cfg.get("mean", CLIP_MEAN),
                           cfg.get("std", CLIP_STD))


@dataclass
class GuidanceResult:
    """``points [num,N,3]`` (data coordinates), ``noise [num,N,3]`` the optimized noise,
    ``similarity [steps+1, num]`` each cloud's score before each step and after the last."""

    points: torch.Tensor
    noise: torch.Tensor
    similarity: torch.Tensor


def _score(generator, encoder, noise: torch.Tensor, text: torch.Tensor, views: int, elevation: float,
           resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cloud mean cosine similarity ``[B]`` of the views of ``generator(noise)`` to ``text [D]``."""
    points = generator(noise)
    img = render_views(points, views, elevation, resolution)
    b = img.shape[0]
    s = encoder.image_size
    img = F.interpolate(img.reshape(b * views, 1, resolution, resolution), size=(s, s), mode="bilinear",
                        align_corners=False).expand(-1, 3, -1, -1)
    emb = F.normalize(encoder.encode_image((img - encoder.mean) / encoder.std).float(), dim=-1)
    return (emb @ text).view(b, views).mean(1), points


def text_guided_sample(generator, encoder, prompt: str, num: int = 4, steps: int = 20, lr: float = 0.05,
                       seed: int = 0, views: int = 4, elevation: float = 20.0,
                       resolution: int = 64) -> GuidanceResult:
    """``num`` clouds from ``generator`` (a one-step ``noise [B,N,3] -> points``, e.g. `PSF`)
    whose noise took ``steps`` Adam steps up the CLIP score of ``prompt`` (module docstring).

    ``steps=0`` returns the unguided samples with their scores. The generator and the encoder
    stay frozen; the result keeps, per cloud, the noise of the best score seen.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("the prompt is empty: pass a text such as --prompt \"a chair\".")
    if num < 1 or steps < 0:
        raise ConfigError("num must be at least 1 and steps at least 0.")
    n = generator.num_points
    g = torch.Generator().manual_seed(seed)
    device = next(generator.parameters()).device
    noise = torch.randn(num, n, 3, generator=g).to(device)
    norm0 = noise.flatten(1).norm(dim=1).view(-1, 1, 1)
    params = [p for m in (generator, encoder) for p in m.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            text = F.normalize(encoder.encode_text([prompt]).float(), dim=-1)[0]
        x = noise.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        history = []
        best = torch.full((num,), -2.0, device=device)
        best_noise = noise.clone()
        best_points = None
        for step in range(steps + 1):
            score, points = _score(generator, encoder, x, text, views, elevation, resolution)
            now, points = score.detach(), points.detach()
            history.append(now)
            better = now > best
            best = torch.where(better, now, best)
            best_noise[better] = x.detach()[better]
            best_points = points if best_points is None else torch.where(better.view(-1, 1, 1), points, best_points)
            if step == steps:
                break
            opt.zero_grad()
            (-score.sum()).backward()
            opt.step()
            with torch.no_grad():  # back onto the noise's shell (see the module docstring)
                x.mul_(norm0 / x.flatten(1).norm(dim=1).view(-1, 1, 1))
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    return GuidanceResult(best_points, best_noise, torch.stack(history))
