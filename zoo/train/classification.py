"""Image classification on the shared engine: ImageFolder data, timm transforms, mixup/cutmix,
label smoothing, and DeiT-style hard distillation into a model's distillation head.

Distillation (``distill=TEACHER``, as EfficientFormer was trained): the student must have a
distillation head (``set_distilled_training``), which in training returns ``(cls, dist)``
logits. Loss = ``0.5 * base(cls, target) + 0.5 * CE(dist, argmax teacher(x))``: the base
loss sees the (possibly mixed) labels, the distillation head the teacher's hard decisions on
the same (mixed) images, as in DeiT's ``hard`` mode. At eval the model averages the heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ConfigError, WeightsError
from zoo.metrics.classification import classification_sums, summarize
from zoo.data.images import ImageFolder, eval_transform
from zoo.train.engine import Dist, epoch_loader

__all__ = ["ClassificationConfig", "ClassificationTask", "build_classifier"]


@dataclass
class ClassificationConfig:
    data_dir: str = ""
    train_split: str = "train"
    val_split: str = "val"
    model: str = ""
    pretrained: str | bool = False
    initial_checkpoint: str = ""
    num_classes: int | None = None
    img_size: int | None = None
    drop_path: float | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.1
    workers: int = 2
    batch_size: int = 32
    validation_batch_size: int | None = None
    distill: str = ""
    distill_pretrained: str | bool = True
    seed: int = 42
    hflip: float = 0.5
    color_jitter: float = 0.4
    scale: tuple[float, float] = (0.08, 1.0)


def build_classifier(name: str, *, num_classes: int | None, img_size: int | None = None, drop_path: float | None = None,
                     pretrained=False, initial_checkpoint: str = "") -> nn.Module:
    """A registered model with its weights: ``pretrained`` (tag, True, or path) then, if given,
    ``initial_checkpoint`` (a file; a checkpoint of another architecture is refused)."""
    from zoo.registry import create_model, model_card

    card = model_card(name)
    overrides = {}
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if img_size is not None and img_size != card.input.shape[-1]:
        overrides["img_size"] = img_size
    if drop_path is not None:
        overrides["drop_path_rate"] = drop_path
    model = create_model(name, pretrained=pretrained or False, **overrides)
    if initial_checkpoint:
        check_checkpoint_arch(initial_checkpoint, name)
        model = _load_into(model, name, initial_checkpoint, overrides)
    return model


def check_checkpoint_arch(path: str, arch: str) -> None:
    """`WeightsError` when a training checkpoint names another architecture."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"checkpoint {p} does not exist.")
    if p.suffix in (".safetensors",):
        return
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - the loader below gives the precise error
        return
    other = obj.get("arch") if isinstance(obj, dict) else None
    if other and other != arch:
        raise WeightsError(f"{p} is a checkpoint of {other}, not {arch}; pick the matching --model.")


def _load_into(model: nn.Module, name: str, path: str, overrides: dict) -> nn.Module:
    from zoo.registry import create_model

    loaded = create_model(name, pretrained=path, **overrides)
    model.load_state_dict(loaded.state_dict())
    return model


def _load_teacher(teacher: nn.Module, name: str, pretrained) -> None:
    """Load the teacher's weights strictly: a head for other classes is an error, not a fresh head."""
    from zoo.hub import fetch, load_weights, read_state_dict
    from zoo.registry import model_card

    card = model_card(name)
    if pretrained in (True, "True", "true"):
        if card.default_tag is None:
            raise WeightsError(f"the teacher {name} has no default weights; pass --distill-pretrained <file>.")
        pretrained = card.default_tag
    if isinstance(pretrained, str) and pretrained in card.weights:
        path, layout = fetch(name, card.weights[pretrained]), card.weights[pretrained].layout
    else:
        path, layout = Path(str(pretrained)), None
        if not path.is_file():
            raise WeightsError(f"teacher weights {path} do not exist.")
    load_weights(teacher, read_state_dict(path), card.layouts, layout, (), origin=f"teacher {path}")


class ClassificationTask:
    """The `Task` for image classification (see `zoo.train.engine`)."""

    eval_metric = "top1"
    higher_is_better = True

    def __init__(self, cfg: ClassificationConfig, env: Dist):
        from timm.data import Mixup, create_transform, resolve_data_config
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        from zoo.registry import model_card

        self.cfg, self.env = cfg, env
        self.arch = cfg.model
        card = model_card(cfg.model)  # unknown model: error before touching data
        self.train_set = ImageFolder(cfg.data_dir, cfg.train_split)
        self.val_set = ImageFolder(cfg.data_dir, cfg.val_split)
        classes = self.train_set.classes
        if self.val_set.classes != classes:
            raise ConfigError(f"{cfg.val_split}/ has classes {self.val_set.classes}, {cfg.train_split}/ has {classes}; "
                              "they must be the same folders.")
        if cfg.num_classes is not None and cfg.num_classes != len(classes):
            raise ConfigError(f"--num-classes {cfg.num_classes} disagrees with the {len(classes)} class folders in "
                              f"{Path(cfg.data_dir) / cfg.train_split}; drop the flag or fix the data.")
        self.num_classes = len(classes)
        self.unreadable = self.train_set.unreadable + self.val_set.unreadable
        if self.unreadable and env.is_main:
            shown = ", ".join(self.unreadable[:5]) + (" ..." if len(self.unreadable) > 5 else "")
            print(f"warning: {len(self.unreadable)} unreadable image(s) skipped: {shown}", flush=True)
        self._skipped = 0

        size = cfg.img_size or card.input.shape[-1]
        pcfg = {"input_size": (3, size, size), "mean": card.input.mean, "std": card.input.std,
                "crop_pct": card.input.crop_pct, "interpolation": card.input.interpolation}
        data_cfg = resolve_data_config({}, pretrained_cfg=pcfg)
        self.train_set.transform = create_transform(
            data_cfg["input_size"], is_training=True, interpolation=data_cfg["interpolation"], mean=data_cfg["mean"],
            std=data_cfg["std"], hflip=cfg.hflip, color_jitter=cfg.color_jitter, scale=cfg.scale)
        self.val_set.transform = eval_transform(card.input, size)

        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                               num_classes=self.num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.teacher = None

    # --- model --------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        c = self.cfg
        model = build_classifier(c.model, num_classes=self.num_classes, img_size=c.img_size, drop_path=c.drop_path,
                                 pretrained=c.pretrained, initial_checkpoint=c.initial_checkpoint)
        if c.distill:
            if not callable(getattr(model, "set_distilled_training", None)):
                raise ConfigError(f"--distill needs a model with a distillation head; {c.model} has none "
                                  "(the EfficientFormer models have one).")
            model.set_distilled_training(True)
            # The teacher must already predict these classes (fine-tune it first): built with
            # the data's class count, its weights must fill that head.
            teacher = build_classifier(c.distill, num_classes=self.num_classes, img_size=c.img_size)
            _load_teacher(teacher, c.distill, c.distill_pretrained)
            self.teacher = teacher.eval().requires_grad_(False).to(self.env.device)
        return model

    # --- data ---------------------------------------------------------------------------------

    def train_loader(self, epoch: int):
        n = len(self.train_set) // self.env.world_size
        drop_last = n >= self.cfg.batch_size  # a short last batch would break mixup's pairing
        return epoch_loader(self.train_set, self.cfg.batch_size, epoch, self.cfg.seed, self.env,
                            workers=self.cfg.workers, drop_last=drop_last)

    def train_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        x, y, skipped = batch
        self._skipped += int(skipped.sum())
        x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
        if self.mixup is not None and x.shape[0] % 2 == 0:
            x, y = self.mixup(x, y)
        elif self.mixup is not None:  # odd batch: mixup needs pairs; plain smoothed targets instead
            y = F.one_hot(y, self.num_classes).float() * (1 - self.cfg.smoothing) + self.cfg.smoothing / self.num_classes
        out = model(x)
        if self.teacher is not None:
            cls, dist_out = out
            with torch.no_grad():
                hard = self.teacher(x).argmax(dim=1)
            loss = 0.5 * self.criterion(cls, y) + 0.5 * F.cross_entropy(dist_out, hard)
        else:
            loss = self.criterion(out, y)
        return loss, x.shape[0]

    def epoch_notes(self) -> dict:
        skipped = self._skipped
        self._skipped = 0
        if self.env.distributed:
            t = torch.tensor([skipped], dtype=torch.int64)
            dist.all_reduce(t)
            skipped = int(t.item())
        return {"skipped_images": skipped} if skipped else {}

    # --- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        return evaluate_classifier(model, self.val_set, self.cfg.validation_batch_size or self.cfg.batch_size,
                                   self.cfg.workers, self.env)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset, batch_size: int, workers: int, env: Dist) -> dict:
    """Top-1, top-5 (percent) and mean cross-entropy over the whole `dataset`.

    Each rank evaluates a disjoint strided shard (no padding, unlike DistributedSampler) and
    the sums are all-reduced, so the figures are exact and the same on every rank.
    """
    was_training = model.training
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(env.rank, len(dataset), env.world_size))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers)
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@k, loss sum, count
    for x, y, _ in loader:
        x, y = x.to(env.device), y.to(env.device)
        sums += classification_sums(model(x), y)
    if env.distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    return summarize(sums)
