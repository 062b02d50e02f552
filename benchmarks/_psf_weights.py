"""Shared by the PSF training scripts: pick a stage's better weights, write them as float16
safetensors, and install them over the package's file."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from zoo.hub import read_state_dict
from zoo.io import atomic_write, sha256_file


def best_weights(stage_dir: str | Path) -> tuple[dict, str]:
    """The stage's weights with the lowest held-out loss: the EMA of its best epoch, or the raw
    weights of its last epoch when those scored lower (a short stage's EMA still lags behind)."""
    stage_dir = Path(stage_dir)
    rows = list(csv.DictReader(open(stage_dir / "summary.csv")))
    best_ema = min(float(r["eval_loss"]) for r in rows)
    last_raw = float(rows[-1].get("eval_raw_loss") or "inf")
    if last_raw < best_ema:
        ckpt = torch.load(stage_dir / "last.pth.tar", map_location="cpu", weights_only=True)
        return ckpt["state_dict"], f"raw weights of the last epoch (held-out loss {last_raw:.5g}, EMA's best {best_ema:.5g})"
    best = stage_dir / "model_best.pth.tar"
    kind = "EMA" if "state_dict_ema" in torch.load(best, map_location="cpu", weights_only=True) else "weights"
    return read_state_dict(best, prefer_ema=True), f"{kind} of the best epoch (held-out loss {best_ema:.5g})"


def write_weights(dest: Path, sd: dict, data_mean, data_std, metadata: dict) -> None:
    """``velocity.*`` in float16 plus the data statistics in float32, atomically."""
    from safetensors.torch import save

    half = {f"velocity.{k}": v.half().contiguous() for k, v in sd.items()}
    # the data statistics stay in float32: they scale every generated point
    half["data_mean"] = torch.as_tensor(data_mean, dtype=torch.float32).reshape(3).contiguous()
    half["data_std"] = torch.as_tensor(data_std, dtype=torch.float32).reshape(1).contiguous()
    with atomic_write(dest, "wb") as f:
        f.write(save(half, metadata={k: str(v) for k, v in metadata.items()}))


def package(run_dir: str | Path, name: str, paths: dict, metadata: dict, installed: Path | None,
            sha_constant: str, start: float) -> Path:
    """Write ``<name>_procedural.safetensors`` from the run's distillation stage into ``run_dir``,
    copy it over ``installed`` when given, and print its size, digest and what to update."""
    sd, which = best_weights(Path(run_dir) / "distill")
    dest = Path(run_dir) / f"{name}_procedural.safetensors"
    write_weights(dest, sd, paths["data_mean"], paths["data_std"],
                  {"model": name, "stages": "flow,reflow,distill", **metadata, "weights": which})
    print(f"distilled weights: {which}")
    if installed is not None:
        with atomic_write(installed, "wb") as f:
            f.write(dest.read_bytes())
    print(f"done in {(time.time() - start) / 60:.1f} min; {dest} ({dest.stat().st_size / 1e6:.2f} MB, "
          f"sha256 {sha256_file(dest)})" + (f"; installed as {installed}: set {sha_constant} in "
                                            "models/psf/__init__.py to this digest" if installed else ""))
    return dest
