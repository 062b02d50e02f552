"""Train psf_tiny's shipped weights: flow, reflow and distillation on the procedural shapes (CPU).

    .venv/bin/python benchmarks/train_psf_tiny.py [--out runs/psf_tiny] [--quick]

Runs `zoo.train.psf.run_pipeline` with psf_tiny's architecture (dropout off: at a quarter
width it only adds noise) on the procedural shapes normalized to unit std (the flow starts
from N(0, I) noise; the statistics are saved with the weights), then writes the distilled
model's weights in float16 safetensors to ``--out`` and, only with ``--install``, over
``models/psf/weights/psf_tiny_procedural.safetensors`` (the package's default weights; then
set ``TINY_SHA256`` in ``models/psf/__init__.py`` to the printed digest) and prints the sha256.

The defaults are the shipped weights' recipe: a 34-epoch flow on 2048 shapes (EMA 0.999);
2560 pairs of its 20-step samples; a 3-epoch reflow on them; distillation of the one-step
map from the reflow model onto the flow's samples (``--distill-teacher flow``): the same
2560 pairs and 6144 more, 8704 in all. About 2 hours 20 minutes on 2 CPU cores;
``--quick`` is a smoke run.
``benchmarks/logs/train_psf_tiny.md`` records the recipes tried and what each stage measured.
"""
from __future__ import annotations

import argparse
import time

import torch

from zoo.models.psf import TINY_WEIGHTS, psf_config
from zoo.registry import model_card
from zoo.train.engine import TrainConfig
from zoo.train.psf import run_pipeline

from _psf_weights import package  # noqa: E402  (benchmarks/ is on sys.path when run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/psf_tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a few epochs only (checks the script, not the weights)")
    p.add_argument("--install", action="store_true",
                   help="also overwrite the package's weights file (then update TINY_SHA256 to the printed digest)")
    # the defaults are the shipped weights' recipe; the flags are there to try others
    p.add_argument("--num-shapes", type=int, default=2048, help="procedural training shapes (1/8 held out)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--flow-epochs", type=int, default=34)
    p.add_argument("--reflow-pairs", type=int, default=2560, help="(noise, sample) pairs for the reflow stage")
    p.add_argument("--reflow-epochs", type=int, default=3)
    p.add_argument("--distill-pairs", type=int, default=8704,
                   help="(noise, sample) pairs for distillation; from the flow teacher at the reflow's steps, the "
                        "reflow pairs are the first of them")
    p.add_argument("--distill-epochs", type=int, default=8)
    p.add_argument("--pair-steps", type=int, default=20, help="Euler steps of the teacher that makes each pair set")
    p.add_argument("--flow-init", default="", help="start the flow stage from this checkpoint (continue a run)")
    p.add_argument("--flow-lr", type=float, default=2e-3)
    p.add_argument("--flow-warmup", type=int, default=2)
    p.add_argument("--reflow-steps", type=int, default=None, help="the reflow teacher's steps (default --pair-steps)")
    p.add_argument("--flow-ema-decay", type=float, default=0.999)
    # a 3-epoch reflow keeps no EMA: at 0.995 it would still lag the weights, and distillation starts from them
    p.add_argument("--reflow-ema", action="store_true", help="EMA (0.995) in the reflow stage")
    p.add_argument("--no-distill-ema", action="store_true", help="no EMA (0.995) in the distillation stage")
    p.add_argument("--distill-teacher", choices=("reflow", "flow"), default="flow",
                   help="whose multi-step samples the one-step model learns (flow: the reflow pairs, when the counts match)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    card = model_card("psf_tiny")
    cfg = psf_config(**{**card.config, "dropout": 0.0})
    q = args.quick
    train = {
        "flow": TrainConfig(epochs=2 if q else args.flow_epochs, opt="adam", lr=args.flow_lr, weight_decay=0.0,
                            sched="cosine", warmup_epochs=0 if q else args.flow_warmup, batch_size=args.batch_size,
                            model_ema=not q, model_ema_decay=args.flow_ema_decay, log_interval=0, seed=0),
        "reflow": TrainConfig(epochs=1 if q else args.reflow_epochs, opt="adam", lr=5e-4, weight_decay=0.0,
                              sched="cosine", batch_size=args.batch_size, model_ema=args.reflow_ema and not q,
                              model_ema_decay=0.995, log_interval=0, seed=1),
        "distill": TrainConfig(epochs=1 if q else args.distill_epochs, opt="adam", lr=5e-4, weight_decay=0.0,
                               sched="cosine", batch_size=args.batch_size,
                               model_ema=not (args.no_distill_ema or q), model_ema_decay=0.995, log_interval=0, seed=2),
    }
    start = time.time()
    steps = 5 if q else args.pair_steps
    paths = run_pipeline(args.out, cfg, train, data="procedural", num_shapes=64 if q else args.num_shapes,
                         num_pairs=16 if q else args.reflow_pairs,
                         reflow_steps=steps if q or args.reflow_steps is None else args.reflow_steps,
                         distill_steps=steps, distill_pairs=16 if q else args.distill_pairs,
                         batch_size=args.batch_size, seed=0, normalize_data=True, flow_init=args.flow_init,
                         distill_teacher=args.distill_teacher)
    package(args.out, "psf_tiny", paths, {"data": "procedural"}, TINY_WEIGHTS if args.install else None,
            "TINY_SHA256", start)


if __name__ == "__main__":
    main()
