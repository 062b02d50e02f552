"""PSF's three training stages as tasks on the shared engine (see `zoo.train.engine`).

1. ``flow``: rectified flow from noise to data (:func:`zoo.models.psf.flow.flow_loss`).
2. ``reflow``: the stage-1 model's N-step Euler sampler turns stored noise into samples;
   the (noise, sample) pairs are saved (:func:`make_pairs`) and a model, initialised from
   stage 1, is retrained on them, which straightens its paths.
3. ``distill``: pairs from the stage-2 model's multi-step sampler; a model initialised from
   stage 2 learns the one-step map ``x0 + v(x0, 0)`` under Chamfer distance (or EMD).
   With ``distill_teacher="flow"`` the targets are the stage-1 model's samples instead
   (the reflow pairs themselves when their steps match, with fresh ones only beyond their
   count): the straightened model is then only the student's starting point, and the
   targets keep the flow's quality.

With ``num_given > 0`` the same stages train the completion model
(`zoo.models.psf.completion`): the data are partial/complete pairs
(`zoo.data.pointclouds.ProceduralCompletion`), the network sees the given points beside
the generated ones, every loss is on the generated points only, and the pairs files also
hold each pair's given points (``given [P,K,3]``). Its flow stage may start from a
generator's checkpoint (``init``), widened for the given-point flag.

:func:`run_pipeline` runs all three (and both pair generations) into one folder.
Pairs files are safetensors with ``x0`` and ``x1`` ``[P,N,3]`` float32, written atomically.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from zoo.errors import ConfigError, DataError
from zoo.io import atomic_write
from zoo.metrics.pointcloud import chamfer_distance, emd
from zoo.models.psf.completion import ConditionedField, widen_state_dict
from zoo.models.psf.flow import flow_loss, sample_euler
from zoo.models.psf.pvcnn import PVCNN2, PVCNN2Config
from zoo.train.engine import Dist, Engine, TrainConfig, epoch_loader, setup_distributed
from zoo.data.pointclouds import ProceduralCompletion, ProceduralShapes, ShapeNetPC15k

__all__ = ["distill_loss", "PSFConfig", "PSFTask", "PairsDataset", "make_pairs", "make_completion_pairs",
           "join_pairs", "run_pipeline", "load_velocity"]

STAGES = ("flow", "reflow", "distill")


def distill_loss(model: nn.Module, x0: torch.Tensor, target: torch.Tensor, metric: str = "cd") -> torch.Tensor:
    """Per-cloud ``[B]`` distance between the one-step result ``x0 + v(x0, 0)`` and ``target``.

    ``metric``: ``cd`` (Chamfer, squared L2, PSF's choice) or ``emd`` (Sinkhorn EMD on squared
    distances; differentiable through the matched costs).
    """
    pred = x0 + model(x0, torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype))
    return chamfer_distance(pred, target) if metric == "cd" else emd(pred, target, squared=True)


@dataclass
class PSFConfig:
    """One stage's task settings (the engine's settings are a separate `TrainConfig`)."""

    stage: str = "flow"
    arch: str = "psf"
    model: PVCNN2Config = field(default_factory=PVCNN2Config)
    data: str = "procedural"            # "procedural" or a ShapeNetCore.v2.PC15k folder
    categories: tuple = ("airplane",)
    num_shapes: int = 64                # procedural set size
    normalize_data: bool = False        # procedural: PC15k-style global normalization (PC15k always)
    pairs: str = ""                     # reflow / distill: the pairs file to train on
    init: str = ""                      # checkpoint to start from (previous stage)
    val_fraction: float = 0.125         # pairs / shapes held out for the eval loss (0: eval on train)
    distill_metric: str = "cd"
    num_given: int = 0                  # > 0: the completion model, with this many given points
    data_mean: tuple | None = None      # completion: the generator's normalization, to share its coordinates
    data_std: float | None = None
    batch_size: int = 16
    workers: int = 0
    seed: int = 42


class PairsDataset(Dataset):
    """(noise, sample) pairs from :func:`make_pairs`: items ``{"x0": [N,3], "x1": [N,3]}``, plus
    ``"given": [K,3]`` in a completion pairs file (:func:`make_completion_pairs`)."""

    def __init__(self, path: str | Path, indices: torch.Tensor | None = None):
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise DataError(f"pairs file {path} does not exist; make it with make_pairs() or `run_pipeline`.")
        data = load_file(str(path))
        if set(data) - {"given"} != {"x0", "x1"} or data["x0"].shape != data["x1"].shape or data["x0"].dim() != 3 \
                or ("given" in data and (data["given"].dim() != 3 or len(data["given"]) != len(data["x0"]))):
            raise DataError(f"{path} is not a pairs file (want x0 and x1 of one shape [P,N,3], and for completion "
                            "given [P,K,3]).")
        self.x0, self.x1, self.given = data["x0"], data["x1"], data.get("given")
        self.indices = torch.arange(len(self.x0)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        item = {"x0": self.x0[j], "x1": self.x1[j]}
        if self.given is not None:
            item["given"] = self.given[j]
        return item


@torch.no_grad()
def make_pairs(model: nn.Module, path: str | Path, num: int, num_points: int, steps: int,
               seed: int = 0, batch_size: int = 16, device: str | torch.device = "cpu") -> Path:
    """Sample ``num`` clouds with ``steps`` Euler steps from seeded noise; save the pairs atomically."""
    from safetensors.torch import save

    model = model.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(num, num_points, 3, generator=g)
    x1 = torch.cat([sample_euler(model, x0[s:s + batch_size].to(device), steps).cpu()
                    for s in range(0, num, batch_size)])
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(save({"x0": x0.contiguous(), "x1": x1.contiguous()}))
    return path


@torch.no_grad()
def make_completion_pairs(model: nn.Module, path: str | Path, dataset: ProceduralCompletion, num: int, steps: int,
                          seed: int = 0, batch_size: int = 16, device: str | torch.device = "cpu") -> Path:
    """Completion pairs: ``num`` partial clouds from ``dataset`` (cycling through its shapes,
    a fresh cut each), seeded noise for the generated points, the teacher's ``steps``-step result."""
    from safetensors.torch import save

    model = model.to(device).eval()
    state = np.random.get_state()
    np.random.seed(seed)
    given = torch.stack([dataset[i % len(dataset)]["given"] for i in range(num)])
    np.random.set_state(state)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(num, dataset.num_points - dataset.num_given, 3, generator=g)
    x1 = torch.cat([sample_euler(ConditionedField(model, given[s:s + batch_size].to(device)),
                                 x0[s:s + batch_size].to(device), steps).cpu() for s in range(0, num, batch_size)])
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(save({"x0": x0.contiguous(), "x1": x1.contiguous(), "given": given.contiguous()}))
    return path


def join_pairs(sources: list[Path], dest: str | Path, limit: int | None = None) -> Path:
    """Write the pairs of ``sources`` one after another (the first ``limit`` only) to ``dest``, atomically."""
    from safetensors.torch import load_file, save

    parts = [load_file(str(p)) for p in sources]
    if len({frozenset(p) for p in parts}) != 1:
        raise DataError(f"{[str(p) for p in sources]} are not all pairs of one kind (generator or completion).")
    joined = {k: torch.cat([p[k] for p in parts])[:limit].contiguous() for k in parts[0]}
    dest = Path(dest)
    with atomic_write(dest, "wb") as f:
        f.write(save(joined))
    return dest


def load_velocity(path: str | Path, config: PVCNN2Config, prefer_ema: bool = True) -> PVCNN2:
    """A PVCNN2 with the weights of an engine checkpoint (EMA weights when present).

    A generator's checkpoint loads into a network with extra input channels (the completion
    model's flag) through `widen_state_dict`."""
    from zoo.hub import read_state_dict

    model = PVCNN2(config)
    sd = read_state_dict(Path(path), prefer_ema=prefer_ema)
    if config.extra_feature_channels and set(sd) == set(model.state_dict()) and any(
            sd[k].shape != v.shape for k, v in model.state_dict().items()):
        sd = widen_state_dict(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path} does not fit this PVCNN2 config (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); pass the config it was trained with.")
    return model


class PSFTask:
    """The `Task` for one PSF stage; eval metric ``loss`` (lower is better) on held-out data."""

    eval_metric = "loss"
    higher_is_better = False

    def __init__(self, cfg: PSFConfig, env: Dist):
        if cfg.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, not {cfg.stage!r}")
        if cfg.distill_metric not in ("cd", "emd"):
            raise ConfigError(f"distill_metric must be cd or emd, not {cfg.distill_metric!r}")
        self.cfg, self.env, self.arch = cfg, env, cfg.arch
        n = cfg.model.num_points
        if cfg.num_given and (cfg.data != "procedural" or cfg.model.extra_feature_channels != 1):
            raise ConfigError("the completion model trains on the procedural shapes, with extra_feature_channels=1 "
                              "in its PVCNN2Config (the given-point flag).")
        if cfg.stage == "flow" and cfg.num_given:
            full = ProceduralCompletion(cfg.num_shapes, n, cfg.num_given, seed=cfg.seed, random_view=True,
                                        normalize=cfg.normalize_data, mean=cfg.data_mean, std=cfg.data_std)
            size = len(full)
            self.data_mean, self.data_std = full.mean, full.std
        elif cfg.stage == "flow":
            if cfg.data == "procedural":
                full = ProceduralShapes(cfg.num_shapes, tr_sample_size=n, te_sample_size=n, seed=cfg.seed,
                                        normalize=cfg.normalize_data)
            else:
                full = ShapeNetPC15k(cfg.data, cfg.categories, "train", n, n)
            size = len(full)
            self.data_mean, self.data_std = full.mean, full.std
        else:
            if not cfg.pairs:
                raise ConfigError(f"stage {cfg.stage} trains on (noise, sample) pairs: pass pairs=<file>.")
            full = PairsDataset(cfg.pairs)
            size = len(full)
            if full.x0.shape[1] + (full.given.shape[1] if full.given is not None else 0) != n:
                raise ConfigError(f"the pairs hold {full.x0.shape[1]} points but the model is built for {n}.")
            if (full.given is not None) != bool(cfg.num_given):
                raise ConfigError("completion pairs train the completion model (num_given > 0), generator pairs "
                                  "the generator.")
        n_val = max(1, int(round(size * cfg.val_fraction))) if size > 1 and cfg.val_fraction > 0 else 0
        perm = torch.randperm(size, generator=torch.Generator().manual_seed(cfg.seed))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        if len(train_idx) == 0:
            raise DataError(f"{size} item(s) leave nothing to train on after holding out {n_val}.")
        self.train_set = torch.utils.data.Subset(full, train_idx.tolist())
        if isinstance(full, ProceduralCompletion):  # a fixed cut per held-out shape: a steady eval loss
            full = ProceduralCompletion(cfg.num_shapes, n, cfg.num_given, seed=cfg.seed, random_view=False,
                                        normalize=cfg.normalize_data, mean=cfg.data_mean, std=cfg.data_std)
        self.val_set = torch.utils.data.Subset(full, val_idx.tolist()) if n_val else self.train_set

    def build_model(self) -> nn.Module:
        if self.cfg.init:
            return load_velocity(self.cfg.init, self.cfg.model)
        return PVCNN2(self.cfg.model)

    def train_loader(self, epoch: int):
        return epoch_loader(self.train_set, self.cfg.batch_size, epoch, self.cfg.seed, self.env,
                            workers=self.cfg.workers)

    def _loss(self, model: nn.Module, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = self.env.device
        if "given" in batch:  # completion: the field of the generated points given the partial ones
            model = ConditionedField(model, batch["given"].to(dev))
        if self.cfg.stage == "flow":
            x1 = batch["train_points"].to(dev)
            x0 = t = None
            if generator is not None:  # evaluation: fixed noise and times
                x0 = torch.randn(x1.shape, generator=generator).to(dev)
                t = torch.rand(x1.shape[0], generator=generator).to(dev)
            return flow_loss(model, x1, x0, t)
        x0, x1 = batch["x0"].to(dev), batch["x1"].to(dev)
        if self.cfg.stage == "reflow":
            t = None if generator is None else torch.rand(x1.shape[0], generator=generator).to(dev)
            return flow_loss(model, x1, x0, t)
        return distill_loss(model, x0, x1, self.cfg.distill_metric)

    def train_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        loss = self._loss(model, batch)
        return loss.mean(), loss.shape[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        was = model.training
        model.eval()
        g = torch.Generator().manual_seed(self.cfg.seed + 1)
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.cfg.batch_size, shuffle=False)
        state = torch.get_rng_state()  # dataset draws must not shift the training RNG
        total, count = 0.0, 0
        for batch in loader:
            loss = self._loss(model, batch, g)
            total, count = total + loss.sum().item(), count + loss.shape[0]
        torch.set_rng_state(state)
        model.train(was)
        return {"loss": total / max(count, 1)}

    def epoch_notes(self) -> dict:
        return {}


def run_pipeline(out: str | Path, model: PVCNN2Config, train: dict[str, TrainConfig], data: str = "procedural",
                 num_shapes: int = 64, num_pairs: int = 64, reflow_steps: int = 100, distill_steps: int = 100,
                 batch_size: int = 16, seed: int = 42, distill_metric: str = "cd", normalize_data: bool = False,
                 env: Dist | None = None, distill_pairs: int | None = None, num_given: int = 0,
                 flow_init: str | Path = "", data_mean=None, data_std=None, distill_teacher: str = "reflow") -> dict:
    """Flow, reflow pairs, reflow, distill pairs, distill; returns the checkpoints and pairs files.

    ``train`` maps each stage to its engine settings (epochs, lr...); their ``output`` is
    set to ``out`` and ``experiment`` to the stage name. The result also holds the data's
    normalization (``data_mean [1,3]``, ``data_std [1,1]``) to store with the generator.
    ``distill_pairs`` (default ``num_pairs``) sizes the distillation set on its own: the
    one-step generator is trained on those noises only.
    ``num_given > 0`` trains the completion model (module docstring); ``flow_init`` starts
    the flow stage from a checkpoint (for completion, a generator's, widened); ``data_mean``
    and ``data_std`` fix the normalization (a generator's, so both share coordinates).
    ``distill_teacher``: whose samples the one-step model learns, ``reflow`` (PSF's) or
    ``flow`` (module docstring).
    """
    if distill_teacher not in ("reflow", "flow"):
        raise ConfigError(f"distill_teacher must be reflow or flow, not {distill_teacher!r}")
    out = Path(out)
    env = env or setup_distributed("cpu")
    paths: dict[str, Path] = {}
    init, pairs = str(flow_init or ""), ""
    mean = None if data_mean is None else tuple(float(v) for v in np.asarray(data_mean).reshape(-1))
    std = None if data_std is None else float(np.asarray(data_std).reshape(-1)[0])
    for stage in STAGES:
        if stage in ("reflow", "distill"):
            steps = reflow_steps if stage == "reflow" else distill_steps
            count = num_pairs if stage == "reflow" or distill_pairs is None else distill_pairs
            from_flow = stage == "distill" and distill_teacher == "flow"
            # the reflow pairs already are the flow's samples of seeded noise: train on them again,
            # and sample only the pairs beyond their count
            reused = min(count, num_pairs) if from_flow and steps == reflow_steps else 0
            dest = out / f"pairs_{stage}.safetensors"
            if reused < count:
                teacher = load_velocity(paths["flow"] if from_flow else init, model)
                fresh = dest.with_name(f"pairs_{stage}_fresh.safetensors") if reused else dest
                if num_given:
                    shapes = ProceduralCompletion(num_shapes, model.num_points, num_given, seed=seed, random_view=True,
                                                  normalize=normalize_data, mean=mean, std=std)
                    make_completion_pairs(teacher, fresh, shapes, count - reused, steps, seed=seed + len(paths),
                                          batch_size=batch_size, device=env.device)
                else:
                    make_pairs(teacher, fresh, count - reused, model.num_points, steps, seed=seed + len(paths),
                               batch_size=batch_size, device=env.device)
                if reused:
                    join_pairs([Path(pairs), fresh], dest)
                    fresh.unlink()
                pairs = str(dest)
            elif reused < num_pairs:
                pairs = str(join_pairs([Path(pairs)], dest, reused))
            paths[f"pairs_{stage}"] = Path(pairs)
        prefix = "psf_completion" if num_given else "psf"
        cfg = PSFConfig(stage=stage, arch=f"{prefix}_{stage}", model=model, data=data, num_shapes=num_shapes,
                        pairs=pairs, init=init, distill_metric=distill_metric, batch_size=batch_size, seed=seed,
                        normalize_data=normalize_data, num_given=num_given, data_mean=mean, data_std=std)
        tc = train[stage]
        tc.output, tc.experiment = str(out), stage
        record = {"psf": {k: v for k, v in asdict(cfg).items() if k != "model"}, "model": asdict(model),
                  "train": asdict(tc)}
        task = PSFTask(cfg, env)
        if stage == "flow":
            paths["data_mean"], paths["data_std"] = task.data_mean, task.data_std
        Engine(task, tc, args_record=_plain(record), env=env).fit()
        init = str(out / stage / "model_best.pth.tar")
        paths[stage] = Path(init)
    return paths


def _plain(obj):
    """YAML-safe copy: tuples become lists."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
