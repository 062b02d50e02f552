"""Latency and throughput of zoo models, optionally against timm's model of the same name, in one run.

This is the harness every performance figure in the README comes from. For each model:

- **zoo**: the deploy form (`zoo.export.reparameterize`), run on the chosen backend;
- **timm** (``compare="timm"``): ``timm.create_model(name)`` run on the same backend, with the
  same random weights (timm's init, BatchNorm statistics randomised, loaded into both), so
  the two outputs are checked to agree before anything is timed.

Backends: ``torch`` (eager, ``torch.inference_mode``, CPU), ``onnxruntime`` (each model
exported with `zoo.export.to_onnx` (timm's as-is, zoo's deploy form) and run by the CPU
execution provider with the same thread count) and ``cuda`` (eager on the GPU, optional
fp16/bf16 weights and channels-last; timed with CUDA events).

Timing: `warmup` calls each, then `reps` rounds; in each round both models run once, in
alternating order, so machine noise hits both alike. Reported: median and p90 latency per
call, throughput ``batch_size / median``. Nothing here asserts on time.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from zoo.errors import ConfigError, UnknownModelError, require

__all__ = ["BenchmarkResult", "benchmark", "expand_names", "BACKENDS"]

BACKENDS = ("torch", "onnxruntime", "cuda")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BenchmarkResult:
    """One model on one backend. Times in milliseconds per call; ``peer_*`` are timm's."""

    model: str
    backend: str
    batch_size: int
    img_size: int
    threads: int
    dtype: str
    params: int
    macs: int
    median_ms: float
    p90_ms: float
    throughput: float
    peer: str | None = None
    peer_median_ms: float | None = None
    peer_p90_ms: float | None = None
    ratio: float | None = None  # zoo median / peer median: below 1 is faster
    max_rel_diff: float | None = None  # zoo vs peer outputs on the benchmark input

    def to_dict(self) -> dict:
        return asdict(self)


def expand_names(items: Sequence[str]) -> list[str]:
    """Model names, family names (``efficientvit``) or shell patterns (``efficientformer*``)."""
    from zoo.registry import list_families, list_models, model_card

    names: list[str] = []
    for item in items:
        if item in list_families():
            found = list_models(family=item)
        elif any(c in item for c in "*?["):
            found = list_models(item)
        else:
            model_card(item)  # UnknownModelError with suggestions
            found = [item]
        if not found:
            raise UnknownModelError(f"{item!r} matches no registered model; `zoo list` shows them all.")
        names += [n for n in found if n not in names]
    return names


def _quantile(ts: list[float], q: float) -> float:
    s = sorted(ts)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _build_pair(name: str, img_size: int | None, compare: str | None):
    """zoo's model (not yet reparameterized) and timm's, sharing random weights."""
    from zoo.registry import create_model, model_card
    from zoo.testing import randomize_

    card = model_card(name)
    overrides = {"img_size": img_size} if img_size and img_size != card.input.shape[-1] else {}
    ours = create_model(name, **overrides)
    peer = None
    if compare == "timm":
        import timm

        if name not in timm.list_models():
            raise ConfigError(f"timm has no model named {name}; run without --compare.")
        peer = timm.create_model(name, **overrides).eval()
        randomize_(peer, scale=0.1)
        ours.load_state_dict(peer.state_dict())
    elif compare is not None:
        raise ConfigError(f"compare must be 'timm' or None, not {compare!r}.")
    else:
        randomize_(ours, scale=0.1)
    return ours.eval(), peer


def _torch_runner(model, x, device: str, dtype: str, channels_last: bool) -> Callable[[], torch.Tensor]:
    model = model.to(device=device, dtype=DTYPES[dtype])
    x = x.to(device=device, dtype=DTYPES[dtype])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            return model(x)

    return run


def _ort_runner(model, x, threads: int, folder: Path, tag: str, reparam: bool) -> Callable:
    ort = require("onnxruntime", "export", "the onnxruntime backend")

    from zoo.export import to_onnx

    path = folder / f"{tag}.onnx"
    to_onnx(model, path, input_shape=tuple(x.shape), dynamic_batch=False, reparam=reparam, verbose=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: torch.from_numpy(sess.run(None, feed)[0])


def _timer(backend: str):
    if backend == "cuda":
        def timed(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    return timed


def benchmark(
    names: Sequence[str],
    *,
    backend: str = "torch",
    threads: int | None = None,
    batch_size: int = 1,
    img_size: int | None = None,
    compare: str | None = None,
    reps: int = 100,
    warmup: int = 10,
    dtype: str = "fp32",
    channels_last: bool = False,
    progress: Callable[[BenchmarkResult], None] | None = None,
) -> list[BenchmarkResult]:
    """Time each model (names, families or patterns) on `backend`; see the module docstring.

    threads: CPU threads for torch and onnxruntime (default: torch's current setting).
    dtype, channels_last: the ``cuda`` backend only (CPU runs are fp32, contiguous).
    progress: called with each result as soon as it is measured.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}.")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    if backend != "cuda" and (dtype != "fp32" or channels_last):
        raise ConfigError("fp16/bf16 and channels-last apply to the cuda backend; CPU runs are fp32.")
    if backend == "cuda" and not torch.cuda.is_available():
        raise ConfigError("the cuda backend needs a CUDA GPU, and torch sees none here.")
    if batch_size < 1 or reps < 1 or warmup < 0:
        raise ConfigError("batch_size and reps must be at least 1, warmup at least 0.")
    from zoo.export import prepare_target
    from zoo.flops import count_macs, count_params
    from zoo.registry import model_card

    names = expand_names(names)
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    timed = _timer(backend)
    results = []
    with tempfile.TemporaryDirectory(prefix="zoo-bench-") as tmp:
        for name in names:
            ours, peer = _build_pair(name, img_size, compare)
            card = model_card(name)
            # what export traces is what a deployment runs: the image model's forward, or
            # the module a model's export_wrapper names (PSF: the one-step sampler on noise)
            shape = tuple(ours.pretrained_cfg.get("input_size") or card.input.shape)
            target = prepare_target(ours, input_shape=(batch_size, *shape), reparam=True)
            deployed, x = target.module, target.inputs[0]
            size = x.shape[1:]
            # MACs as `zoo.complexity` counts them: the training form for image models
            macs = count_macs(ours if card.input.kind == "image" else deployed, (x[:1],))
            params = count_params(ours)
            if backend == "onnxruntime":
                run = _ort_runner(deployed, x, threads, Path(tmp), f"{name}-zoo", reparam=False)
                run_peer = _ort_runner(peer, x, threads, Path(tmp), f"{name}-timm", reparam=False) if peer else None
            else:
                device = "cuda" if backend == "cuda" else "cpu"
                run = _torch_runner(deployed, x, device, dtype, channels_last)
                run_peer = _torch_runner(copy.deepcopy(peer), x, device, dtype, channels_last) if peer else None
            diff = None
            if run_peer is not None:
                from zoo.testing import rel_err

                diff = rel_err(run().float().cpu(), run_peer().float().cpu())
            for _ in range(warmup):
                run()
                if run_peer:
                    run_peer()
            t_ours, t_peer = [], []
            for i in range(reps):
                pair = [(run, t_ours)] + ([(run_peer, t_peer)] if run_peer else [])
                for fn, sink in pair if i % 2 == 0 else pair[::-1]:
                    sink.append(timed(fn))
            med = statistics.median(t_ours)
            r = BenchmarkResult(
                model=name, backend=backend, batch_size=batch_size, img_size=size[-1], threads=threads,
                dtype=dtype, params=params, macs=macs, median_ms=med, p90_ms=_quantile(t_ours, 0.9),
                throughput=batch_size / med * 1e3,
            )
            if t_peer:
                pm = statistics.median(t_peer)
                r.peer, r.peer_median_ms, r.peer_p90_ms = "timm", pm, _quantile(t_peer, 0.9)
                r.ratio, r.max_rel_diff = med / pm, diff
            results.append(r)
            if progress:
                progress(r)
    return results
