"""Latency and throughput of zoo models, optionally against timm's model of the same name, in one run.

This is the harness every performance figure in the README comes from. For each model:

- **zoo**: the deploy form (`zoo.export.reparameterize`), run on the chosen backend;
- **timm** (``compare="timm"``): ``timm.create_model(name)`` run on the same backend, with the
  same random weights (timm's init, BatchNorm statistics randomised, loaded into both), so
  the two outputs are checked to agree before anything is timed.

Backends: ``torch`` (eager, ``torch.inference_mode``, CPU), ``onnxruntime`` (zoo's model as
``zoo export`` writes it, timm's as the ``ort`` peer below, run by the CPU execution provider
with the same thread count) and ``cuda`` (eager on the GPU, optional
fp16/bf16 weights and channels-last; timed with CUDA events).

Peers beyond timm eager (``peers=``, CPU torch backend, with ``compare="timm"``): what a
user would deploy timm's model with instead of zoo's deploy form, each with the same weights
and checked against zoo's output before timing:

- ``jit``: ``torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model)))``;
- ``compile``: ``torch.compile`` with inductor's ``freezing`` (needs a C++ compiler; the
  compile time is reported apart, in ``setup_s``);
- ``ort``: onnxruntime on timm's model as a user exports it: ``torch.onnx.export``'s
  TorchScript exporter, opset 17, static batch 1;
- ``zoo-ort``: onnxruntime on what ``zoo export NAME --format onnx`` writes with its default
  flags (the deploy form, dynamo exporter, opset 20, dynamic batch);
- ``zoo-int8``: onnxruntime on that file quantized to int8 with the model's rule
  (`zoo.export.quantize_onnx`), calibrated on random images (speed does not depend on them;
  its top-1 agreement with fp32 is measured by ``zoo export --quantize int8`` on real images).

Every figure of a row is from one run; ONNX peers also report their file's size.

Timing: `warmup` calls each, then `reps` rounds; in each round every runner runs once, the
order rotating from round to round, so machine noise hits all alike. With more than two
runners each timed call follows an untimed one of the same runner, so every route is timed
with its own data in the caches, as a deployment that runs one model would see it. Reported: median and p90
latency per call, throughput ``batch_size / median``, and each peer's median as a ratio
``zoo / peer`` (below 1: zoo is faster). Nothing here asserts on time.
"""
from __future__ import annotations

import copy
import shutil
import statistics
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from zoo.errors import ConfigError, UnknownModelError, require

__all__ = ["BenchmarkResult", "benchmark", "expand_names", "call_timer", "quantile", "BACKENDS", "PEERS"]

BACKENDS = ("torch", "onnxruntime", "cuda")
PEERS = ("eager", "jit", "compile", "ort", "zoo-ort", "zoo-int8")
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
    # further peers (``jit``, ``compile``, ``ort``, ``zoo-ort``): name -> {median_ms, p90_ms,
    # ratio (zoo / it), setup_s (tracing, compiling or exporting), max_rel_diff}
    others: dict = field(default_factory=dict)

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


def quantile(ts: list[float], q: float) -> float:
    """The `q` quantile of `ts` by nearest rank (no interpolation)."""
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


def _ort_runner(model, x, threads: int, folder: Path, tag: str, reparam: bool, exporter: str = "auto",
               opset: int = 20, dynamic: bool = False, path: Path | None = None) -> Callable:
    """A runner of `model` exported to ONNX (or of the file at `path`) in onnxruntime; the
    runner's ``onnx_path`` is the file it runs."""
    ort = require("onnxruntime", "export", "the onnxruntime backend")

    from zoo.export import to_onnx

    if path is None:
        path = folder / f"{tag}.onnx"
        to_onnx(model, path, input_shape=tuple(x.shape), dynamic_batch=dynamic, reparam=reparam, exporter=exporter,
                opset=opset, verbose=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # onnxruntime's pool threads spin after each run by default; interleaved with other runners
    # they steal the cores from whichever runs next (measured: timm jit.freeze ran 2x slower
    # beside spinning sessions, and the ORT ratios moved by up to 1.5x)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}

    def run():
        return torch.from_numpy(sess.run(None, feed)[0])

    run.onnx_path = path
    return run


def _int8_runner(deployed, x, threads: int, folder: Path, name: str) -> Callable:
    """onnxruntime on zoo's default export quantized with the model's int8 rule."""
    import numpy as np

    from zoo.export import QuantRule, quantize_onnx
    from zoo.registry import model_card

    fp32 = _ort_runner(deployed, x, threads, folder, f"{name}-zoo-int8-src", reparam=False, dynamic=True).onnx_path
    rng = np.random.default_rng(0)
    shape = (1, *x.shape[1:])
    calib = [rng.standard_normal(shape).astype(np.float32) for _ in range(32)]
    val = [rng.standard_normal(shape).astype(np.float32) for _ in range(8)]
    rule = QuantRule.from_model(getattr(model_card(name).builder, "int8_rule", None))
    report = quantize_onnx(fp32, folder / f"{name}-zoo-int8.onnx", calib, val, rule=rule, min_agreement=0.0)
    run = _ort_runner(None, x, threads, folder, "", reparam=False, path=folder / f"{name}-zoo-int8.onnx")
    run.int8_agreement = report.top1_agreement
    return run


def _jit_runner(model, x) -> Callable[[], torch.Tensor]:
    with torch.no_grad():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x).eval()))

    def run():
        with torch.no_grad():
            return frozen(x)

    return run


def has_cxx_compiler() -> bool:
    """Whether inductor can build CPU kernels here (it calls ``$CXX`` or ``g++``/``c++``)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++") if c)


def _compile_runner(model, x) -> Callable[[], torch.Tensor]:
    import torch._inductor.config as inductor_config

    # each model's forward is a fresh compile: dynamo caches per code object, and timm's models
    # of one family share theirs, so after a few variants it would stop compiling them
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled(x)  # the compile, timed by the caller as setup

    def run():
        with torch.no_grad():
            return compiled(x)

    return run


def _peer_runners(peers, peer, deployed, x, threads: int, folder: Path, name: str) -> dict:
    """name -> (runner, setup seconds) for the asked peers beyond timm eager."""
    out = {}
    for kind in peers:
        if kind == "eager":
            continue
        start = time.perf_counter()
        if kind == "jit":
            run = _jit_runner(copy.deepcopy(peer), x)
        elif kind == "compile":
            if not has_cxx_compiler():
                continue  # inductor's CPU backend needs one; the table says it was not run
            run = _compile_runner(copy.deepcopy(peer), x)
        elif kind == "ort":
            run = _ort_runner(peer, x, threads, folder, f"{name}-timm-ort", reparam=False, exporter="torchscript",
                              opset=17, dynamic=False)
        elif kind == "zoo-ort":
            run = _ort_runner(deployed, x, threads, folder, f"{name}-zoo-ort", reparam=False, dynamic=True)
        else:  # zoo-int8
            run = _int8_runner(deployed, x, threads, folder, name)
        run()
        out[kind] = (run, time.perf_counter() - start)
    return out


def call_timer(backend: str) -> Callable[[Callable[[], object]], float]:
    """A function timing one call of a no-argument callable in ms: CUDA events on ``cuda``,
    ``perf_counter`` otherwise."""
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
    peers: Sequence[str] = ("eager",),
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
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise ConfigError(f"peers must be among {', '.join(PEERS)}, not {', '.join(bad)}.")
    if set(peers) - {"eager"} and (compare != "timm" or backend != "torch"):
        raise ConfigError("the jit, compile, ort and zoo-ort peers are timed with --compare timm on the torch backend.")
    from zoo.export import prepare_target
    from zoo.flops import count_macs, count_params
    from zoo.registry import model_card

    names = expand_names(names)
    detectors = [n for n in names if model_card(n).task == "3d-detection"]
    if detectors:
        raise ConfigError(f"{', '.join(detectors)}: zoo benchmark times image models and point cloud generators; "
                          "benchmarks/sparse_conv.py times the 3D detectors.")
    if compare == "timm":
        import timm

        missing = [n for n in names if n not in timm.list_models()]
        if missing:  # before any model is timed, not after the first ones
            raise ConfigError(f"timm has no model named {', '.join(missing)}; run those without --compare.")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    timed = call_timer(backend)
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
                run = _ort_runner(deployed, x, threads, Path(tmp), f"{name}-zoo", reparam=False, dynamic=True)
                run_peer = _ort_runner(peer, x, threads, Path(tmp), f"{name}-timm", reparam=False, exporter="torchscript",
                                       opset=17, dynamic=False) if peer else None
            else:
                device = "cuda" if backend == "cuda" else "cpu"
                run = _torch_runner(deployed, x, device, dtype, channels_last)
                run_peer = _torch_runner(copy.deepcopy(peer), x, device, dtype, channels_last) if peer else None
            diff = None
            extra = _peer_runners(peers, peer, deployed, x, threads, Path(tmp), name) if peer is not None else {}
            from zoo.testing import rel_err

            reference = run().float().cpu()
            if run_peer is not None:
                diff = rel_err(reference, run_peer().float().cpu())
            runners = [run] + ([run_peer] if run_peer else []) + [r for r, _ in extra.values()]
            for _ in range(warmup):
                for fn in runners:
                    fn()
            times: list[list[float]] = [[] for _ in runners]
            for i in range(reps):
                k = i % len(runners)  # rotate the order: each runner leads equally often
                for j in list(range(k, len(runners))) + list(range(k)):
                    if len(runners) > 2:
                        runners[j]()  # untimed: with many runners, the last one's data fills the caches
                    times[j].append(timed(runners[j]))
            t_ours = times[0]
            t_peer = times[1] if run_peer else []
            med = statistics.median(t_ours)
            r = BenchmarkResult(
                model=name, backend=backend, batch_size=batch_size, img_size=size[-1], threads=threads,
                dtype=dtype, params=params, macs=macs, median_ms=med, p90_ms=quantile(t_ours, 0.9),
                throughput=batch_size / med * 1e3,
            )
            if t_peer:
                pm = statistics.median(t_peer)
                r.peer, r.peer_median_ms, r.peer_p90_ms = "timm", pm, quantile(t_peer, 0.9)
                r.ratio, r.max_rel_diff = med / pm, diff
            for (kind, (fn, setup)), t in zip(extra.items(), times[2:]):
                m = statistics.median(t)
                r.others[kind] = {"median_ms": m, "p90_ms": quantile(t, 0.9), "ratio": med / m, "setup_s": setup,
                                  "max_rel_diff": rel_err(fn().float().cpu(), reference)}
                if getattr(fn, "onnx_path", None):
                    r.others[kind]["file_bytes"] = Path(fn.onnx_path).stat().st_size
                if hasattr(fn, "int8_agreement"):
                    r.others[kind]["int8_agreement"] = fn.int8_agreement
            results.append(r)
            if progress:
                progress(r)
    return results
