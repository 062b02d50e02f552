"""The model registry: every model zoo can build, described by a `ModelCard`.

Families register their variants when `zoo.models` is imported. This module never imports a
family: the face (`zoo/__init__.py`) installs `set_loader`'s hook, which imports `zoo.models`
the first time a card is looked up, so ``import zoo`` stays cheap (timm's registry is filled
the same way, by importing its model package). A card says what the model is (family, task,
paper), how to build it (a builder and its architecture config), what it takes (an
`InputSpec`), what the paper reports (`Metric`s with their source), and which weights exist
(`WeightEntry`s with the key-layout converters the family owns). Params and MACs are not typed into cards: they
are computed on demand (`zoo.complexity`) and cached.
"""
from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from zoo.errors import ConfigError, UnknownModelError, WeightsError, closest
from zoo.hub import Converter, WeightEntry, fetch, load_weights, read_state_dict

__all__ = [
    "Paper",
    "InputSpec",
    "Metric",
    "ModelCard",
    "register_model",
    "register_model_config",
    "is_model_config",
    "list_models",
    "model_card",
    "create_model",
    "list_families",
    "set_loader",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Paper:
    title: str
    arxiv: str
    code: str = ""

    @property
    def url(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}"


@dataclass(frozen=True)
class InputSpec:
    """What a model's forward takes by default (batch dimension excluded).

    kind: ``image`` (a float ``[B, C, H, W]`` tensor, normalised with `mean`/`std`);
    ``point-noise`` (a ``[B, N, 3]`` cloud); ``partial-points`` (shape ``(K, M, 3)``: ``K``
    given points ``[B, K, 3]`` and the noise of ``M`` generated ones ``[B, M, 3]``); ``lidar-points`` (a detector's batch dict with
    ``points [B * N, 5]``: batch index, x, y, z, reflectance); ``lidar-camera`` (shape
    ``(N, 5, H, W)``: the same plus an ``[H, W, 3]`` uint8 ``image`` per sample and its
    ``lidar_to_image [B, 3, 4]`` projection).
    For images, `crop_pct` and `interpolation` describe the eval transform as timm does.
    """

    kind: str
    shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None

    def example(self, batch_size: int = 1, seed: int = 0) -> tuple:
        """Random positional inputs for one forward call (used for MACs, export, benchmarks).

        ``lidar-points`` (shape ``(N, 5)``): one batch dict of N points per sample, batch index
        first, spread over 40 m x 40 m in front of the sensor and 2 m of height."""
        g = torch.Generator().manual_seed(seed)
        if self.kind in ("lidar-points", "lidar-camera"):
            n = self.shape[0]
            pts = torch.rand((batch_size * n, 4), generator=g)
            pts[:, :3] = pts[:, :3] * torch.tensor([40.0, 40.0, 2.0]) - torch.tensor([0.0, 20.0, 2.0])
            idx = torch.arange(batch_size).repeat_interleave(n).float().unsqueeze(1)
            batch = {"points": torch.cat([idx, pts], 1), "batch_size": batch_size}
            if self.kind == "lidar-camera":
                h, w = self.shape[2:]
                f = w / 2  # a 90-degree camera at the sensor looking along +x: u = w/2 - f y/x, v = h/2 - f z/x
                m = torch.tensor([[w / 2, -f, 0.0, 0.0], [h / 2, 0.0, -f, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
                batch["image"] = [torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
                                  for _ in range(batch_size)]
                batch["lidar_to_image"] = m.expand(batch_size, 3, 4).clone()
            return (batch,)
        if self.kind == "partial-points":
            k, m, d = self.shape
            return (0.2 * torch.randn((batch_size, k, d), generator=g), torch.randn((batch_size, m, d), generator=g))
        return (torch.randn((batch_size, *self.shape), generator=g),)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Metric:
    """A figure the paper reports, with where it comes from."""

    value: float
    unit: str
    dataset: str
    source: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ModelCard:
    """Everything zoo knows about one registered model.

    builder: ``builder(**config) -> nn.Module``; its keyword parameters are the overrides
        `create_model` accepts.
    layouts: key-layout name (``timm``, ``official``) -> converter into this model's keys.
    head_keys: state-dict key prefixes of the classifier (reset when num_classes changes).
    feature_out_indices: timm's default ``out_indices`` for ``features_only`` (an int: the
        last n stages); None for a model that is no backbone.
    """

    name: str
    family: str
    task: str
    paper: Paper
    builder: Callable[..., torch.nn.Module]
    config: Mapping[str, Any]
    input: InputSpec
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    weights: Mapping[str, WeightEntry] = field(default_factory=dict)
    default_tag: str | None = None
    layouts: Mapping[str, Converter] = field(default_factory=dict)
    head_keys: tuple[str, ...] = ()
    feature_out_indices: tuple[int, ...] | int | None = None
    license: str = "unknown"
    description: str = ""

    def accepted_overrides(self) -> list[str]:
        params = inspect.signature(self.builder).parameters.values()
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def to_dict(self) -> dict:
        """The card as plain data (JSON-ready). Builds nothing: `zoo.complexity` gives params
        and MACs."""
        return {
            "name": self.name,
            "family": self.family,
            "task": self.task,
            "paper": {"title": self.paper.title, "arxiv": self.paper.arxiv, "url": self.paper.url, "code": self.paper.code},
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()},
            "input": self.input.to_dict(),
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "weights": {t: w.to_dict() for t, w in self.weights.items()},
            "default_weights": self.default_tag,
            "license": self.license,
            "description": self.description,
        }


_REGISTRY: dict[str, ModelCard] = {}
_loader: Callable[[], None] | None = None
_loaded = False


def set_loader(loader: Callable[[], None]) -> None:
    """Install the hook that registers the families (``import zoo.models``); called once by the
    face, so the registry itself imports no family."""
    global _loader
    _loader = loader


def register_model(card: ModelCard) -> ModelCard:
    """Add a card to the registry (called by each family module at import)."""
    if card.name in _REGISTRY and _REGISTRY[card.name] is not card:
        raise ValueError(f"model {card.name!r} is registered twice")
    if card.default_tag is not None and card.default_tag not in card.weights:
        raise ValueError(f"{card.name}: default weights {card.default_tag!r} are not among its weight entries")
    unknown = set(card.config) - set(card.accepted_overrides())
    if unknown:
        raise ValueError(f"{card.name}: config keys {sorted(unknown)} are not builder arguments")
    _REGISTRY[card.name] = card
    return card


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded and _loader is not None:
        _loaded = True  # set first, so a lookup made while the families import does not recurse
        try:
            _loader()
        except BaseException:
            _loaded = False
            raise


def list_models(pattern: str = "*", task: str | None = None, family: str | None = None) -> list[str]:
    """Registered model names matching a shell-style `pattern`, optionally one task/family, sorted."""
    _ensure_loaded()
    return sorted(
        name
        for name, card in _REGISTRY.items()
        if fnmatch.fnmatchcase(name, pattern)
        and (task is None or card.task == task)
        and (family is None or card.family == family)
    )


def list_families() -> list[str]:
    _ensure_loaded()
    return sorted({c.family for c in _REGISTRY.values()})


def model_card(name: str) -> ModelCard:
    """The card of a registered model; `UnknownModelError` (with the closest names) otherwise."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        near = closest(name, _REGISTRY)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise UnknownModelError(f"no model named {name!r}.{hint} `zoo list` shows them all.") from None


def create_model(name: str, pretrained: bool | str | Path = False, features_only: bool = False,
                 out_indices: int | tuple[int, ...] | None = None, **overrides) -> torch.nn.Module:
    """Build a registered model, optionally with weights.

    pretrained: ``False``; ``True`` for the card's default weights; a weight tag from the card;
        or a path to a local file (safetensors or torch, any supported key layout).
    overrides: architecture arguments replacing the card's config (``num_classes``,
        ``img_size``, ``drop_path_rate``...). Unknown ones raise `ConfigError` naming the valid
        ones. When ``num_classes`` differs from the weights', the classifier stays freshly
        initialised and the rest loads.
    features_only: return the backbone as timm does (`zoo.features.FeatureNet`): its forward
        gives the list of the stages' feature maps ``[B, C_i, H_i, W_i]``; the weights load into
        the full model first, so a classification checkpoint loads with its head dropped.
    out_indices: which stages (absolute, negative from the end, or an int for the last n);
        default the family's, as timm's (``card.feature_out_indices``).

    Returns the model in eval mode, on the CPU, with ``pretrained_cfg`` describing its input.
    """
    card = model_card(name)
    if (features_only or out_indices is not None) and card.feature_out_indices is None:
        raise ConfigError(f"{name} is a {card.task} model with no feature maps to return; features_only is for "
                          f"backbones: {', '.join(n for n in list_models() if _REGISTRY[n].feature_out_indices)}.")
    if out_indices is not None and not features_only:
        raise ConfigError("out_indices applies with features_only=True.")
    valid = card.accepted_overrides()
    bad = [k for k in overrides if k not in valid]
    if bad:
        raise ConfigError(f"{name} does not take {', '.join(map(repr, bad))}; valid overrides are: {', '.join(valid)}.")
    config = {**card.config, **overrides}
    if overrides:
        # an override of the wrong type or value surfaces deep in the builder; without
        # overrides the card's own config is known to build, so any failure is a bug
        try:
            model = card.builder(**config)
        except ConfigError:
            raise
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"cannot build {name} with {overrides}: {e}") from e
    else:
        model = card.builder(**config)
    # the model's own cfg is written once, by the model from its family's InputSpec (the one
    # the card holds); the registry adds only what it alone knows
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(architecture=name, tag=None)
    if pretrained is not False and pretrained is not None:
        cfg["tag"] = _load_pretrained(model, card, pretrained)
    model.pretrained_cfg = model.default_cfg = cfg  # default_cfg: the name older timm helpers read
    if features_only:
        from zoo.features import FeatureNet

        try:
            model = FeatureNet(model, card.feature_out_indices if out_indices is None else out_indices)
        except (AssertionError, IndexError) as e:  # timm's index check
            raise ConfigError(f"out_indices={out_indices!r} does not fit {name}'s {len(model.stages)} stages: "
                              f"{e or 'index out of range'}.") from e
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "architecture": name}
    return model.eval()


def _load_pretrained(model: torch.nn.Module, card: ModelCard, pretrained) -> str:
    entry = None
    if pretrained is True:
        if card.default_tag is None:
            raise WeightsError(
                f"{card.name} has no default weights; pass pretrained=<path to a file> "
                + (f"or one of the tags {sorted(card.weights)}." if card.weights else "or train it (`zoo train`).")
            )
        entry = card.weights[card.default_tag]
    elif isinstance(pretrained, str) and pretrained in card.weights:
        entry = card.weights[pretrained]
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            if isinstance(pretrained, str) and "/" not in pretrained and "." not in pretrained:
                near = closest(pretrained, card.weights)
                raise UnknownModelError(
                    f"{card.name} has no weights tagged {pretrained!r}; tags: {sorted(card.weights) or 'none'}"
                    + (f" (closest: {', '.join(near)})" if near else "")
                    + ". A local file path works too."
                )
            raise WeightsError(f"weights file {path} does not exist.")
        sd = read_state_dict(path)
        load_weights(model, sd, card.layouts, None, card.head_keys, origin=str(path))
        return str(path)
    path = fetch(card.name, entry)
    sd = read_state_dict(path)
    load_weights(model, sd, card.layouts, entry.layout, card.head_keys, origin=f"{card.name}:{entry.tag} ({path})")
    return entry.tag


# ------------------------------------------------------------------------------------------
# Model-config files: an architecture derived from a registered model (a slimmed backbone)

_FROM_CONFIG: dict[str, str] = {}  # name -> the file it was registered from


def is_model_config(path: str | Path) -> bool:
    """Whether `path` is a zoo model-config file (a mapping with ``name`` and ``base``), as
    `zoo slim` writes; a detector's architecture YAML is not one."""
    import yaml

    try:
        obj = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "name" in obj and "base" in obj


def register_model_config(path: str | Path) -> str:
    """Register the architecture of a model-config file and return its name.

    The file (YAML or JSON) holds ``name``, ``base`` (a registered model: builder, input,
    key layouts and family come from it), ``config`` (builder arguments replacing the base's),
    and optionally ``weights`` (a safetensors or torch file, relative to the config file: the
    card's default weights, tag ``config``), ``description`` and ``latency`` (what `zoo slim`
    predicted and measured, with the latency table's provenance; it becomes the card's
    metrics). Every command that takes a model name takes ``--model-config FILE`` through this.
    Registering the same name again from a config file replaces it; a built-in name cannot be
    reused.
    """
    import dataclasses

    import yaml

    path = Path(path)
    try:
        obj = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--model-config {path}: no such file.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--model-config {path} is not YAML or JSON: {e}") from None
    if not isinstance(obj, dict) or not {"name", "base"} <= set(obj):
        raise ConfigError(f"--model-config {path} is not a model-config file: it needs 'name' and 'base' "
                          "(and 'config'); zoo slim writes them.")
    name, base = str(obj["name"]), model_card(str(obj["base"]))
    config = dict(obj.get("config") or {})
    if name in _REGISTRY and name not in _FROM_CONFIG:
        raise ConfigError(f"--model-config {path}: {name!r} is a built-in model's name; choose another 'name'.")
    valid = base.accepted_overrides()
    bad = sorted(set(config) - set(valid))
    if bad:
        raise ConfigError(f"--model-config {path}: {base.name} does not take {bad}; its arguments are {valid}.")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    full = {**base.config, **config}
    spec = base.input
    if spec.kind == "image" and "img_size" in full:
        spec = dataclasses.replace(spec, shape=(spec.shape[0], int(full["img_size"]), int(full["img_size"])))
    weights, default = {}, None
    if obj.get("weights"):
        file = (path.parent / str(obj["weights"])).resolve()
        if not file.is_file():
            raise ConfigError(f"--model-config {path} names weights {file}, which does not exist.")
        fmt = "safetensors" if file.suffix == ".safetensors" else "pytorch"
        weights = {"config": WeightEntry("config", str(file), format=fmt, description=f"named by {path.name}")}
        default = "config"
    metrics = {}
    lat = obj.get("latency") or {}
    source = lat.get("table_provenance") or lat.get("backend") or "latency table"
    for key in ("predicted_ms", "measured_ms", "target_ms"):
        if isinstance(lat.get(key), (int, float)):
            metrics[f"latency_{key}"] = Metric(float(lat[key]), "ms", str(source),
                                               f"zoo slim, table {lat.get('table', '?')}")
    card = ModelCard(name=name, family=base.family, task=base.task, paper=base.paper, builder=base.builder,
                     config=full, input=spec, metrics=metrics, weights=weights, default_tag=default,
                     layouts=base.layouts, head_keys=base.head_keys, feature_out_indices=base.feature_out_indices,
                     license=base.license,
                     description=str(obj.get("description") or f"{base.name} with the architecture of {path.name}"))
    _REGISTRY.pop(name, None)
    _FROM_CONFIG[name] = str(path)
    register_model(card)
    return name
