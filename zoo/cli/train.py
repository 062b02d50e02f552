"""``zoo train`` and ``zoo validate``: timm's ``train.py`` / ``validate.py`` flags on the shared engine.

Flags keep timm's names and meanings. ``-c/--config`` reads a YAML file of the same keys
(dashes or underscores); flags given on the command line win over it, as in timm.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zoo.errors import ConfigError

__all__ = ["add_train_arguments", "add_validate_arguments", "run_train", "run_validate", "parse_train_args",
           "run_detection_train", "run_gan_train"]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default="", help="YAML file of these options (command-line flags win)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", "--data", dest="data_dir", default="", help="ImageFolder root with train/ and val/")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--workers", "-j", type=int, default=2)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="", help="registered model name (zoo list)")
    g.add_argument("--pretrained", nargs="?", const=True, default=False,
                   help="start from the default weights, or a weight tag / file")
    g.add_argument("--initial-checkpoint", default="", help="load these weights before training")
    g.add_argument("--num-classes", type=int, default=None, help="must match the class folders (default: them)")
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--drop-path", type=float, default=None)
    g.add_argument("--distill", default="", help="teacher model for DeiT hard distillation into the distillation head")
    g.add_argument("--distill-pretrained", default=True, help="teacher weights: tag or file (default: its default)")
    g.add_argument("--model-config", default="",
                   help="a model-config file (zoo slim writes them; it names the model), or a detector's architecture YAML")
    g.add_argument("--gt-sample", default="Car:20,Pedestrian:15,Cyclist:15",
                   help="3D detection: ground-truth sampling targets CLASS:COUNT,... or 'none'")
    g = p.add_argument_group("optimisation")
    g.add_argument("-b", "--batch-size", type=int, default=32)
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("--opt", default="adamw")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: --lr-base scaled by batch size)")
    g.add_argument("--lr-base", type=float, default=0.1, help="lr at --lr-base-size global batch")
    g.add_argument("--lr-base-size", type=int, default=256)
    g.add_argument("--lr-base-scale", default="", help="'linear' or 'sqrt' (default: sqrt for adaptive optimizers)")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--sched", default="cosine")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--warmup-epochs", type=int, default=0)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value"))
    g.add_argument("--grad-accum-steps", type=int, default=1)
    g.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA)")
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g = p.add_argument_group("augmentation")
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0))
    g = p.add_argument_group("GAN (3D human generation: zoo.train.gan)")
    g.add_argument("--g-lr", type=float, default=0.0025, help="generator Adam lr")
    g.add_argument("--d-lr", type=float, default=0.002, help="discriminator Adam lr (before the lazy-R1 ratio)")
    g.add_argument("--r1-gamma", type=float, default=None, help="R1 weight (default: 0.0002 * img_size^2 / batch)")
    g.add_argument("--d-reg-interval", type=int, default=16, help="R1 on every Nth discriminator step")
    g.add_argument("--ema-kimg", type=float, default=10.0, help="generator EMA half-life in thousands of images")
    g.add_argument("--ema-rampup", type=float, default=0.05, help="EMA ramp-up ratio (0: none)")
    g.add_argument("--style-mixing", type=float, default=0.9)
    g.add_argument("--blur-sigma", type=float, default=10.0, help="discriminator input blur at the start (pixels)")
    g.add_argument("--blur-fade-kimg", type=float, default=200.0, help="thousands of images to fade the blur out")
    g.add_argument("--num-images", type=int, default=256, help="built-in data (no --data-dir): how many images")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output", default="output/train")
    g.add_argument("--experiment", default="")
    g.add_argument("--resume", default="", help="continue a run from its last.pth.tar")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")


# OpenPCDet's KITTI recipe where the engine has the knob (its adam_onecycle at lr 0.003, weight
# decay 0.01, gradient norm clipped at 10; batch 4): the defaults for a 3D detector, which a
# -c YAML and command-line flags still override
DETECTION_DEFAULTS = {"lr": 0.003, "weight_decay": 0.01, "clip_grad": 10.0, "batch_size": 4, "opt": "adamw",
                      "workers": 0}


def parse_train_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` with a YAML ``--config`` applied as defaults (timm's two-pass scheme)."""
    p = argparse.ArgumentParser(prog="zoo train")
    add_train_arguments(p)
    return _apply_config(p, argv)


def _task_of(name: str) -> str:
    from zoo.registry import model_card

    try:
        return model_card(name).task if name else ""
    except Exception:  # noqa: BLE001  (an unknown name is reported later, with suggestions)
        return ""


def _is_detector(name: str) -> bool:
    return _task_of(name) == "3d-detection"


def _is_gan(name: str) -> bool:
    return _task_of(name) == "3d-human-generation"


# a GAN's step size is --g-lr / --d-lr and it keeps a constant rate, as StyleGAN2 does
GAN_DEFAULTS = {"batch_size": 8, "sched": "none", "img_size": 64, "workers": 0, "weight_decay": 0.0}


def _apply_config(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    import yaml

    first, _ = p.parse_known_args(argv)
    cfg_model = ""
    if first.config and Path(first.config).is_file():
        loaded = yaml.safe_load(Path(first.config).read_text())
        cfg_model = loaded.get("model", "") if isinstance(loaded, dict) else ""
    if _is_detector(first.model or cfg_model):
        p.set_defaults(**DETECTION_DEFAULTS)
    if _is_gan(first.model or cfg_model):
        p.set_defaults(**GAN_DEFAULTS)
    if first.config:
        path = Path(first.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist.")
        cfg = yaml.safe_load(path.read_text()) or {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path} must hold a mapping of option: value.")
        known = {a.dest for a in p._actions}
        cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"{path} has unknown options {unknown}; they are the command-line flags' names.")
        p.set_defaults(**cfg)
    return p.parse_args(argv)


def run_train(args: argparse.Namespace, callbacks=None) -> dict:
    """Train as `args` says; returns the best eval metrics (with their epoch)."""
    from zoo.train.classification import ClassificationConfig, ClassificationTask
    from zoo.cli.models import apply_model_config
    from zoo.train.engine import Engine, TrainConfig, setup_distributed

    if args.model_config or not args.model:
        apply_model_config(args, "model")  # a slimmed model's file names the model
    if not args.model:
        raise ConfigError("--model is required (zoo list shows the names).")
    if _is_detector(args.model):
        return run_detection_train(args, callbacks)
    if _is_gan(args.model):
        return run_gan_train(args, callbacks)
    if not args.data_dir:
        raise ConfigError("--data-dir is required: a folder with train/ and val/ class folders.")
    env = setup_distributed(args.device)
    ccfg = ClassificationConfig(**{k: getattr(args, k) for k in ClassificationConfig.__dataclass_fields__
                                   if hasattr(args, k)})
    ccfg.scale = tuple(ccfg.scale)
    tcfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)})
    task = ClassificationTask(ccfg, env)
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"}
    try:
        return Engine(task, tcfg, args_record=record, env=env, callbacks=callbacks).fit()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_detection_train(args: argparse.Namespace, callbacks=None) -> dict:
    """Train a registered 3D detector on a KITTI root (`zoo.train.detection`)."""
    from zoo.train.detection import DetectionConfig, DetectionTask
    from zoo.train.engine import Engine, TrainConfig, setup_distributed

    env = setup_distributed(args.device)
    dcfg = DetectionConfig(**{k: getattr(args, k) for k in DetectionConfig.__dataclass_fields__ if hasattr(args, k)})
    tcfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)})
    task = DetectionTask(dcfg, env)
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"}
    try:
        return Engine(task, tcfg, args_record=record, env=env, callbacks=callbacks).fit()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_gan_train(args: argparse.Namespace, callbacks=None) -> dict:
    """Train a registered 3D human generator as LSV-GAN (`zoo.train.gan`) on a ``dataset.json``
    folder, or on the built-in synthetic humans without ``--data-dir``."""
    from zoo.train.engine import Engine, TrainConfig, setup_distributed
    from zoo.train.gan import GANConfig, LSVGANTask

    env = setup_distributed(args.device)
    gcfg = GANConfig(model=args.model, resolution=args.img_size, data_dir=args.data_dir, num_images=args.num_images,
                     batch_size=args.batch_size, g_lr=args.g_lr, d_lr=args.d_lr, r1_gamma=args.r1_gamma,
                     d_reg_interval=args.d_reg_interval, ema_kimg=args.ema_kimg,
                     ema_rampup=args.ema_rampup or None, style_mixing=args.style_mixing,
                     blur_sigma=args.blur_sigma, blur_fade_kimg=args.blur_fade_kimg, seed=args.seed)
    tcfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)})
    task = LSVGANTask(gcfg, env)
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"}
    return Engine(task, tcfg, args_record=record, env=env, callbacks=callbacks).fit()


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="")
    p.add_argument("--model-config", default="", help="a model-config file (zoo slim writes them; it names the model)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint or weights file")
    p.add_argument("--data-dir", "--data", dest="data_dir", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--workers", "-j", type=int, default=2)
    p.add_argument("--use-ema", action="store_true", help="evaluate state_dict_ema when the checkpoint has one")
    p.add_argument("--reparam", action="store_true", help="also evaluate the deploy form; the figures must agree")


def run_validate(args: argparse.Namespace) -> dict:
    """Top-1/top-5 of a checkpoint on ``data_dir/split`` (and of its deploy form with --reparam)."""
    from zoo.cli.models import apply_model_config

    from zoo.export import reparameterize
    from zoo.hub import read_state_dict
    from zoo.registry import model_card
    from zoo.train.classification import build_classifier, check_checkpoint_arch, evaluate_classifier
    from zoo.data.images import ImageFolder, eval_transform
    from zoo.train.engine import Dist

    apply_model_config(args, "model")
    card = model_card(args.model)
    data = ImageFolder(args.data_dir, args.split)
    check_checkpoint_arch(args.checkpoint, args.model)
    sd = read_state_dict(Path(args.checkpoint), prefer_ema=args.use_ema)
    model = build_classifier(args.model, num_classes=len(data.classes), img_size=args.img_size)
    from zoo.hub import load_weights

    load_weights(model, sd, card.layouts, None, (), origin=args.checkpoint)  # no head reset: classes must match
    data.transform = eval_transform(card.input, args.img_size)
    env = Dist()
    result = {"model": args.model, "checkpoint": args.checkpoint, "images": len(data), **evaluate_classifier(
        model, data, args.batch_size, args.workers, env)}
    print(f"{args.model} on {Path(args.data_dir) / args.split} ({len(data)} images): "
          f"top-1 {result['top1']:.3f}  top-5 {result['top5']:.3f}  loss {result['loss']:.4f}")
    if args.reparam:
        deployed = evaluate_classifier(reparameterize(model), data, args.batch_size, args.workers, env)
        result["reparam"] = deployed
        print(f"deploy form: top-1 {deployed['top1']:.3f}  top-5 {deployed['top5']:.3f}  loss {deployed['loss']:.4f}")
        if abs(deployed["top1"] - result["top1"]) > 100 / max(len(data), 1) + 1e-9:
            print("warning: the deploy form's top-1 differs by more than one image", file=sys.stderr)
    return result


def _cmd_train(args) -> int:
    p = argparse.ArgumentParser(prog="zoo train")
    add_train_arguments(p)
    run_train(_apply_config(p, args.rest))
    return 0


def _cmd_validate(args) -> int:
    run_validate(args)
    return 0


def register(sub) -> None:
    # `zoo train` re-parses its arguments itself, so a YAML --config can supply defaults.
    s = sub.add_parser("train", help="fine-tune a model with timm's train.py flags (also under torchrun)",
                       add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("validate", help="top-1/top-5 of a checkpoint on an image folder")
    add_validate_arguments(s)
    s.set_defaults(func=_cmd_validate)
