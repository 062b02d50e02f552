"""The nvdiffrast backend against the torch reference. Needs CUDA and nvdiffrast; skips otherwise."""
from __future__ import annotations

import pytest
import torch

import zoo.render as R

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
nvdiffrast = pytest.mark.skipif(not R.nvdiffrast_available(),
                                reason="needs nvdiffrast (pip install -e '.[nvdiffrast]') and CUDA")


def random_scene(seed, num_tri=300, batch=2):
    """A random triangle soup in clip space, all in front of the camera, some crossing far/near."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, num_tri, 1, 3, generator=g) * 2 - 1
    verts = (centres + torch.randn(batch, num_tri, 3, 3, generator=g) * 0.15).reshape(batch, -1, 3)
    w = torch.rand(batch, verts.shape[1], 1, generator=g) + 1.0
    pos = torch.cat([verts[..., :2] * w, verts[..., 2:] * w * 1.05, w], -1)
    tri = torch.arange(num_tri * 3, dtype=torch.int32).view(num_tri, 3)
    return pos, tri


def closed_scene(batch=2):
    verts, tri = R.capsule()
    eyes = torch.tensor([[0.3, 0.4, 2.6], [-1.5, -0.5, 2.0]])[:batch]
    views = R.look_at(eyes, torch.zeros(batch, 3))
    return R.world_to_clip(verts, views, R.perspective(45, 1.0, 0.3, 10)), tri


def compare_rast(ours, ref):
    ids_o, ids_r = ours[..., 3], ref[..., 3]
    covered = (ids_o > 0) | (ids_r > 0)
    same = (ids_o == ids_r) & covered
    agree = same.sum().item() / max(covered.sum().item(), 1)
    assert agree >= 0.999, f"triangle ids agree on {agree:.5f} of covered pixels"
    torch.testing.assert_close(ours[same][:, :3], ref[same][:, :3], atol=1e-4, rtol=0)
    return same


@cuda
@nvdiffrast
@pytest.mark.parametrize("scene", ["soup", "closed"])
def test_rasterize_and_interpolate_agree(scene):
    pos, tri = random_scene(0) if scene == "soup" else closed_scene()
    pos, tri = pos.cuda(), tri.cuda()
    res = (256, 320)
    ours, ours_db = R.rasterize(pos, tri, res, backend="torch")
    ref, ref_db = R.rasterize(pos, tri, res, backend="nvdiffrast")
    same = compare_rast(ours, ref)
    torch.testing.assert_close(ours_db[same], ref_db[same], atol=1e-4, rtol=1e-3)
    attr = torch.randn(pos.shape[1], 4, device="cuda")
    a, a_da = R.interpolate(attr, ours, tri, rast_db=ours_db, diff_attrs="all", backend="torch")
    b, b_da = R.interpolate(attr, ours, tri, rast_db=ours_db, diff_attrs="all", backend="nvdiffrast")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    torch.testing.assert_close(a_da, b_da, atol=1e-4, rtol=1e-4)


@cuda
@nvdiffrast
def test_range_mode_agrees():
    pos, tri = random_scene(1, batch=1)
    pos, tri = pos[0].cuda(), tri.cuda()
    ranges = torch.tensor([[0, 100], [100, 200], [50, 0]], dtype=torch.int32)
    ours, _ = R.rasterize(pos, tri, (128, 128), ranges=ranges, backend="torch")
    ref, _ = R.rasterize(pos, tri, (128, 128), ranges=ranges, backend="nvdiffrast")
    compare_rast(ours, ref)


@cuda
@nvdiffrast
@pytest.mark.parametrize("filter_mode", ["nearest", "linear", "linear-mipmap-linear"])
@pytest.mark.parametrize("boundary_mode", ["wrap", "clamp", "zero"])
def test_texture_agrees(filter_mode, boundary_mode):
    g = torch.Generator().manual_seed(2)
    tex = torch.rand(2, 64, 32, 3, generator=g).cuda()
    uv = (torch.rand(2, 48, 48, 2, generator=g) * 1.6 - 0.3).cuda()
    da = (torch.randn(2, 48, 48, 4, generator=g) * 0.05).cuda()
    kw = dict(filter_mode=filter_mode, boundary_mode=boundary_mode)
    if "mipmap" in filter_mode:
        kw["uv_da"] = da
    a = R.texture(tex, uv, backend="torch", **kw)
    b = R.texture(tex, uv, backend="nvdiffrast", **kw)
    # nearest can round differently exactly on texel borders: allow a handful
    close = ((a - b).abs() <= 1e-4).all(-1)
    assert close.float().mean() >= 0.999


@cuda
@nvdiffrast
def test_antialias_agrees_on_the_same_rast():
    pos, tri = closed_scene()
    pos, tri = pos.cuda(), tri.cuda()
    rast, _ = R.rasterize(pos, tri, (256, 256), backend="nvdiffrast")
    color = torch.rand(*rast.shape[:3], 3, device="cuda")
    a = R.antialias(color, rast, pos, tri, backend="torch")
    b = R.antialias(color, rast, pos, tri, backend="nvdiffrast")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@cuda
@nvdiffrast
def test_depth_peeling_agrees():
    pos, tri = closed_scene(1)
    pos, tri = pos.cuda(), tri.cuda()
    ours = [r for r, _ in R.depth_peel(pos, tri, (128, 128), 3, backend="torch")]
    ref = [r for r, _ in R.depth_peel(pos, tri, (128, 128), 3, backend="nvdiffrast")]
    for o, r in zip(ours, ref):
        compare_rast(o, r)


@cuda
def test_torch_backend_runs_on_cuda_like_on_cpu():
    pos, tri = closed_scene()
    cpu, _ = R.rasterize(pos, tri, (96, 96), backend="torch")
    gpu, _ = R.rasterize(pos.cuda(), tri.cuda(), (96, 96), backend="torch")
    same = compare_rast(gpu.cpu(), cpu)
    assert same.sum() > 1000
