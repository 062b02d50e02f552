"""What an export traces: `ExportTarget`, and `prepare_target` that builds one from a model or name.

Export code never special-cases a model. An image model (anything with a ``pretrained_cfg``
or a registry card of kind ``image``) is traced as ``module(image)`` with an ``image``
input ``[B, C, H, W]`` and a ``logits`` output. Any other model provides
``export_wrapper(input_shape=None)`` returning an `ExportTarget`, a dict of its fields (so the
model needs nothing from this package), or ``(module, example_inputs)``: e.g. a point cloud
generator returns its one-step sampler and a noise tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from zoo.errors import ConfigError, ExportError, ZooError

__all__ = ["ExportTarget", "prepare_target"]


@dataclass
class ExportTarget:
    """A module and the example inputs it is traced with.

    inputs: one example per positional argument; the first dimension of every input and
        output is the batch (made dynamic where the format allows it).
    mean, std: per-channel normalisation of an image input (CoreML folds them into its
        image preprocessing); ``None`` for non-image inputs.
    onnx_exporter: the torch ONNX exporter this model is known to export with, used when
        ``to_onnx`` is asked for ``exporter="auto"``; ``None`` means the default (dynamo).
    output_shapes: the outputs' shapes at the example inputs, recorded by `prepare_target`
        when it runs the module once.
    """

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    name: str
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    metadata: dict = field(default_factory=dict)
    reparameterized: bool = False
    onnx_exporter: str | None = None
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.inputs = tuple(self.inputs)
        if not self.input_names:
            self.input_names = [f"input{i}" for i in range(len(self.inputs))] if len(self.inputs) > 1 else ["input"]
        if not self.output_names:
            self.output_names = ["output"]

    @property
    def is_image(self) -> bool:
        return self.mean is not None and len(self.inputs) == 1 and self.inputs[0].dim() == 4

    def example(self, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs like `inputs` with another batch size (standard normal, fixed seed)."""
        g = torch.Generator().manual_seed(seed)
        return tuple(
            torch.randn((batch_size, *t.shape[1:]), generator=g, dtype=torch.float32).to(t.dtype)
            if t.is_floating_point() else t.new_zeros((batch_size, *t.shape[1:]))
            for t in self.inputs
        )


def _positive_shape(input_shape) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"input_shape must be positive sizes, got {tuple(input_shape)}.")
    return shape


def _image_shape(shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """``(C, H, W)`` or ``(B, C, H, W)`` as ``(B, C, H, W)``."""
    if shape is None:
        return None
    if len(shape) not in (3, 4):
        raise ConfigError(f"an image model's input_shape is (C, H, W) or (B, C, H, W), got {shape}.")
    return shape if len(shape) == 4 else (1, *shape)


def prepare_target(
    model: nn.Module | str,
    *,
    pretrained=None,
    input_shape=None,
    reparam: bool = True,
) -> ExportTarget:
    """Build the model if given by name, reparameterize it (on a copy), and pick its example inputs.

    model: a registered name (built with `pretrained`, and with ``img_size`` set from
        `input_shape` when that differs from the card's) or an ``nn.Module`` (never modified).
    input_shape: ``(C, H, W)`` or ``(B, C, H, W)`` for image models; default the model's
        ``pretrained_cfg["input_size"]`` at batch 1. A model with an ``export_wrapper``
        receives it as given (PSF: ``(N, 3)`` or ``(B, N, 3)``).

    Raises `UnknownModelError` for an unknown name and `ConfigError` for an input the model
    cannot take; the model is run once on the example inputs to find out, before any file is
    written.
    """
    from zoo.export.reparam import reparameterize

    shape = _positive_shape(input_shape)
    if isinstance(model, str):
        module = _build(model, pretrained, shape)
        name = model
        owned = True
    elif isinstance(model, nn.Module):
        if pretrained not in (None, False):
            raise ConfigError("pretrained= applies only to a model given by name; load weights into the module first.")
        module = model
        cfg = getattr(model, "pretrained_cfg", None) or {}
        name = cfg.get("architecture") or type(model).__name__
        owned = False
    else:
        raise ConfigError(f"expected a registered model name or an nn.Module, got {type(model).__name__}.")

    if reparam:
        module = reparameterize(module, inplace=owned)
    elif not owned:
        import copy

        module = copy.deepcopy(module)
    module = module.eval().float()

    wrapper = getattr(module, "export_wrapper", None)
    if callable(wrapper):
        target = wrapper(input_shape=shape)
        if isinstance(target, dict):
            target = ExportTarget(**{"name": "", **target})
        elif not isinstance(target, ExportTarget):
            sub, inputs = target
            target = ExportTarget(module=sub, inputs=tuple(inputs), name=name)
        target.name = target.name or name
        # Wrappers build fresh modules (in training mode): an exporter that restores the mode
        # it found would switch dropout on in the torch reference.
        target.module.eval()
    else:
        shape = _image_shape(shape)
        cfg = getattr(module, "pretrained_cfg", None) or {}
        if "input_size" not in cfg:
            raise ConfigError(
                f"{name} has no pretrained_cfg['input_size'] and no export_wrapper(); give it one of them "
                "so export knows what to trace."
            )
        shape = shape or (1, *cfg["input_size"])
        g = torch.Generator().manual_seed(0)
        target = ExportTarget(
            module=module,
            inputs=(torch.randn(shape, generator=g),),
            name=name,
            input_names=["image"],
            output_names=["logits"],
            mean=tuple(cfg["mean"]) if "mean" in cfg else None,
            std=tuple(cfg["std"]) if "std" in cfg else None,
            metadata={"num_classes": cfg.get("num_classes"), "crop_pct": cfg.get("crop_pct"),
                      "interpolation": cfg.get("interpolation"), "weights": cfg.get("tag")},
        )
    target.reparameterized = reparam
    _check_runs(target, user_shape=input_shape is not None)
    return target


def _build(name: str, pretrained, shape) -> nn.Module:
    from zoo.registry import create_model, model_card

    card = model_card(name)  # UnknownModelError with suggestions
    if card.task == "3d-detection":
        raise ExportError(f"{name} is a 3D detector: export its dense parts (`zoo export {name}`, or "
                          "zoo.models.pathfusion.export_parts); the sparse backbone does not export.")
    overrides = {}
    if shape is not None and card.input.kind == "image":
        shape = _image_shape(shape)
        if shape[1] != card.input.shape[0]:
            raise ConfigError(f"{name} takes {card.input.shape[0]}-channel images, not {shape[1]}.")
        if tuple(shape[2:]) != tuple(card.input.shape[1:]):
            if shape[2] != shape[3] or "img_size" not in card.accepted_overrides():
                raise ConfigError(
                    f"{name} cannot take {shape[2]}x{shape[3]} inputs: it is built for square images of one "
                    "size (give one side, e.g. --img-size 256)."
                )
            overrides["img_size"] = shape[2]
    if isinstance(pretrained, Path):
        pretrained = str(pretrained)
    return create_model(name, pretrained=pretrained if pretrained not in (None, "") else False, **overrides)


def _check_runs(target: ExportTarget, user_shape: bool) -> None:
    """Run the module once on its example inputs and record the output shapes. With a shape
    the user chose, a shape error is theirs (`ConfigError`, the cause chained); with the
    model's own example input, any failure is a bug and propagates as it is."""
    try:
        with torch.no_grad():
            out = target.module(*target.inputs)
    except ZooError:
        raise
    except (RuntimeError, ValueError, IndexError) as e:
        if not user_shape:
            raise
        shapes = ", ".join(str(tuple(t.shape)) for t in target.inputs)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{target.name} cannot take inputs of shape {shapes}: {first}") from e
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise ConfigError(f"{target.name} must return a tensor or a tuple of tensors to be exported.")
    target.output_shapes = [tuple(o.shape) for o in outs]
    if len(target.output_names) != len(outs):
        target.output_names = [f"output{i}" for i in range(len(outs))] if len(outs) > 1 else target.output_names[:1]
