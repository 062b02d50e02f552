"""Layered surface volumes (LSV-GAN, arXiv 2307.05462): an articulated body, textured shells
around it, their renderer and the RGBA texture generator.

Registers ``lsv_mannequin`` (the built-in procedural mannequin, CPU-sized; weights trained in
this repo by LSV-GAN on the built-in synthetic humans, ``benchmarks/train_lsv_mannequin.py``) and
``lsv_smpl`` (the user's SMPL file; StyleGAN2's 256-pixel generator; no weights). A state dict
holds the texture generator only: the body, shells and UVs are rebuilt from the template.
"""
from __future__ import annotations

from pathlib import Path

from zoo.hub import WeightEntry
from zoo.registry import InputSpec, ModelCard, Paper, register_model

from .body import SMPL_JOINTS, SMPL_PARENTS, BodyModel, axis_angle_to_matrix, load_smpl
from .clothing import bake_vertex_values, procedural_outfit
from .generator import GeneratorConfig, ModulatedConv2d, TextureGenerator
from .mannequin import MANNEQUIN_JOINTS, Mannequin, build_mannequin
from .model import (POSES, LayeredSurfaceVolumes, Template, load_pose, smpl_search_paths, standard_pose,
                    template_from_mannequin, template_from_smpl)
from .render import orbit_cameras, render_shells, sample_layer_textures
from .shells import ShellConfig, Shells, vertex_normals

__all__ = ["SMPL_JOINTS", "SMPL_PARENTS", "BodyModel", "axis_angle_to_matrix", "load_smpl", "GeneratorConfig",
           "ModulatedConv2d", "TextureGenerator", "MANNEQUIN_JOINTS", "Mannequin", "build_mannequin", "POSES",
           "LayeredSurfaceVolumes", "Template", "load_pose", "smpl_search_paths", "standard_pose",
           "template_from_mannequin", "template_from_smpl", "orbit_cameras", "render_shells",
           "sample_layer_textures", "ShellConfig", "Shells", "vertex_normals", "build_lsv", "bake_vertex_values",
           "procedural_outfit"]

PAPER = Paper("Efficient 3D Articulated Human Generation with Layered Surface Volumes", "2307.05462")


def build_lsv(body: str = "mannequin", smpl_path: str | None = None, uv_path: str | None = None,
              texture_size: int = 256, z_dim: int = 512, w_dim: int = 512, mapping_layers: int = 8,
              channel_base: int = 16384, channel_max: int = 512, fused_modconv: bool = True,
              outer_offsets: tuple = (0.05, 0.025, 0.0), inner_fractions: tuple = (0.5, 1.0),
              shrink: str = "skeleton", shrink_scale: float = 0.5, shrink_offset: float = 0.03, knn: int = 5,
              render_resolution: int = 256, num_peel_layers: int | None = None) -> LayeredSurfaceVolumes:
    """An LSV model on the ``mannequin`` or the user's ``smpl`` body (see `template_from_smpl`)."""
    from zoo.errors import ConfigError

    if body == "mannequin":
        template = template_from_mannequin()
    elif body == "smpl":
        template = template_from_smpl(smpl_path, uv_path)
    else:
        raise ConfigError(f"body must be 'mannequin' or 'smpl', not {body!r}")
    shells = ShellConfig(tuple(outer_offsets), tuple(inner_fractions), shrink, shrink_scale, shrink_offset, knn)
    gen = GeneratorConfig(num_layers=shells.num_shells, resolution=texture_size, z_dim=z_dim, w_dim=w_dim,
                          mapping_layers=mapping_layers, channel_base=channel_base, channel_max=channel_max,
                          fused_modconv=fused_modconv)
    return LayeredSurfaceVolumes(template, shells, gen, render_resolution, num_peel_layers)


def _from_gan_checkpoint(sd: dict, model) -> dict:
    """An LSV-GAN training checkpoint (`zoo.train.gan.LSVGAN`: ``G.``, ``D.``, ``G_ema.``): the
    EMA generator's weights, as StyleGAN2 samples from ``G_ema``."""
    return {f"generator.{k[len('G_ema.'):]}": v for k, v in sd.items() if k.startswith("G_ema.")}


LAYOUTS = {"gan": _from_gan_checkpoint}
MANNEQUIN_WEIGHTS = Path(__file__).parent / "weights" / "lsv_mannequin_synthetic.safetensors"
# the shipped file's digest, checked before every load (benchmarks/train_lsv_mannequin.py --install
# prints the new one to put here)
MANNEQUIN_SHA256 = "3695625cc79f1ca1b8c97429c6b801b82d0faff3f264e9ed00646075e121c849"
MANNEQUIN_CONFIG = {"body": "mannequin", "texture_size": 128, "z_dim": 128, "w_dim": 128, "mapping_layers": 4,
                    "channel_base": 4096, "channel_max": 128, "render_resolution": 128}
register_model(ModelCard(
    name="lsv_mannequin", family="lsv", task="3d-human-generation", paper=PAPER, builder=build_lsv,
    config=MANNEQUIN_CONFIG, input=InputSpec("latent", (128,)), license="MIT", layouts=LAYOUTS,
    weights={"synthetic": WeightEntry(
        "synthetic", "package:zoo.models.lsv/weights/lsv_mannequin_synthetic.safetensors", format="safetensors",
        sha256=MANNEQUIN_SHA256, license="MIT", description="LSV-GAN on zoo's synthetic humans "
                                                           "(benchmarks/train_lsv_mannequin.py)")}
    if MANNEQUIN_WEIGHTS.is_file() and MANNEQUIN_SHA256 else {},
    default_tag="synthetic" if MANNEQUIN_WEIGHTS.is_file() and MANNEQUIN_SHA256 else None,
    description="Five RGBA-textured shells on the built-in skinned mannequin, from a small StyleGAN2-style "
                "texture generator (128-pixel textures), trained by LSV-GAN on the built-in synthetic humans.",
))
register_model(ModelCard(
    name="lsv_smpl", family="lsv", task="3d-human-generation", paper=PAPER, builder=build_lsv,
    config={"body": "smpl"}, input=InputSpec("latent", (512,)), layouts=LAYOUTS,
    license="MIT (code); SMPL, which you bring, is non-commercial",
    description="Five RGBA-textured shells on your SMPL body (put SMPL_NEUTRAL.pkl in $ZOO_HOME/smpl/), "
                "StyleGAN2's 256-pixel texture generator; no weights: train it with zoo train on your images.",
))
