"""Sparse convolution speed: zoo's pure-PyTorch VoxelBackBone8x against spconv's, and whole-detector
frames per second, on the real KITTI frame (CPU threads fixed).

    .venv/bin/python benchmarks/sparse_conv.py [--threads 2] [--repeats 10]

Voxelizes ../shared/data/kitti/training/velodyne/000008.bin with KITTI's settings (range
[0, -40, -3, 70.4, 40, 1], voxels 0.05 x 0.05 x 0.1, 5 points per voxel) and times OpenPCDet's
VoxelBackBone8x forward, and forward + backward, interleaved with spconv's where spconv is
installed (the same architecture and weights, spconv's SubMConv3d / SparseConv3d; spconv's CPU
build has no backward). spconv's outputs are compared with zoo's on the same input and the
difference is printed beside its time. Then the end-to-end frames per second of
pathfusion_lidar_tiny and pathfusion_lidar_kitti (eval, voxelization to NMS). Writes
docs/results/sparse_conv_cpu.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FRAME = ROOT.parent / "shared" / "data" / "kitti" / "training" / "velodyne" / "000008.bin"


def to_spconv(module, spconv):
    """A copy of zoo's backbone with spconv's sparse layers (same weights)."""
    import torch.nn as nn

    from zoo.models.pathfusion import SparseConv3d, SparseSequential, SubMConv3d

    if isinstance(module, SubMConv3d):
        m = spconv.SubMConv3d(module.in_channels, module.out_channels, module.kernel_size, bias=module.bias is not None,
                              indice_key=module.indice_key)
    elif isinstance(module, SparseConv3d):
        m = spconv.SparseConv3d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                                padding=module.padding, bias=module.bias is not None, indice_key=module.indice_key)
    elif isinstance(module, SparseSequential):
        return spconv.SparseSequential(*[to_spconv(c, spconv) for c in module])
    else:
        return module
    with torch.no_grad():
        m.weight.copy_(module.weight)
        if module.bias is not None:
            m.bias.copy_(module.bias)
    return m if isinstance(m, nn.Module) else module


def median_ms(fn, repeats: int) -> float:
    fn()  # warm: rule books, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    if not FRAME.is_file():
        print(f"{FRAME} is absent: this benchmark needs the real KITTI frame", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    from zoo.data.kitti import read_points
    from zoo.models.pathfusion import MeanVFE, SparseTensor, build_lidar_detector, voxelize
    from zoo.tables import results_file

    torch.manual_seed(0)
    pts = torch.from_numpy(read_points(FRAME))
    voxels, coords, num = voxelize(pts, [0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1], 5, 40000)
    feats = MeanVFE(4)(voxels, num)
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
    det = build_lidar_detector("pathfusion_lidar_kitti")
    backbone = det.backbone_3d.eval()
    shape = backbone.sparse_shape

    def zoo_fwd():
        with torch.no_grad():
            return backbone({"voxel_features": feats, "voxel_coords": idx, "batch_size": 1})["encoded_spconv_tensor"]

    train_bb = build_lidar_detector("pathfusion_lidar_kitti").backbone_3d.train()

    def zoo_fwd_bwd():
        f = feats.clone().requires_grad_(True)
        out = train_bb({"voxel_features": f, "voxel_coords": idx, "batch_size": 1})["encoded_spconv_tensor"]
        out.features.sum().backward()

    rows = [("zoo (pure PyTorch)", median_ms(zoo_fwd, args.repeats), median_ms(zoo_fwd_bwd, args.repeats), "reference")]
    try:
        import spconv.pytorch as spconv
    except ImportError:
        spconv = None
    if spconv is not None:
        layers = [to_spconv(getattr(backbone, n), spconv) for n in ("conv_input", "conv1", "conv2", "conv3", "conv4", "conv_out")]
        net = spconv.SparseSequential(*layers).eval()

        def sp_fwd():
            with torch.no_grad():
                return net(spconv.SparseConvTensor(feats, idx, list(shape), 1))

        ours = zoo_fwd()
        theirs = sp_fwd()
        a = SparseTensor(ours.features, ours.indices, ours.spatial_shape, 1).dense()
        b = SparseTensor(theirs.features, theirs.indices, theirs.spatial_shape, 1).dense()
        agree = f"{len(theirs.indices)} vs {len(ours.indices)} output sites, largest difference {(a - b).abs().max():.3g}"
        t_fwd = median_ms(sp_fwd, args.repeats)
        rows.append((f"spconv {getattr(sys.modules.get('spconv'), '__version__', '')} (CPU build)", t_fwd, None, agree))
    fps = []
    for name in ("pathfusion_lidar_tiny", "pathfusion_lidar_kitti"):
        model = build_lidar_detector(name).eval()
        batch = {"points": torch.cat([torch.zeros(len(pts), 1), pts], 1), "batch_size": 1}

        def run():
            with torch.no_grad():
                model(batch)

        fps.append((name, 1000 / median_ms(run, max(3, args.repeats // 2))))

    with results_file(ROOT / "docs" / "results" / "sparse_conv_cpu.md", "Sparse convolution on the CPU: VoxelBackBone8x and whole detectors"):
        print(f"KITTI frame 000008 (the mmdetection3d demo's FOV copy, {len(pts)} points), KITTI voxel settings: "
              f"{len(coords)} voxels; {args.threads} threads; median of {args.repeats} calls after one warm-up.\n")
        print("| backbone | forward ms | forward + backward ms | forward time / spconv's | outputs |")
        print("|---|---|---|---|---|")
        base = rows[1][1] if len(rows) > 1 else None
        for name, f, fb, note in rows:
            fb_s = f"{fb:.1f}" if fb is not None else "n/a (no CPU backward)"
            ratio = f"{f / base:.2f}" if base else "n/a (spconv not installed)"
            print(f"| {name} | {f:.1f} | {fb_s} | {ratio} | {note} |")
        print("\n| detector (eval: voxelize to NMS) | frames per second |")
        print("|---|---|")
        for name, v in fps:
            print(f"| {name} | {v:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
