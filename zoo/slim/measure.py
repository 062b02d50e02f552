"""Timing blocks and networks for latency tables, on one backend with fixed threads.

Backends:

- ``torch``: eager, ``torch.inference_mode``, ``torch.set_num_threads(threads)``;
- ``onnxruntime``: the module exported by torch's TorchScript-based ONNX exporter (opset 20, as
  ``zoo export`` writes by default,
  fixed shapes; it exports a block in a fraction of a second, where the dynamo exporter takes
  seconds, and a table has hundreds of blocks), run by the CPU execution provider with
  ``intra_op_num_threads = threads``, one inter-op thread and every graph optimisation;
- ``cuda``: eager on the GPU, timed with CUDA events.

A block and a whole network are measured the same way, so the table's sum and a network's
latency differ only by what the network does between blocks. Times are per call in
milliseconds; an entry keeps the median and the 90th percentile.
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from zoo.benchmark import call_timer, quantile
from zoo.errors import ConfigError, require
from zoo.slim.table import Entry

__all__ = ["BACKENDS", "make_runner", "network_runner", "measure_network", "measure_networks", "closest_measured", "time_calls", "interleaved", "measure_blocks", "measure_table",
           "call_overhead", "backend_provenance", "summarize"]

BACKENDS = ("torch", "onnxruntime", "cuda")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_backend(backend: str, threads: int) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}.")
    if threads < 1:
        raise ConfigError(f"threads must be at least 1 (got {threads}).")
    if backend == "cuda" and not torch.cuda.is_available():
        raise ConfigError("backend cuda needs a GPU; this machine has none (use torch or onnxruntime).")
    if backend == "onnxruntime":
        require("onnxruntime", "export", "the onnxruntime backend")


def make_runner(module: nn.Module, shape: tuple[int, ...], backend: str, threads: int, folder: Path,
                name: str = "block") -> Callable[[], None]:
    """A no-argument callable running `module` once on a fixed random input of `shape`."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    module = module.eval()
    if backend == "torch":
        def run() -> None:
            with torch.inference_mode():
                module(x)
        return run
    if backend == "cuda":
        module, xc = module.cuda(), x.cuda()

        def run() -> None:
            with torch.inference_mode():
                module(xc)
        return run
    ort = require("onnxruntime", "export", "the onnxruntime backend")
    path = Path(folder) / f"{name}.onnx"
    with torch.no_grad(), warnings_quiet():
        torch.onnx.export(module, (x,), str(path), input_names=["input"], output_names=["output"], opset_version=20,
                          dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no spinning pool threads: the additivity report interleaves several sessions, and a
    # spinning one steals the cores from the next (as in zoo.benchmark)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    return lambda: sess.run(None, feed) and None


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def network_runner(space, arch, backend: str, threads: int, folder: Path, name: str = "net",
                   seed: int = 0) -> Callable[[], None]:
    """A runner of `arch`'s whole network in its deploy form (random weights from `seed`) on
    one ``img_size`` image."""
    from zoo.testing import randomize_

    model = randomize_(space.build(arch).eval(), seed=seed, scale=0.1).reparameterize()
    return make_runner(model, (1, 3, space.img_size, space.img_size), backend, threads, folder, name)


def measure_networks(space, archs, backend: str, threads: int = 1, warmup: int = 5, reps: int = 30) -> list[float]:
    """Median latency (ms) of each of `archs`' whole networks (deploy form, random weights
    from seed i for the i-th) on `backend` with `threads` threads, timed in interleaved rounds
    (`interleaved`): the protocol of the additivity report, so a slimmed network's time and the
    calibration fitted on the report's networks are measured alike."""
    check_backend(backend, threads)
    archs = list(archs)
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="zoo-net-") as tmp:
        runners = {f"arch{i}": network_runner(space, arch, backend, threads, Path(tmp), f"arch{i}", seed=i)
                   for i, arch in enumerate(archs)}
        times = interleaved(runners, backend, warmup, reps)
    return [statistics.median(times[f"arch{i}"]) for i in range(len(archs))]


def measure_network(space, arch, backend: str, threads: int = 1, warmup: int = 5, reps: int = 30) -> float:
    """Median latency (ms) of `arch`'s whole network on `backend` (`measure_networks`)."""
    return measure_networks(space, [arch], backend, threads, warmup, reps)[0]


def closest_measured(space, candidates, table, ms: float, reps: int = 30, shortlist: int = 4,
                     backend: str | None = None):
    """Of `candidates`, the architecture whose measured latency is closest to `ms`: the
    `shortlist` the table predicts closest are measured together (`measure_networks`) on the
    table's backend (or `backend`). For baselines "of the same measured latency"."""
    backend = backend or table.provenance.get("backend", "torch")
    threads = int(table.provenance.get("threads") or 1)
    near = sorted(dict.fromkeys(candidates), key=lambda a: abs(table.predict(space.keys(a)) - ms))[:shortlist]
    times = measure_networks(space, near, backend, threads, reps=reps)
    return min(zip(near, times), key=lambda at: abs(at[1] - ms))[0]


def time_calls(run: Callable[[], None], backend: str, warmup: int, reps: int) -> list[float]:
    """`warmup` untimed calls, then `reps` timed ones (ms each)."""
    timed = call_timer(backend)
    for _ in range(warmup):
        run()
    return [timed(run) for _ in range(reps)]


def interleaved(runners: dict[str, Callable[[], None]], backend: str, warmup: int, reps: int) -> dict[str, list[float]]:
    """Time several runners in rounds, each round running every one once in an order that
    rotates, so a slow spell of the machine hits all alike. Each timed call follows an
    untimed one of the same runner (its data warm in the caches, as in a deployment)."""
    timed = call_timer(backend)
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            runners[name]()
            out[name].append(timed(runners[name]))
    return out


def summarize(times: list[float]) -> Entry:
    return Entry(round(statistics.median(times), 6), round(quantile(times, 0.9), 6), len(times))


def measure_blocks(space, keys: Iterable[str], backend: str = "torch", threads: int = 1, warmup: int = 5,
                   reps: int = 30, progress: bool = True, chain: int = 4, overhead_ms: float | None = None
                   ) -> dict[str, Entry]:
    """Each block of `keys` in its deploy form (`space.block`), median of `reps` calls.

    A block whose output has its input's shape (``space.chainable``) is timed as a chain of
    `chain` instances with different weights, its entry ``(T_chain - overhead) / chain +
    overhead``: alone and called again and again, a block finds its weights hot in the cache,
    which in a network they are not (each block's weights are evicted by the others'), and
    the sum of isolated blocks comes out 10-30% under the network's time. The entry keeps one
    call's overhead, as an isolated block's time does (`LatencyTable.predict`)."""
    check_backend(backend, threads)
    if chain < 1:
        raise ConfigError(f"chain must be at least 1 (got {chain}).")
    keys = list(dict.fromkeys(keys))
    out: dict[str, Entry] = {}
    over = call_overhead(backend, threads, warmup, reps) if overhead_ms is None else overhead_ms
    bar = _progress(len(keys), f"latency table ({backend}, {threads} thread{'s' * (threads > 1)})", progress)
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="zoo-lut-") as tmp:
        for i, key in enumerate(keys):
            module, shape = space.block(key)
            n = chain if space.parse_key(key)[0] in space.chainable else 1
            if n > 1:
                module = nn.Sequential(module, *(space.block(key, seed=s)[0] for s in range(1, n)))
            run = make_runner(module, shape, backend, threads, Path(tmp), f"b{i}")
            times = [(t - over) / n + over for t in time_calls(run, backend, warmup, reps)]
            out[key] = summarize(times)
            bar.update(1)
    bar.close()
    return out


def call_overhead(backend: str, threads: int = 1, warmup: int = 5, reps: int = 30) -> float:
    """The median time of an (almost) empty call on `backend`: the part of every block's time
    that a network pays once, not once per block."""
    check_backend(backend, threads)
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="zoo-lut-") as tmp:
        run = make_runner(_Copy(), (1, 8), backend, threads, Path(tmp), "overhead")
        return summarize(time_calls(run, backend, warmup, max(reps, 30))).median_ms


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", disable=not enabled, dynamic_ncols=True)


def backend_provenance(backend: str, threads: int) -> dict:
    """What a table measured here records about where it was measured."""
    device = _cpu_name()
    runtime = f"torch {torch.__version__}"
    if backend == "cuda":
        device = torch.cuda.get_device_name()
        runtime += f", CUDA {torch.version.cuda}"
    elif backend == "onnxruntime":
        import onnxruntime

        runtime = f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider), exported by torch {torch.__version__}"
    return {"device": device, "os": platform.platform(terse=True), "runtime": runtime, "backend": backend,
            "threads": threads}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure_table(space, backend: str = "torch", threads: int = 1, warmup: int = 5, reps: int = 30,
                  progress: bool = True, chain: int = 4):
    """A `LatencyTable` covering every block `space` can use, measured here (`measure_blocks`)."""
    import datetime

    from zoo.slim.table import LatencyTable

    overhead = call_overhead(backend, threads, warmup, reps)
    entries = measure_blocks(space, space.all_keys(), backend, threads, warmup, reps, progress, chain, overhead)
    prov = backend_provenance(backend, threads)
    prov.update(source="measured", date=datetime.date.today().isoformat(), img_size=space.img_size, batch_size=1,
                reps=reps, chain=chain, space=space.describe())
    return LatencyTable(space.family, entries, prov, overhead_ms=overhead)


class _Copy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0  # one trivial op: exports as one node, runs as one call
