"""Training-free text guidance: the point renderer, the noise optimisation, the CLI and its errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from zoo.cli import main
from zoo.errors import ConfigError
from zoo.models.psf.guidance import load_clip, render_views, text_guided_sample


class StandInEncoder(nn.Module):
    """A CLIP-shaped encoder: a small conv net for images, a seeded embedding per prompt."""

    image_size = 32

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2), nn.GELU(), nn.Conv2d(8, 16, 3, 2, 1), nn.GELU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, dim))
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))
        self.dim = dim

    def encode_image(self, images):
        return self.net(images)

    def encode_text(self, prompts):
        return torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(len(p) * 7919 + ord(p[0])))
                            for p in prompts])


def _tiny_open_clip(folder):
    """A randomly initialised open_clip model saved in the Hub layout (config + safetensors)."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": {"embed_dim": 32,
                         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model


@pytest.fixture(scope="module")
def psf():
    return zoo.create_model("psf_tiny", pretrained=True).eval()


def test_render_places_points_where_the_camera_sees_them():
    # three clusters in the z = 0 plane, at upper right, lower right and lower left (screen y
    # up): seen from azimuth 0 the upper left quadrant stays white
    pts = torch.zeros(1, 48, 3)
    for i, (x, y) in enumerate([(0.4, 0.4), (0.4, -0.4), (-0.4, -0.4)]):
        pts[0, 16 * i:16 * (i + 1), :2] = torch.tensor([x, y]) + 0.01 * torch.randn(16, 2)
    img = render_views(pts, views=1, elevation=0.0, resolution=32)[0, 0]
    assert img.shape == (32, 32) and float(img.max()) <= 1.0 and float(img.min()) >= 0.0
    assert float(img[:16, 16:].min()) < 0.6 and float(img[16:, :16].min()) < 0.6
    assert float(img[:16, :16].min()) > 0.99
    # a quarter turn about y puts the whole plane edge-on: only the middle columns are dark
    turned = render_views(pts, views=4, elevation=0.0, resolution=32)[0, 1]
    assert float(turned[:, 12:20].min()) < 0.6
    assert float(turned[:, :10].min()) > 0.99 and float(turned[:, 22:].min()) > 0.99


def test_render_is_differentiable_in_the_points():
    pts = torch.randn(2, 100, 3, requires_grad=True)
    img = render_views(pts, views=3, resolution=24)
    assert img.shape == (2, 3, 24, 24)
    img.mean().backward()
    assert torch.isfinite(pts.grad).all() and float(pts.grad.abs().sum()) > 0


def test_guidance_raises_the_score_and_keeps_clouds_valid(psf):
    enc = StandInEncoder()
    r = text_guided_sample(psf, enc, "a chair", num=3, steps=12, lr=0.05, seed=3)
    sim = r.similarity
    assert sim.shape == (13, 3)
    assert float(sim[-1].mean()) > float(sim[0].mean()) + 0.01
    assert torch.isfinite(r.points).all()
    assert float(r.points.abs().max()) < 0.75  # the procedural shapes lie inside radius 0.5
    # the noise stays on its starting shell, and the points are the generator's output for it
    start = torch.randn(3, psf.num_points, 3, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(r.noise.flatten(1).norm(dim=1), start.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(r.points, psf(r.noise))
    # the encoder and generator stay frozen and keep their flags
    assert all(p.requires_grad for p in psf.parameters()) and all(p.requires_grad for p in enc.parameters())


def test_zero_guidance_steps_are_the_plain_one_step_samples(psf):
    r = text_guided_sample(psf, StandInEncoder(), "a lamp", num=2, steps=0, seed=5)
    noise = torch.randn(2, psf.num_points, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(r.points, psf(noise))


def test_open_clip_from_local_files_guides_the_cli(tmp_path, capsys):
    _tiny_open_clip(tmp_path / "clip")
    enc = load_clip(tmp_path / "clip")
    assert enc.image_size == 32 and float(enc.mean.flatten()[0]) == 0.5
    out = tmp_path / "out"
    assert main(["sample", "psf_tiny", "--prompt", "a box", "--clip", str(tmp_path / "clip"), "--num", "2",
                 "--guidance-steps", "6", "--guidance-lr", "0.1", "--out", str(out)]) == 0
    report = json.loads((out / "guidance.json").read_text())
    per_step = report["similarity_per_step"]
    assert len(per_step) == 7 and per_step[-1] > per_step[0]
    assert (out / "samples.png").is_file() and (out / "sample_001.ply").is_file()
    assert "CLIP similarity" in capsys.readouterr().out


def test_text_guidance_errors_say_what_to_do(tmp_path, capsys):
    assert main(["sample", "psf_tiny", "--prompt", "a chair", "--out", str(tmp_path / "a")]) == 2
    assert "--clip" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["sample", "psf_tiny", "--prompt", "a chair", "--clip", str(tmp_path / "none"),
                 "--out", str(tmp_path / "b")]) == 2
    assert "open_clip_config.json" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="open_clip_config.json"):
        load_clip(tmp_path / "empty")
    ckpt = tmp_path / "weights.safetensors"
    ckpt.write_bytes(b"0")
    with pytest.raises(ConfigError, match="--clip-arch"):
        load_clip(ckpt)
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        load_clip(ckpt, arch="NoSuchNet")
    with pytest.raises(ConfigError, match="prompt is empty"):
        text_guided_sample(zoo.create_model("psf_tiny", pretrained=True), StandInEncoder(), "  ")
    assert main(["sample", "psf_tiny", "--clip", str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["sample", "psf_tiny", "--prompt", "x", "--clip", str(tmp_path / "empty"), "--steps", "4",
                 "--out", str(tmp_path / "d")]) == 2
    assert "one-step" in capsys.readouterr().err


def test_similarity_is_cosine_in_the_encoder_space(psf):
    # the score equals the cosine similarity computed by hand from the same renders
    from zoo.models.psf.guidance import _score

    enc = StandInEncoder()
    noise = torch.randn(2, psf.num_points, 3, generator=torch.Generator().manual_seed(1))
    text = F.normalize(enc.encode_text(["a torus"]), dim=-1)[0]
    with torch.no_grad():
        score, points = _score(psf, enc, noise, text, views=2, elevation=20.0, resolution=32)
        img = render_views(points, 2, 20.0, 32).reshape(4, 1, 32, 32)
        img = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        emb = F.normalize(enc.encode_image((img - enc.mean) / enc.std), dim=-1)
        torch.testing.assert_close(score, (emb @ text).view(2, 2).mean(1))
