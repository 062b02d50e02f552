"""Train psf_tiny_completion's shipped weights: conditional flow, reflow and distillation (CPU).

    .venv/bin/python benchmarks/train_psf_tiny_completion.py --generator-run runs/psf_tiny [--out runs/psf_tiny_completion]

Runs `zoo.train.psf.run_pipeline` with ``num_given=128`` (psf_tiny_completion's
architecture, dropout off) on partial/complete pairs cut from the procedural shapes
(`zoo.data.pointclouds.ProceduralCompletion`: a random plane through the centroid keeps one
half, 128 points of it are given, 384 points of the whole shape are generated). The flow
stage starts from the generator's flow checkpoint in ``--generator-run`` (the output folder
of ``benchmarks/train_psf_tiny.py``), widened for the given-point flag, and uses the same
shapes and normalization, so both models share coordinates. Writes float16 safetensors to
``--out`` and, with ``--install``, over the package's
``models/psf/weights/psf_tiny_completion_procedural.safetensors`` (then set
``TINY_COMPLETION_SHA256`` in ``models/psf/__init__.py`` to the printed digest).
``--quick`` is a smoke run.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from zoo.errors import ConfigError
from zoo.models.psf import TINY_COMPLETION_WEIGHTS, psf_config
from zoo.registry import model_card
from zoo.train.engine import TrainConfig
from zoo.train.psf import run_pipeline

from _psf_weights import package  # noqa: E402  (benchmarks/ is on sys.path when run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generator-run", required=True, help="output folder of benchmarks/train_psf_tiny.py")
    p.add_argument("--out", default="runs/psf_tiny_completion")
    p.add_argument("--flow-init", default=None, help="another generator flow checkpoint to start from (default: the "
                                                     "generator run's flow/model_best.pth.tar)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a few epochs only (checks the script, not the weights)")
    p.add_argument("--install", action="store_true", help="also overwrite the package's weights file")
    p.add_argument("--num-shapes", type=int, default=2048, help="the generator run's shapes (same normalization)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--flow-epochs", type=int, default=8)
    p.add_argument("--reflow-pairs", type=int, default=256)
    p.add_argument("--reflow-epochs", type=int, default=6)
    p.add_argument("--distill-pairs", type=int, default=512)
    p.add_argument("--distill-epochs", type=int, default=10)
    p.add_argument("--pair-steps", type=int, default=20, help="Euler steps of the teacher that makes each pair set")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    flow_init = Path(args.flow_init) if args.flow_init else Path(args.generator_run) / "flow" / "model_best.pth.tar"
    if not flow_init.is_file():
        raise ConfigError(f"{flow_init} does not exist: run benchmarks/train_psf_tiny.py --out {args.generator_run} "
                          "first (its flow checkpoint starts this model).")
    card = model_card("psf_tiny_completion")
    conf = dict(card.config)
    num_given = conf.pop("num_given")
    cfg = psf_config(**{**conf, "dropout": 0.0, "extra_feature_channels": 1})
    q = args.quick

    def stage(epochs, lr, seed, warmup=0):
        return TrainConfig(epochs=1 if q else epochs, opt="adam", lr=lr, weight_decay=0.0, sched="cosine",
                           warmup_epochs=0 if q else warmup, batch_size=args.batch_size, model_ema=not q,
                           model_ema_decay=0.995, log_interval=0, seed=seed)

    train = {"flow": stage(args.flow_epochs, 1e-3, 0, warmup=1), "reflow": stage(args.reflow_epochs, 5e-4, 1),
             "distill": stage(args.distill_epochs, 5e-4, 2)}
    start = time.time()
    steps = 5 if q else args.pair_steps
    paths = run_pipeline(args.out, cfg, train, data="procedural", num_shapes=64 if q else args.num_shapes,
                         num_pairs=16 if q else args.reflow_pairs, reflow_steps=steps, distill_steps=steps,
                         distill_pairs=16 if q else args.distill_pairs, batch_size=args.batch_size, seed=0,
                         normalize_data=True, num_given=num_given, flow_init=flow_init)
    package(args.out, "psf_tiny_completion", paths, {"data": "procedural halves", "flow_init": flow_init},
            TINY_COMPLETION_WEIGHTS if args.install else None, "TINY_COMPLETION_SHA256", start)


if __name__ == "__main__":
    main()
