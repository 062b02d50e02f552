"""Speed of rendering one sample's shells: the 5-shell mannequin, 256- and 512-pixel images.

    .venv/bin/python benchmarks/lsv_render.py [--threads 2] [--reps 10] [--device cpu|cuda]

Times `zoo.models.lsv.render_shells` (pose already applied: skinning is not included; every
fragment composited, the RGBA lookups, antialiasing) forward, and forward plus backward to the
textures and the shell vertices, at batch 1 and 8 (one camera per sample), with 256-pixel RGBA
textures. The peer on every row is classic depth peeling: 20 dense layers, each a full
rasterization behind the last (how this renderer first worked), interleaved in the same
process. On a CUDA device with nvdiffrast, nvdiffrast's own peeler (20 layers) runs too. Writes docs/results/lsv_render_<device>.md. Not
a test: nothing asserts on time.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

import zoo.render as R
import zoo.models.lsv.render as lsv_render
from zoo.models.lsv import ShellConfig, Shells, render_shells, template_from_mannequin
from zoo.models.lsv.render import layer_triangles, orbit_cameras
from zoo.render.layers import DepthPeeler
from zoo.render.torch_raster import TorchPeelState, rasterize_torch
from zoo.tables import format_table, results_file

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


PEEL_LAYERS = 20


class _PeelEachLayer(DepthPeeler):
    """The torch peeler as classic depth peeling: dense layers, each rasterizing every triangle
    again behind the last (not "torch", so the renderer takes its layer-by-layer path)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.backend = "peel-each-layer"

    def rasterize_layers(self, num_layers):
        state, out = None, []
        for _ in range(num_layers):
            rast, db, keys = rasterize_torch(self.pos, self.tri, self.resolution, self.ranges, self.grad_db, state)
            state = TorchPeelState(keys)
            out.append((rast, db))
        return torch.stack([r for r, _ in out]), torch.stack([d for _, d in out])


@contextlib.contextmanager
def one_rasterization_per_layer():
    original = lsv_render.DepthPeeler
    lsv_render.DepthPeeler = _PeelEachLayer
    try:
        yield
    finally:
        lsv_render.DepthPeeler = original


def timer(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results file (default docs/results/lsv_render_<device>.md); '' for none")
    args = p.parse_args()
    out = args.out if args.out is not None else str(RESULTS / f"lsv_render_{torch.device(args.device).type}.md")
    with results_file(out or None, f"Layered-surface rendering speed on {args.device}"):
        run(args)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t = template_from_mannequin()
    shells_mod = Shells(t.body, ShellConfig(), t.tips)
    rest = shells_mod(torch.zeros(1, 24, 3))["shells"].to(device)
    faces, uv, uv_faces = t.body.faces.to(device), t.uv.to(device), t.uv_faces.to(device)
    n, v = rest.shape[1], rest.shape[2]
    topo = R.antialias_construct_topology_hash(layer_triangles(faces, n, v))
    g = torch.Generator().manual_seed(0)
    variants = {"zoo (all fragments, one pass)": ("torch", contextlib.nullcontext, None),
                "one rasterization per layer": ("torch", one_rasterization_per_layer, PEEL_LAYERS)}
    if device.type == "cuda" and R.nvdiffrast_available():
        variants["nvdiffrast"] = ("nvdiffrast", contextlib.nullcontext, PEEL_LAYERS)
    rows = []
    for res in (256, 512):
        for batch in (1, 8):
            shells = rest.expand(batch, -1, -1, -1).contiguous()
            tex = torch.rand(batch, n, 4, 256, 256, generator=g).to(device)
            mvp = torch.stack([orbit_cameras(1, 3.0, 10.0, start=37.0 * i)[0] for i in range(batch)])[:, None]
            mvp = mvp.to(device)
            for backward in (False, True):
                times = {k: [] for k in variants}
                for i in range(args.warmup + args.reps):
                    for name, (backend, ctx, layers) in variants.items():  # interleaved: drift hits all alike
                        s = shells.detach().requires_grad_(backward)
                        x = tex.detach().requires_grad_(backward)
                        with ctx():
                            t0 = timer(device)
                            img = render_shells(s, faces, uv, uv_faces, x, mvp, (res, res), num_layers=layers,
                                                backend=backend, topology_hash=topo if backend == "torch" else None)
                            if backward:
                                img.square().sum().backward()
                            ms = (timer(device) - t0) * 1e3
                        if i >= args.warmup:
                            times[name].append(ms)
                med = {k: statistics.median(x) for k, x in times.items()}
                zoo_ms = med["zoo (all fragments, one pass)"]
                row = [f"{res}x{res}", str(batch), "forward + backward" if backward else "forward",
                       f"{zoo_ms:.1f}", f"{1e3 * batch / zoo_ms:.1f}", f"{med['one rasterization per layer']:.1f}",
                       f"{med['one rasterization per layer'] / zoo_ms:.2f}"]
                if "nvdiffrast" in med:
                    row += [f"{med['nvdiffrast']:.2f}", f"{zoo_ms / med['nvdiffrast']:.1f}"]
                rows.append(row)
                print(" | ".join(row), file=sys.stderr, flush=True)  # progress; the table goes to the file
    print(f"\n{n} shells x {len(faces)} triangles ({n * len(faces)} in all), every fragment (the peers: {PEEL_LAYERS} layers), 256-pixel RGBA "
          f"textures, one camera per sample, on {device.type} with {args.threads} threads; median of {args.reps} "
          f"after {args.warmup} warm-up rounds. Frames per second count images (batch / time).\n")
    headers = ["image", "batch", "pass", "zoo ms", "zoo images/s", f"peeling {PEEL_LAYERS} layers ms",
               "peeling / zoo"]
    if "nvdiffrast" in variants:
        headers += ["nvdiffrast ms", "zoo torch / nvdiffrast"]
    print(format_table(rows, headers, "markdown"))


if __name__ == "__main__":
    main()
