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


# Two float32 implementations of the same barycentrics differ by a few roundings of each
# term, amplified by the pixel's conditioning: near silhouettes and on small triangles the
# edge functions cancel (|sum e| << sum of the terms' rounding errors). Against float64 the
# torch backend stays within 0.4 eps * kappa; 4 eps leaves room for a second float32 side.
ROUNDING = 4 * torch.finfo(torch.float32).eps


def condition(pos, tri, rast, pixels):
    """First-order rounding sensitivity of ``rast`` at ``pixels`` (bool ``[B,H,W]``), from float64.

    Returns ``(kappa_uv [N,2], kappa_db [N,4])``: a relative rounding ``eps`` of every term
    moves ``u, v`` by up to about ``eps * kappa_uv`` and ``rast_db`` by ``eps * kappa_db``.
    """
    b, yy, xx = (t.cpu() for t in pixels.nonzero().unbind(1))
    t = rast[pixels][:, 3].long().cpu() - 1
    p, tl = pos.double().cpu(), tri.long().cpu()
    v = p[b[:, None], tl[t]] if p.dim() == 3 else p[tl[t]]  # [N,3,4]
    h, w = rast.shape[1:3]
    px = ((2 * xx + 1).double() / w - 1)[:, None]
    py = ((2 * yy + 1).double() / h - 1)[:, None]
    x, y, vw = v[..., 0], v[..., 1], v[..., 3]
    xs, ys = x - px * vw, y - py * vw  # pixel-relative, as both backends compute
    # e_i = xs_j ys_k - ys_j xs_k: each pixel-relative coordinate carries one rounding of its
    # pre-cancellation magnitude, times its small partner, plus the two products' roundings.
    ax, ay = x.abs() + (px * vw).abs(), y.abs() + (py * vw).abs()
    j, k = [1, 2, 0], [2, 0, 1]
    e = xs[:, j] * ys[:, k] - ys[:, j] * xs[:, k]
    terms = (ax[:, j] * ys[:, k].abs() + xs[:, j].abs() * ay[:, k] + ay[:, j] * xs[:, k].abs()
             + ys[:, j].abs() * ax[:, k] + (xs[:, j] * ys[:, k]).abs() + (ys[:, j] * xs[:, k]).abs())
    s = e.sum(1, keepdim=True)
    bary = e / s
    k_sum = terms.sum(1, keepdim=True) / s.abs()  # relative sensitivity of sum e
    kappa_uv = (terms / s.abs() + bary.abs() * k_sum)[:, :2]
    # rast_db_i = (A_i - b_i sum A) (2/W) / S, and the same with B_i and 2/H.
    cols = []
    for coef, scale in (((y[:, j] * vw[:, k], vw[:, j] * y[:, k]), 2.0 / w),
                        ((vw[:, j] * x[:, k], x[:, j] * vw[:, k]), 2.0 / h)):
        a = coef[0] - coef[1]
        a_terms = coef[0].abs() + coef[1].abs()
        sa = a.sum(1, keepdim=True)
        num = a - bary * sa
        err = (kappa_uv * sa.abs()[:, :1].expand(-1, 2) + num[:, :2].abs() * k_sum
               + a_terms[:, :2] + bary[:, :2].abs() * a_terms.sum(1, keepdim=True))
        cols.append(err * scale / s.abs())
    kappa_db = torch.stack([cols[0][:, 0], cols[1][:, 0], cols[0][:, 1], cols[1][:, 1]], 1)
    return kappa_uv, kappa_db


def compare_rast(ours, ref, pos, tri, ours_db=None, ref_db=None):
    """Triangle ids agree on 99.9% of covered pixels. Where they agree: ``u, v`` within 1e-4
    on 99.9% of pixels and within 1e-4 plus their rounding sensitivity on all, ``z/w`` within
    1e-4, and ``rast_db`` likewise with 1e-3 relative added."""
    ids_o, ids_r = ours[..., 3], ref[..., 3]
    covered = (ids_o > 0) | (ids_r > 0)
    same = (ids_o == ids_r) & covered
    agree = same.sum().item() / max(covered.sum().item(), 1)
    assert agree >= 0.999, f"triangle ids agree on {agree:.5f} of covered pixels"
    k_uv, k_db = (k.to(ours.device) for k in condition(pos, tri, ref, same))
    diff = (ours[same][:, :2] - ref[same][:, :2]).abs()
    assert (diff <= 1e-4).all(1).float().mean() >= 0.999, f"u, v: {(diff > 1e-4).any(1).sum()} off"
    worst = (diff / (1e-4 + ROUNDING * k_uv)).max()
    assert worst <= 1, f"u, v differ by up to {diff.max():.2e}; worst at {worst:.2f}x tolerance"
    torch.testing.assert_close(ours[same][:, 2], ref[same][:, 2], atol=1e-4, rtol=0)
    if ours_db is not None:
        o, r = ours_db[same], ref_db[same]
        diff = (o - r).abs()
        assert (diff <= 1e-4 + 1e-3 * r.abs()).all(1).float().mean() >= 0.999
        worst = (diff / (1e-4 + 1e-3 * r.abs() + ROUNDING * k_db)).max()
        assert worst <= 1, f"rast_db: worst difference at {worst:.2f}x its tolerance"
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
    compare_rast(ours, ref, pos, tri, ours_db, ref_db)
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
    compare_rast(ours, ref, pos, tri)


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
    ours = torch.cat([r for r, _ in R.depth_peel(pos, tri, (128, 128), 3, backend="torch")])
    ref = torch.cat([r for r, _ in R.depth_peel(pos, tri, (128, 128), 3, backend="nvdiffrast")])
    # All layers at once: a convex mesh's third layer holds a stray pixel or none, too few
    # for a per-layer percentage.
    compare_rast(ours, ref, pos.expand(3, -1, -1), tri)
    assert (ref[1:2, ..., 3] > 0).sum() > 0.99 * (ref[0:1, ..., 3] > 0).sum()  # front and back


@cuda
def test_torch_backend_runs_on_cuda_like_on_cpu():
    pos, tri = closed_scene()
    cpu, _ = R.rasterize(pos, tri, (96, 96), backend="torch")
    gpu, _ = R.rasterize(pos.cuda(), tri.cuda(), (96, 96), backend="torch")
    same = compare_rast(gpu.cpu(), cpu, pos, tri)
    assert same.sum() > 1000


def test_a_built_plugin_missing_from_sys_path_is_found(tmp_path, monkeypatch):
    """nvdiffrast imports its JIT-built plugin by name; recent torch leaves the build folder off
    sys.path, and the backend puts it there (runs on CPU with a stand-in module)."""
    import sys

    from zoo.render import nvdiffrast_backend as nb

    name = "nvdiffrast_plugin_0_0_0_torch_test"
    build = tmp_path / "py3_cu0" / name
    build.mkdir(parents=True)
    (build / f"{name}.py").write_text("ANSWER = 42\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    missing = ModuleNotFoundError(f"No module named '{name}'", name=name)
    assert nb._put_built_plugin_on_path(missing)
    assert __import__(name).ANSWER == 42
    del sys.modules[name]
    assert not nb._put_built_plugin_on_path(missing)  # already there: nothing more to add
    assert not nb._put_built_plugin_on_path(ModuleNotFoundError("x", name="numpyy"))
    assert not nb._put_built_plugin_on_path(RuntimeError("nvcc failed"))


@pytest.mark.parametrize("scene", ["soup", "closed"])
def test_float32_rasterization_is_within_rounding_of_float64(scene):
    """On CPU: the torch backend's float32 output against its own float64 one (near exact),
    under the same bounds the GPU comparison uses."""
    pos, tri = random_scene(0) if scene == "soup" else closed_scene()
    a, a_db = R.rasterize(pos, tri, (256, 320), backend="torch")
    b, b_db = R.rasterize(pos.double(), tri, (256, 320), backend="torch")
    same = compare_rast(a, b.float(), pos, tri, a_db, b_db.float())
    assert same.sum() > 20000
