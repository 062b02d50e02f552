"""PSF: point cloud generation with straight flows (arXiv 2212.01747), on a pure-PyTorch PVCNN2.

Registers ``psf_airplane``, ``psf_chair``, ``psf_car`` (the paper's PVCNN2 at 2048 points;
the authors released no weights), ``psf_tiny`` (a narrow PVCNN2 at 512 points that trains
on a CPU, with weights trained in this repo on the built-in procedural shapes) and
``psf_tiny_completion`` (its conditional form: a partial cloud in, the whole shape out).
"""
from __future__ import annotations

from pathlib import Path

import torch

from zoo.hub import WeightEntry
from zoo.registry import InputSpec, ModelCard, Paper, register_model

from .completion import PSFCompletion
from .flow import OneStepGenerator, flow_loss, sample_euler, sample_rk45
from .model import PSF
from .pvcnn import PVCNN2, PVCNN2Config, PVD_FP_BLOCKS, PVD_SA_BLOCKS

__all__ = ["PSF", "PSFCompletion", "build_psf_completion", "PVCNN2", "PVCNN2Config", "build_psf", "psf_config", "TINY_SA_BLOCKS", "TINY_FP_BLOCKS",
           "OneStepGenerator", "flow_loss", "sample_euler", "sample_rk45"]

PAPER = Paper("Fast Point Cloud Generation with Straight Flows", "2212.01747", "https://github.com/klightz/PSF")

# psf_tiny: PVD's four stages with a quarter of the width, half the voxel resolution and
# centre counts scaled to 512 points.
TINY_SA_BLOCKS = (
    ((32, 2, 32), (256, 0.1, 32, (32, 64))),
    ((64, 3, 16), (64, 0.2, 32, (64, 128))),
    ((128, 3, 8), (16, 0.4, 32, (128, 256))),
    (None, (8, 0.8, 16, (256, 256, 512))),
)
TINY_FP_BLOCKS = PVD_FP_BLOCKS
TINY_WEIGHTS = Path(__file__).parent / "weights" / "psf_tiny_procedural.safetensors"


def _from_velocity_keys(sd: dict, model) -> dict:
    """PVD/PSF checkpoints and zoo's stage checkpoints hold the bare PVCNN2 (``sa_layers...``),
    possibly under PSF's ``model.`` and DDP's ``module.`` prefixes; the card's model keeps it
    under ``velocity.``."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("model.", "module.")):
            k = k.split(".", 1)[1]
        out[f"velocity.{k}"] = v
    # A bare network carries no data statistics: it generates in its training coordinates.
    out.setdefault("data_mean", torch.zeros(3))
    out.setdefault("data_std", torch.ones(1))
    return out


LAYOUTS = {"official": _from_velocity_keys}


def psf_config(blocks: str = "pvd", num_points: int = 2048, embed_dim: int = 64, width_multiplier: float = 1.0,
               voxel_resolution_multiplier: float = 1.0, use_att: bool = True, dropout: float = 0.1,
               grouping: str = "ball", extra_feature_channels: int = 0) -> PVCNN2Config:
    if blocks not in ("pvd", "tiny"):
        raise ValueError(f"blocks must be 'pvd' or 'tiny', not {blocks!r}")
    sa, fp = (PVD_SA_BLOCKS, PVD_FP_BLOCKS) if blocks == "pvd" else (TINY_SA_BLOCKS, TINY_FP_BLOCKS)
    if grouping not in ("ball", "knn"):
        raise ValueError(f"grouping must be 'ball' or 'knn', not {grouping!r}")
    return PVCNN2Config(num_points=num_points, embed_dim=embed_dim, use_att=use_att, dropout=dropout,
                        width_multiplier=width_multiplier, voxel_resolution_multiplier=voxel_resolution_multiplier,
                        sa_blocks=sa, fp_blocks=fp, grouping=grouping, extra_feature_channels=extra_feature_channels)


def build_psf(blocks: str = "pvd", num_points: int = 2048, embed_dim: int = 64, width_multiplier: float = 1.0,
              voxel_resolution_multiplier: float = 1.0, use_att: bool = True, dropout: float = 0.1,
              grouping: str = "ball") -> PSF:
    return PSF(psf_config(blocks, num_points, embed_dim, width_multiplier, voxel_resolution_multiplier,
                          use_att, dropout, grouping))


def build_psf_completion(blocks: str = "tiny", num_points: int = 512, embed_dim: int = 32,
                         width_multiplier: float = 0.25, voxel_resolution_multiplier: float = 0.5,
                         use_att: bool = True, dropout: float = 0.1, grouping: str = "ball",
                         num_given: int = 128) -> PSFCompletion:
    """The completion model: `psf_config` with the given-point flag channel, ``num_given`` given points."""
    return PSFCompletion(psf_config(blocks, num_points, embed_dim, width_multiplier, voxel_resolution_multiplier,
                                    use_att, dropout, grouping, extra_feature_channels=1), num_given)


for _cat in ("airplane", "chair", "car"):
    register_model(ModelCard(
        name=f"psf_{_cat}", family="psf", task="point-cloud-generation", paper=PAPER, builder=build_psf,
        config={"blocks": "pvd", "num_points": 2048}, input=InputSpec("point-noise", (2048, 3)), layouts=LAYOUTS,
        license="MIT (architecture); no weights released by the authors",
        description=f"PSF's PVCNN2 for ShapeNet {_cat} (2048 points); train it with the three PSF stages.",
    ))

TINY_CONFIG = {"blocks": "tiny", "num_points": 512, "embed_dim": 32, "width_multiplier": 0.25,
               "voxel_resolution_multiplier": 0.5}
# the shipped file's digest, checked before every load (benchmarks/train_psf_tiny.py --install
# prints the new one to put here)
TINY_SHA256 = "17d01697305f3bbab2cf5b6c7e8e40f3d72d841bc2ae88cbf4308abf45415923"
register_model(ModelCard(
    name="psf_tiny", family="psf", task="point-cloud-generation", paper=PAPER, builder=build_psf,
    config=TINY_CONFIG, input=InputSpec("point-noise", (512, 3)), layouts=LAYOUTS,
    weights={"procedural": WeightEntry(
        "procedural", "package:zoo.models.psf/weights/psf_tiny_procedural.safetensors", format="safetensors",
        sha256=TINY_SHA256, license="MIT", description="flow, reflow and distillation on zoo's procedural shapes "
                                   "(benchmarks/train_psf_tiny.py)")} if TINY_WEIGHTS.is_file() else {},
    default_tag="procedural" if TINY_WEIGHTS.is_file() else None,
    license="MIT",
    description="A CPU-sized PSF (512 points, quarter-width PVCNN2) distilled to one step on the built-in shapes.",
))

TINY_COMPLETION_CONFIG = {**TINY_CONFIG, "num_given": 128}
TINY_COMPLETION_WEIGHTS = Path(__file__).parent / "weights" / "psf_tiny_completion_procedural.safetensors"
TINY_COMPLETION_SHA256 = "e9163f296ea2249ffa5855de44c2d01f794657ad6db57849eed3c7e59d39cec1"
register_model(ModelCard(
    name="psf_tiny_completion", family="psf", task="point-cloud-completion", paper=PAPER,
    builder=build_psf_completion, config=TINY_COMPLETION_CONFIG, input=InputSpec("partial-points", (128, 384, 3)),
    layouts=LAYOUTS,
    weights={"procedural": WeightEntry(
        "procedural", "package:zoo.models.psf/weights/psf_tiny_completion_procedural.safetensors",
        format="safetensors", sha256=TINY_COMPLETION_SHA256, license="MIT",
        description="flow (from psf_tiny's flow), reflow and distillation on cut procedural shapes "
                    "(benchmarks/train_psf_tiny.py --completion)")} if TINY_COMPLETION_WEIGHTS.is_file() else {},
    default_tag="procedural" if TINY_COMPLETION_WEIGHTS.is_file() else None,
    license="MIT",
    description="psf_tiny conditioned on a partial cloud (128 given points, 384 generated): one-step completion.",
))
