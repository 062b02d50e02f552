"""Weights: where they come from, how they reach the cache, and how they load into a model.

A `WeightEntry` names one set of weights: its source (an https URL, a Hugging Face hub repo
and filename, a file shipped inside the package, or a local path), an optional sha256, the
file format, and the key layout it was saved in (``zoo``, ``timm`` or ``official``). Each model
family owns the converters from foreign layouts to its own keys; `load_weights` tries them
and keeps the one whose keys fit the model exactly.

Cache layout: ``$ZOO_HOME/weights/<model>/<tag>/<filename>``, ``$ZOO_HOME`` defaulting to
``~/.cache/zoo``. Downloads go through a temporary file and an atomic rename, and are checked
by sha256 when it is known: a mismatch deletes the file and raises. With ``ZOO_OFFLINE=1`` or
``HF_HUB_OFFLINE=1`` (or no network) a missing file raises a `WeightsError` that names the file
and the exact path to put it at.

Loading never unpickles code: safetensors, or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import socket
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping

import torch

from zoo.errors import WeightsError
from zoo.io import atomic_write, sha256_file

__all__ = [
    "WeightEntry",
    "NotThisLayout",
    "timm_hub_entry",
    "zoo_home",
    "is_offline",
    "cached_path",
    "fetch",
    "read_state_dict",
    "extract_state_dict",
    "load_weights",
    "LAYOUTS",
    "FORMATS",
]

LAYOUTS = ("zoo", "timm", "official")
FORMATS = ("safetensors", "pytorch")

Converter = Callable[[dict, torch.nn.Module], dict]


class NotThisLayout(WeightsError):
    """Raised by a key-layout converter given a state dict in some other layout, so
    `load_weights` tries the next one. Any other exception from a converter is a bug."""


@dataclass(frozen=True)
class WeightEntry:
    """One downloadable (or shipped) set of weights for a registered model.

    source: ``https://...`` (or ``http://``), ``hf-hub:<org>/<repo>`` (with `filename`),
        ``package:<zoo subpackage>/<relative path>``, ``manual:<page URL>`` (with `filename`:
        a file only a person can download, e.g. from Google Drive; the cache is checked and
        otherwise the error says where to save it), or a local filesystem path.
    filename: the file inside a hub repo; for URLs it defaults to the URL's last part.
    sha256: hex digest, checked after download and before use when given.
    format: ``safetensors`` or ``pytorch`` (a ``torch.save`` file).
    layout: the key layout the file uses: ``zoo``, ``timm`` or ``official``.
    """

    tag: str
    source: str
    filename: str | None = None
    sha256: str | None = None
    format: str = "pytorch"
    layout: str = "zoo"
    license: str | None = None
    description: str = ""

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"weight format {self.format!r} is not one of {FORMATS}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"weight layout {self.layout!r} is not one of {LAYOUTS}")
        if self.kind in ("hf", "manual") and not self.filename:
            raise ValueError(f"{self.kind} weight entry {self.tag!r} needs a filename")

    @property
    def kind(self) -> str:
        if self.source.startswith(("https://", "http://")):
            return "url"
        if self.source.startswith("hf-hub:"):
            return "hf"
        if self.source.startswith("package:"):
            return "package"
        if self.source.startswith("manual:"):
            return "manual"
        return "local"

    @property
    def file_name(self) -> str:
        if self.filename:
            return self.filename
        return self.source.rstrip("/").rsplit("/", 1)[-1]

    def to_dict(self) -> dict:
        return {
            "tag": self.tag,
            "source": self.source,
            "filename": self.file_name,
            "sha256": self.sha256,
            "format": self.format,
            "layout": self.layout,
            "license": self.license,
            "description": self.description,
        }


def timm_hub_entry(timm_name: str, tag: str, license: str, what: str) -> WeightEntry:
    """The weights timm re-hosts on the Hugging Face hub for its model `timm_name`, pretrained
    tag `tag` (``hf-hub:timm/<timm_name>.<tag>``, ``model.safetensors``, timm's key layout);
    `what` says what they were trained on, e.g. ``"ImageNet-1k, 224px"``."""
    return WeightEntry(
        tag, f"hf-hub:timm/{timm_name}.{tag}", filename="model.safetensors", format="safetensors",
        layout="timm", license=license, description=f"{what}, the official weights as re-hosted by timm",
    )


def zoo_home() -> Path:
    """The cache root: ``$ZOO_HOME``, else ``~/.cache/zoo``."""
    return Path(os.environ.get("ZOO_HOME") or Path.home() / ".cache" / "zoo").expanduser()


def is_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").strip().lower() in truthy for v in ("ZOO_OFFLINE", "HF_HUB_OFFLINE"))


def cached_path(model_name: str, entry: WeightEntry) -> Path:
    """Where the cache keeps (or expects) this entry's file."""
    return zoo_home() / "weights" / model_name / entry.tag / entry.file_name


def _origin(entry: WeightEntry) -> str:
    if entry.kind == "hf":
        return f"https://huggingface.co/{entry.source[len('hf-hub:'):]} (file {entry.filename})"
    if entry.kind == "manual":
        return entry.source[len("manual:"):]
    return entry.source


def fetch(model_name: str, entry: WeightEntry, progress: bool = True) -> Path:
    """Return a local path holding `entry`'s file, downloading it into the cache if needed."""
    if entry.kind == "local":
        path = Path(entry.source).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} for {model_name}:{entry.tag} does not exist.")
        return path
    if entry.kind == "package":
        pkg, _, rel = entry.source[len("package:"):].partition("/")
        path = Path(str(resources.files(pkg).joinpath(rel)))
        if not path.is_file():
            raise WeightsError(
                f"the weights shipped for {model_name}:{entry.tag} are missing from the installed package "
                f"(expected {path}); reinstall zoo."
            )
        _check_sha(path, entry, delete=False)
        return path

    dest = cached_path(model_name, entry)
    if dest.is_file():
        if entry.sha256 is None or sha256_file(dest) == entry.sha256:
            return dest
        # A cached file with the wrong digest is never used; fetch it again if we can.
        dest.unlink()
    if entry.kind == "manual":
        raise WeightsError(
            f"weights {model_name}:{entry.tag} cannot be downloaded automatically (the host needs a browser). "
            f"Open {_origin(entry)}, download {entry.file_name} and put it at {dest}, "
            f"or pass its path as pretrained=<path>."
        )
    if is_offline():
        raise WeightsError(
            f"weights {model_name}:{entry.tag} are not in the cache and downloads are off "
            f"(ZOO_OFFLINE/HF_HUB_OFFLINE). Get {entry.file_name} from {_origin(entry)} and put it at {dest}"
        )
    host = urllib.parse.urlsplit(entry.source if entry.kind == "url" else _hf_endpoint()).hostname
    if host and not _resolves(host):
        # the host does not resolve: no network here, or a typo; clients would retry for minutes
        raise _missing_hint(model_name, entry, dest, f"{host} does not resolve: this machine seems to be offline")
    if entry.kind == "url":
        _download_url(entry.source, dest, entry, model_name, progress)
    else:
        _download_hf(dest, entry, model_name)
    return dest


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


def _resolves(host: str) -> bool:
    """Whether `host` has an address (one DNS lookup; an IP literal always does)."""
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def _missing_hint(model_name: str, entry: WeightEntry, dest: Path, why: str) -> WeightsError:
    return WeightsError(
        f"could not download weights {model_name}:{entry.tag} ({why}). If this machine has no network, "
        f"get {entry.file_name} from {_origin(entry)} and put it at {dest}"
    )


def _download_url(url: str, dest: Path, entry: WeightEntry, model_name: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "zoo"})
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except (urllib.error.URLError, OSError) as e:
        raise _missing_hint(model_name, entry, dest, str(getattr(e, "reason", e))) from e
    digest = hashlib.sha256()
    total = int(response.headers.get("Content-Length") or 0) or None
    try:
        with response, atomic_write(dest) as out, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress, leave=False
        ) as bar:
            received = 0  # counted here: a disabled tqdm bar does not count
            while block := response.read(1 << 20):
                out.write(block)
                digest.update(block)
                received += len(block)
                bar.update(len(block))
            if total is not None and received != total:
                raise WeightsError(
                    f"download of {url} stopped after {received} of {total} bytes; nothing was kept, try again."
                )
            if entry.sha256 and digest.hexdigest() != entry.sha256:
                raise WeightsError(
                    f"sha256 of the file downloaded from {url} is {digest.hexdigest()}, expected {entry.sha256}; "
                    "the file was deleted. The server may be serving another version: report it, or pass a local "
                    "file with pretrained=<path>."
                )
    except (urllib.error.URLError, OSError) as e:
        raise _missing_hint(model_name, entry, dest, f"connection broke: {e}") from e


def _download_hf(dest: Path, entry: WeightEntry, model_name: str) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a core dependency
        raise _missing_hint(model_name, entry, dest, "huggingface_hub is not installed") from None
    repo_id = entry.source[len("hf-hub:"):]
    try:
        got = Path(hf_hub_download(repo_id, entry.filename, local_dir=dest.parent))
    except Exception as e:  # hub errors are many types; all mean the same to the user here
        raise _missing_hint(model_name, entry, dest, f"{type(e).__name__}: {e}") from e
    if got != dest:  # only when filename has folders in it
        os.replace(got, dest)
    _check_sha(dest, entry, delete=True)


def _check_sha(path: Path, entry: WeightEntry, delete: bool) -> None:
    if entry.sha256 is None:
        return
    got = sha256_file(path)
    if got != entry.sha256:
        if delete:
            path.unlink(missing_ok=True)
        raise WeightsError(
            f"sha256 of {path} is {got}, expected {entry.sha256} for {entry.tag}"
            + ("; the file was deleted, fetch it again." if delete else "; the installation is damaged, reinstall zoo.")
        )


# --------------------------------------------------------------------------------------
# Reading files


def _file_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise WeightsError(f"{path} is empty.")
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise WeightsError(
        f"{path} is neither a safetensors file nor a torch.save file; supported formats: {', '.join(FORMATS)}."
    )


def read_state_dict(path: str | os.PathLike, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{key: tensor}`` dict on the CPU, safely.

    Accepts safetensors, ``torch.save`` zip and legacy files, plain state dicts or checkpoints
    that wrap one under ``model``/``state_dict``/``state_dict_ema``/... (see `extract_state_dict`).
    Raises `WeightsError` for a missing, empty, truncated, corrupt or code-carrying file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist.")
    kind = _file_kind(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise WeightsError(f"{path} is a truncated or corrupt safetensors file ({e}); download it again.") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise WeightsError(
                f"refused to load {path}: it pickles Python objects that are not plain tensors and containers, "
                f"which could run code ({first}). If you trust it, load it yourself with torch.load("
                "weights_only=False) and save its state dict with safetensors or torch.save."
            ) from None
        raise WeightsError(f"{path} is a truncated or corrupt torch file ({first}); download it again.") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path} is a truncated or corrupt torch file ({first}); download it again.") from None
    return extract_state_dict(obj, prefer_ema=prefer_ema, origin=str(path))


_WRAPPER_KEYS = ("model", "state_dict", "model_state", "model_state_dict", "module", "net", "params")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema")


def extract_state_dict(obj, prefer_ema: bool = False, origin: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the flat state dict inside a checkpoint and strip a DDP ``module.`` prefix.

    Wrapper keys tried, in order: the EMA keys first when `prefer_ema`, then ``model``,
    ``state_dict``, ``model_state``, ``model_state_dict``, ``module``, ``net``, ``params``,
    then the EMA keys.
    """
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{origin} holds a {type(obj).__name__}, not a state dict.")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = dict(obj)
        if all(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        return sd
    order = (_EMA_KEYS + _WRAPPER_KEYS) if prefer_ema else (_WRAPPER_KEYS + _EMA_KEYS)
    for key in order:
        if isinstance(obj.get(key), Mapping) and obj[key]:
            return extract_state_dict(obj[key], prefer_ema, origin)
    raise WeightsError(
        f"no state dict found in {origin}; its top-level keys are {sorted(map(str, obj))[:10]}."
    )


# --------------------------------------------------------------------------------------
# Loading into a model


def _identity(sd: dict, model: torch.nn.Module) -> dict:
    return dict(sd)


def _fit(converted: dict, target: dict) -> tuple[set, set]:
    return set(target) - set(converted), set(converted) - set(target)


def load_weights(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    converters: Mapping[str, Converter] | None = None,
    layout: str | None = None,
    head_keys: tuple[str, ...] = (),
    origin: str = "weights",
) -> str:
    """Load `state_dict` into `model`, converting from a foreign key layout when needed.

    converters: layout name -> ``fn(state_dict, model) -> state_dict`` in the model's layout.
        ``zoo`` is tried first; it is the identity unless the family gives its own (e.g. one
        that resizes position-bias tables for another input size).
    layout: only try this layout (the weight entry's own); None detects it by trying each
        and keeping the one whose keys match the model exactly.
    head_keys: key prefixes of the classifier; their shape mismatches are allowed (the
        model keeps its freshly initialised head), as when fine-tuning to new classes.

    Returns the layout used. On any mismatch raises `WeightsError` and leaves `model` as it was.
    """
    converters = {"zoo": _identity, **dict(converters or {})}
    if layout is not None and layout not in converters:
        raise WeightsError(f"{type(model).__name__} has no converter for the {layout!r} key layout.")
    target = model.state_dict()
    names = [layout] if layout else list(converters)
    best = None
    for name in names:
        try:
            converted = converters[name](dict(state_dict), model)
        except NotThisLayout:
            continue  # the converter recognised another layout; any other error is a bug in it
        missing, unexpected = _fit(converted, target)
        score = len(missing) + len(unexpected)
        if best is None or score < best[0]:
            best = (score, name, converted, missing, unexpected)
        if score == 0:
            break
    arch = type(model).__name__
    if best is None:
        raise WeightsError(f"{origin} could not be read as any of the {arch} key layouts {names}.")
    _, name, converted, missing, unexpected = best
    if missing or unexpected:
        raise WeightsError(
            f"{origin} does not fit {arch} (closest layout {name!r}): {len(missing)} missing keys "
            f"{sorted(missing)[:4]}, {len(unexpected)} unexpected keys {sorted(unexpected)[:4]}. "
            "Is it for another architecture or variant?"
        )
    bad = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in converted.items() if v.shape != target[k].shape]
    head_bad = [b for b in bad if head_keys and b[0].startswith(head_keys)]
    if len(head_bad) != len(bad):
        rest = [b for b in bad if b not in head_bad][:4]
        raise WeightsError(
            f"{origin} has the {arch} keys but other shapes ({len(bad)} tensors, e.g. "
            + ", ".join(f"{k}: file {a} vs model {b}" for k, a, b in rest)
            + "). It is for another variant or configuration."
        )
    for k, *_ in head_bad:
        converted[k] = target[k]  # keep the new head: num_classes differs from the file's
    float_bad = [k for k, v in converted.items() if v.is_floating_point() != target[k].is_floating_point()]
    if float_bad:
        raise WeightsError(f"{origin} has tensors of the wrong kind for {arch}: {float_bad[:4]}.")
    model.load_state_dict(converted, strict=True)
    return name

