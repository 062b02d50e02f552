"""The shared training engine: one loop for every zoo task (classification now, 3D later).

A task supplies the model, the data and the loss (`Task`); the engine does the rest with
timm's parts: optimizer (`create_optimizer_v2`), schedule (`create_scheduler_v2`, stepped
per update), EMA (`ModelEmaV3`), `AverageMeter`, `update_summary`. It also owns:

- **Processes.** Under torchrun (``WORLD_SIZE`` > 1) it joins the process group (nccl on
  CUDA, gloo on CPU), wraps the model in DistributedDataParallel, and only rank 0 writes.
- **Determinism.** Seeds are ``seed + rank``; each epoch's shuffle comes from a generator
  seeded with ``seed + epoch``, so the data order does not depend on the RNG history.
- **Precision.** ``amp``: bfloat16 autocast on CPU, float16 with a GradScaler on CUDA.
- **Checkpoints**, as timm writes them (``epoch``, ``arch``, ``state_dict``,
  ``state_dict_ema``, ``optimizer``, ``args``, ``metric``) plus ``scheduler``, ``scaler``
  and ``rng``, written atomically after every epoch to ``last.pth.tar`` and, when the eval
  metric improves, ``model_best.pth.tar``. Everything is stored as tensors and plain Python
  values so ``torch.load(weights_only=True)`` reads it. `resume` restores all of it and
  continues with the next epoch: the result equals an uninterrupted run's.
- **Output**: ``args.yaml`` and ``summary.csv`` (timm's columns) in the run folder; a
  progress bar on a terminal, plain log lines every ``log_interval`` steps otherwise.
- **Tasks that step themselves** (a GAN: `MultiOptimizerTask`). A task with
  ``configure_optimizers`` owns several optimizers and does its own backward passes and
  steps; the engine gives each optimizer a scheduler of the configured kind, averages the
  named losses the step returns, checkpoints every optimizer and scheduler and the task's
  own counters (``task_state``), and after each epoch hands the task the run's history so it
  can draw its figures. Anything such a task must keep across a resume lives in its model's
  state dict (its EMA copy, as a submodule) or in ``task_state``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from zoo.errors import ConfigError, WeightsError
from zoo.io import atomic_write

__all__ = ["Engine", "Task", "MultiOptimizerTask", "TrainConfig", "Dist", "setup_distributed", "rng_state",
           "set_rng_state", "epoch_loader"]

log = logging.getLogger("zoo.train")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> Dist:
    """Read torchrun's environment and join the process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU.")
    dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return Dist(rank, world, local, dev)


def epoch_loader(dataset, batch_size: int, epoch: int, seed: int, env: Dist, shuffle: bool = True,
                 workers: int = 0, drop_last: bool = False, collate_fn=None) -> torch.utils.data.DataLoader:
    """One epoch's loader: its shuffle seeded by ``seed + epoch``, sharded by rank under torchrun."""
    sampler, generator = None, torch.Generator().manual_seed(seed + epoch)
    if env.distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, env.world_size, env.rank, shuffle=shuffle, seed=seed,
                                                      drop_last=drop_last)
        sampler.set_epoch(epoch)
        shuffle = False
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=generator,
        num_workers=workers, drop_last=drop_last, pin_memory=env.device.type == "cuda", persistent_workers=False,
        collate_fn=collate_fn)


def rng_state() -> dict:
    """Every RNG the loop draws from, as tensors and plain values (weights_only-loadable)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


class Task(Protocol):
    """What a training task provides. ``batch`` is whatever its loaders yield."""

    arch: str          # model name, stored in checkpoints
    eval_metric: str   # key of `evaluate`'s result that picks the best checkpoint
    higher_is_better: bool

    def build_model(self) -> nn.Module: ...
    def train_loader(self, epoch: int) -> Iterable: ...
    def train_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        """Loss of one batch (before any accumulation scaling) and its sample count."""
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics over the whole validation set, identical on every rank."""
    def epoch_notes(self) -> dict[str, float]:
        """Extra per-epoch training figures (e.g. skipped files), reset after each call."""


class MultiOptimizerTask(Task, Protocol):
    """A `Task` that owns several optimizers and steps them itself (alternating G and D, say).

    ``train_step(model, batch, optimizers, step)`` runs its backward passes and optimizer
    steps and returns ``({name: float}, sample count)``; ``step`` counts the engine's calls
    from the start of the run, resumes included.
    """

    def configure_optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]: ...
    def state_dict(self) -> dict:
        """Counters the step keeps (tensors and plain values), saved in every checkpoint."""
    def load_state_dict(self, state: dict) -> None: ...
    def epoch_figures(self, model: nn.Module, epoch: int, out_dir: Path, history: list[dict]) -> None:
        """Draw this epoch's pictures into ``out_dir`` (rank 0 only); ``history``: one dict per epoch."""


@dataclass
class TrainConfig:
    """The engine's settings (timm's flag names)."""

    epochs: int = 10
    opt: str = "adamw"
    lr: float | None = None
    lr_base: float = 0.1
    lr_base_size: int = 256
    lr_base_scale: str = ""
    batch_size: int = 32
    grad_accum_steps: int = 1
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = "cosine"
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    clip_grad: float | None = None
    clip_mode: str = "norm"
    amp: bool = False
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    seed: int = 42
    log_interval: int = 50
    output: str = "output/train"
    experiment: str = ""
    resume: str = ""
    checkpoint_hist: int = 1


class Engine:
    """Runs `task` under `config`; ``fit()`` returns the best eval metrics."""

    def __init__(self, task: Task, config: TrainConfig, args_record: dict | None = None, env: Dist | None = None,
                 callbacks: list[Callable[["Engine", int, dict], None]] | None = None):
        self.task, self.cfg = task, config
        self.env = env or setup_distributed()
        self.args_record = args_record or {}
        self.callbacks = callbacks or []
        self.out_dir: Path | None = None

    # --- set-up -------------------------------------------------------------------------------

    def _seed(self) -> None:
        seed = self.cfg.seed + self.env.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _resolve_lr(self) -> float:
        c = self.cfg
        if c.lr is not None:
            return c.lr
        global_batch = c.batch_size * c.grad_accum_steps * self.env.world_size
        ratio = global_batch / c.lr_base_size
        scale = c.lr_base_scale or ("sqrt" if any(k in c.opt.lower() for k in ("ada", "lamb")) else "linear")
        return c.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)

    def _output_dir(self) -> Path:
        """``output/experiment``; a resumed run without --experiment continues in its checkpoint's folder."""
        if self.cfg.resume and not self.cfg.experiment:
            out = Path(self.cfg.resume).parent
        else:
            name = self.cfg.experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-{self.task.arch}"
            out = Path(self.cfg.output) / name
        if self.env.is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot create the output folder {out}: {e.strerror or e}.") from None
        return out

    # --- checkpoints --------------------------------------------------------------------------

    def _checkpoint(self, epoch: int, metric: float | None, rngs: list) -> dict:
        if self.multi:  # one entry per named optimizer
            optim = {k: o.state_dict() for k, o in self.optimizers.items()}
            sched = {k: sc.state_dict() for k, sc in self.schedulers.items() if sc is not None}
        else:
            optim, sched = self.optimizer.state_dict(), self.scheduler.state_dict()
        ckpt = {
            "epoch": epoch,
            "arch": self.task.arch,
            "state_dict": self.model.state_dict(),
            "optimizer": optim,
            "scheduler": sched,
            "history": self.history,
            "version": 2,
            "args": self.args_record,
            "metric": metric,
            "best": self.best,
            "rng": rngs,
        }
        if self.ema is not None:
            ckpt["state_dict_ema"] = self.ema.module.state_dict()
        if self.scaler is not None:
            ckpt["scaler"] = self.scaler.state_dict()
        if self.multi:
            ckpt["task_state"] = self.task.state_dict()
        return ckpt

    def _save(self, ckpt: dict, name: str) -> None:
        with atomic_write(self.out_dir / name) as f:
            torch.save(ckpt, f)

    def _resume(self, path: str) -> int:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise WeightsError(f"--resume {path}: no such file.") from None
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"--resume {path} cannot be read as a zoo/timm training checkpoint: {e}") from None
        missing = [k for k in ("epoch", "state_dict", "optimizer") if k not in ckpt]
        if missing:
            raise WeightsError(f"--resume {path} lacks {missing}: it is a weights file, not a training checkpoint "
                               "(use --initial-checkpoint or --pretrained for weights).")
        if ckpt.get("arch") not in (None, self.task.arch):
            raise WeightsError(f"--resume {path} is a {ckpt['arch']} checkpoint, not {self.task.arch}.")
        self.model.load_state_dict(ckpt["state_dict"])
        if self.multi:
            if set(ckpt["optimizer"]) != set(self.optimizers) or "task_state" not in ckpt:
                raise WeightsError(f"--resume {path} holds optimizers {sorted(ckpt['optimizer'])}, this task has "
                                   f"{sorted(self.optimizers)}: it is not a checkpoint of this training.")
            for k, o in self.optimizers.items():
                o.load_state_dict(ckpt["optimizer"][k])
            for k, sc in self.schedulers.items():
                if sc is not None and k in ckpt.get("scheduler", {}):
                    sc.load_state_dict(ckpt["scheduler"][k])
            self.task.load_state_dict(ckpt["task_state"])
        else:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if "scheduler" in ckpt:
                self.scheduler.load_state_dict(ckpt["scheduler"])
        self.history = list(ckpt.get("history") or [])
        if self.ema is not None and "state_dict_ema" in ckpt:
            self.ema.module.load_state_dict(ckpt["state_dict_ema"])
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.env.world_size:  # one state per rank: the continuation is exact
            set_rng_state(rngs[self.env.rank])
        else:
            log.warning("the checkpoint's RNG states are for %d process(es), this run has %d: the data "
                        "augmentation will differ from an uninterrupted run.", len(rngs), self.env.world_size)
        self.best = ckpt.get("best")
        return int(ckpt["epoch"]) + 1

    # --- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        c, env = self.cfg, self.env
        if c.grad_accum_steps < 1 or c.batch_size < 1 or c.epochs < 1:
            raise ConfigError("--epochs, --batch-size and --grad-accum-steps must be at least 1.")
        self.multi = hasattr(self.task, "configure_optimizers")
        if self.multi and (c.grad_accum_steps != 1 or c.model_ema or (c.amp and env.device.type == "cuda")):
            raise ConfigError(f"{self.task.arch} steps its own optimizers: it takes no --grad-accum-steps, "
                              "--model-ema (it keeps its own EMA) or CUDA --amp.")
        self._seed()
        model = self.task.build_model().to(env.device)
        self.model = model
        self.lr = self._resolve_lr()
        updates_per_epoch = math.ceil(len(self.task.train_loader(0)) / c.grad_accum_steps)

        def schedule(optimizer):
            return create_scheduler_v2(optimizer, sched=c.sched, num_epochs=c.epochs, warmup_epochs=c.warmup_epochs,
                                       warmup_lr=c.warmup_lr, min_lr=c.min_lr, updates_per_epoch=updates_per_epoch)

        if self.multi:
            self.optimizers = self.task.configure_optimizers(model, self.lr)
            self.schedulers = {}
            for k, o in self.optimizers.items():
                self.schedulers[k], self.num_epochs = schedule(o)
            self.optimizer = next(iter(self.optimizers.values()))  # the one whose lr the summary reports
        else:
            self.optimizer = create_optimizer_v2(model, opt=c.opt, lr=self.lr, weight_decay=c.weight_decay,
                                                 momentum=c.momentum)
            self.scheduler, self.num_epochs = schedule(self.optimizer)
        self.history: list[dict] = []
        self.ema = ModelEmaV3(model, decay=c.model_ema_decay) if c.model_ema else None
        use_cuda_amp = c.amp and env.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_cuda_amp else None
        self.best: dict | None = None
        start_epoch = self._resume(c.resume) if c.resume else 0
        self.out_dir = self._output_dir()
        if env.is_main:
            import yaml

            with atomic_write(self.out_dir / "args.yaml", "w") as f:
                yaml.safe_dump(self.args_record, f, sort_keys=True)
        self.ddp = nn.parallel.DistributedDataParallel(model) if env.distributed else model
        lrs = (", ".join(f"{k} lr {o.param_groups[0]['lr']:.3g}" for k, o in self.optimizers.items()) if self.multi
               else f"lr {self.lr:.3g}")
        self._log(f"{self.task.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
                  f"{lrs}, {self.num_epochs} epochs, {env.world_size} process(es) on {env.device}, "
                  f"output {self.out_dir}")

        for epoch in range(start_epoch, self.num_epochs):
            train_metrics = self._train_one_epoch(epoch, updates_per_epoch)
            eval_metrics = self.task.evaluate(model)
            if self.ema is not None:
                ema_metrics = self.task.evaluate(self.ema.module)
                eval_metrics = {**{f"raw_{k}": v for k, v in eval_metrics.items()}, **ema_metrics}
            metric = eval_metrics[self.task.eval_metric]
            # the rate this epoch trained with (the mean over groups), read before the epoch's
            # scheduler step, as timm's train.py writes it to summary.csv
            groups = self.optimizer.param_groups
            epoch_lr = sum(g["lr"] for g in groups) / len(groups)
            for sched in self.schedulers.values() if self.multi else [self.scheduler]:
                if sched is not None:
                    sched.step(epoch + 1, metric)
            improved = self.best is None or (
                metric > self.best[self.task.eval_metric] if self.task.higher_is_better
                else metric < self.best[self.task.eval_metric])
            if improved:
                self.best = {"epoch": epoch, **eval_metrics}
            figures = {**{f"train_{k}": v for k, v in train_metrics.items()}, **{f"eval_{k}": v for k, v in eval_metrics.items()}}
            self._log(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
            self.history.append({"epoch": epoch, **figures})
            if self.multi and env.is_main:
                self.task.epoch_figures(model, epoch, self.out_dir, self.history)
            rngs = self._gather(rng_state())
            if env.is_main:
                from timm.utils import update_summary

                update_summary(epoch, train_metrics, eval_metrics, str(self.out_dir / "summary.csv"),
                               lr=epoch_lr, write_header=epoch == 0 or not
                               (self.out_dir / "summary.csv").exists())
                ckpt = self._checkpoint(epoch, metric, rngs)
                self._save(ckpt, "last.pth.tar")
                if improved:
                    self._save(ckpt, "model_best.pth.tar")
            if env.distributed:
                dist.barrier()
            for cb in self.callbacks:
                cb(self, epoch, eval_metrics)
        self._log(f"best {self.task.eval_metric} {self.best[self.task.eval_metric]:.4g} at epoch {self.best['epoch']}")
        return self.best

    def _train_one_epoch(self, epoch: int, updates_per_epoch: int) -> dict:
        if self.multi:
            return self._train_one_epoch_multi(epoch, updates_per_epoch)
        from timm.utils import AverageMeter

        c, env = self.cfg, self.env
        self.model.train()
        loader = self.task.train_loader(epoch)
        loss_meter = AverageMeter()
        accum = c.grad_accum_steps
        steps = len(loader)
        num_updates = epoch * updates_per_epoch
        bar = self._progress(steps, f"epoch {epoch}")
        self.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        for i, batch in enumerate(loader):
            last_of_group = (i + 1) % accum == 0 or i + 1 == steps
            group = accum if (steps - steps % accum) > i else steps % accum  # size of this accumulation group
            sync = contextlib.nullcontext() if last_of_group or not env.distributed else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    loss, n = self.task.train_step(self.ddp, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {i}; lower --lr or "
                                             "use --clip-grad.")
                scaled = loss / group
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_meter.update(loss.item(), n)
            if last_of_group:
                if c.clip_grad:
                    if self.scaler:
                        self.scaler.unscale_(self.optimizer)
                    if c.clip_mode == "value":
                        torch.nn.utils.clip_grad_value_(self.model.parameters(), c.clip_grad)
                    else:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad)
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                num_updates += 1
                self.scheduler.step_update(num_updates=num_updates, metric=loss_meter.avg)
                if self.ema is not None:
                    self.ema.update(self.model, step=num_updates)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_meter.avg:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            elif c.log_interval and ((i + 1) % c.log_interval == 0 or i + 1 == steps):
                self._log(f"epoch {epoch} [{i + 1}/{steps}] loss {loss_meter.val:.4f} ({loss_meter.avg:.4f}) "
                          f"lr {self.optimizer.param_groups[0]['lr']:.3e}")
        if bar is not None:
            bar.close()
        metrics = {"loss": self._mean_across_ranks(loss_meter.avg), "seconds": time.perf_counter() - start}
        metrics.update(self.task.epoch_notes())
        return metrics

    def _train_one_epoch_multi(self, epoch: int, updates_per_epoch: int) -> dict:
        """The loop for a task that steps its own optimizers: it returns named losses per batch."""
        from timm.utils import AverageMeter

        self.model.train()
        loader = self.task.train_loader(epoch)
        meters: dict[str, AverageMeter] = {}
        step = epoch * updates_per_epoch
        bar = self._progress(len(loader), f"epoch {epoch}")
        start = time.perf_counter()
        for i, batch in enumerate(loader):
            with self._autocast():
                values, n = self.task.train_step(self.ddp, batch, self.optimizers, step)
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            if bad:
                raise FloatingPointError(f"{bad} at epoch {epoch} step {i}; lower --lr.")
            for k, v in values.items():
                meters.setdefault(k, AverageMeter()).update(v, n)
            step += 1
            for sched in self.schedulers.values():
                if sched is not None:
                    sched.step_update(num_updates=step)
            line = ", ".join(f"{k} {m.avg:.4f}" for k, m in meters.items())
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(line)
            elif self.cfg.log_interval and ((i + 1) % self.cfg.log_interval == 0 or i + 1 == len(loader)):
                self._log(f"epoch {epoch} [{i + 1}/{len(loader)}] {line}")
        if bar is not None:
            bar.close()
        metrics = {k: self._mean_across_ranks(m.avg) for k, m in meters.items()}
        metrics["seconds"] = time.perf_counter() - start
        metrics.update(self.task.epoch_notes())
        return metrics

    # --- helpers ------------------------------------------------------------------------------

    def _autocast(self):
        if not self.cfg.amp:
            return contextlib.nullcontext()
        if self.env.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def _mean_across_ranks(self, value: float) -> float:
        if not self.env.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.env.device if self.env.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.item() / self.env.world_size

    def _gather(self, obj) -> list:
        if not self.env.distributed:
            return [obj]
        out = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def _progress(self, total: int, desc: str):
        if not self.env.is_main or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def _log(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, flush=True)
