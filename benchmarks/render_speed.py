"""Rasterize + interpolate speed on an SMPL-sized closed mesh (13,824-triangle capsule).

    .venv/bin/python benchmarks/render_speed.py [--res 512] [--threads 2] [--reps 30] [--device cpu|cuda]

Times the torch backend's ``rasterize`` and ``interpolate`` (vertex normals, 3 channels) at
``res x res``, batch 1, and their backward pass. On a CUDA device with nvdiffrast installed,
nvdiffrast runs the same calls in the same process, interleaved, and the ratio
torch / nvdiffrast is printed. On CPU there is no peer to run (nvdiffrast is CUDA-only and
PyTorch3D has no wheel here). Writes docs/results/render_speed_<device>.md. Not a test:
nothing asserts on time.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import zoo.render as R
from zoo.tables import format_table, results_file

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def scene(device):
    verts, tri = R.capsule()
    normals = verts / verts.norm(dim=1, keepdim=True)  # stand-in attribute, 3 channels
    view = R.look_at((0.4, 0.3, 2.4), (0.0, 0.0, 0.0))
    pos = R.world_to_clip(verts, view, R.perspective(45, 1.0, 0.3, 10))
    return pos.to(device), tri.to(device), normals.to(device)


def timer(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def run_once(backend, pos, tri, attr, res, device, backward):
    """Milliseconds of (rasterize, interpolate, backward or None)."""
    p = pos.detach().requires_grad_(backward)
    t0 = timer(device)
    rast, _ = R.rasterize(p, tri, (res, res), grad_db=False, backend=backend)
    t1 = timer(device)
    out, _ = R.interpolate(attr, rast, tri, backend=backend)
    t2 = timer(device)
    tb = None
    if backward:
        out.sum().backward()
        tb = (timer(device) - t2) * 1e3
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, tb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None,
                   help="results file (default docs/results/render_speed_<device>.md); '' for none")
    args = p.parse_args()
    out = args.out if args.out is not None else str(RESULTS / f"render_speed_{torch.device(args.device).type}.md")
    with results_file(out or None, f"Rasterize + interpolate speed on {args.device}"):
        run(args)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pos, tri, attr = scene(device)
    backends = ["torch"] + (["nvdiffrast"] if device.type == "cuda" and R.nvdiffrast_available() else [])
    times = {b: [] for b in backends}
    for i in range(args.warmup + args.reps):
        for b in backends:  # interleaved, so drift hits both alike
            t = run_once(b, pos, tri, attr, args.res, device, backward=True)
            if i >= args.warmup:
                times[b].append(t)
    rast, _ = R.rasterize(pos, tri, (args.res, args.res), backend="torch")
    covered = (rast[..., 3] > 0).float().mean().item()

    rows = []
    for label, ks in [("rasterize", [0]), ("interpolate", [1]), ("rasterize + interpolate", [0, 1]),
                      ("backward (both)", [2])]:
        vals = {b: statistics.median(sum(t[k] for k in ks) for t in times[b]) for b in backends}
        row = [label, f"{vals['torch']:.1f}"]
        if "nvdiffrast" in vals:
            row += [f"{vals['nvdiffrast']:.2f}", f"{vals['torch'] / vals['nvdiffrast']:.1f}"]
        rows.append(row)
    print(f"{tri.shape[0]} triangles at {args.res}x{args.res} on {device.type}, {args.threads} threads, "
          f"{covered:.0%} of pixels covered; median of {args.reps} after {args.warmup} warm-up rounds.\n")
    headers = ("stage", "zoo torch ms") + (("nvdiffrast ms", "torch / nvdiffrast") if len(backends) > 1 else ())
    print(format_table(rows, headers, "markdown"))


if __name__ == "__main__":
    main()
