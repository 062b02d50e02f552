"""zoo.render.rasterize / interpolate on the torch backend, against hand computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo.render as R
from zoo.errors import RenderError, ZooError

TRI1 = torch.tensor([[0, 1, 2]], dtype=torch.int32)


def pixel_centres(height, width):
    """NDC coordinates of every pixel centre, ``[H,W]`` each, rows bottom-up."""
    ys = (2 * np.arange(height) + 1) / height - 1
    xs = (2 * np.arange(width) + 1) / width - 1
    return np.meshgrid(xs, ys)


def screen_barycentrics(p2d, px, py):
    """2D barycentric weights of pixel centres in a screen triangle ``p2d [3,2]`` (float64)."""
    (x0, y0), (x1, y1), (x2, y2) = p2d
    den = (y1 - y2) * (x0 - x2) + (x2 - x1) * (y0 - y2)
    l0 = ((y1 - y2) * (px - x2) + (x2 - x1) * (py - y2)) / den
    l1 = ((y2 - y0) * (px - x2) + (x0 - x2) * (py - y2)) / den
    return np.stack([l0, l1, 1 - l0 - l1])


def snap_ndc(p2d, height, width):
    """NDC vertices ``[3,2]`` rounded to nvdiffrast's 1/16-pixel grid (float64)."""
    scale = np.array([width * 8.0, height * 8.0])
    return np.round(p2d * scale) / scale


def test_single_triangle_coverage_and_barycentrics():
    h, w = 24, 32
    p2d = np.array([[-0.71, -0.62], [0.83, -0.41], [0.05, 0.77]])
    pos = torch.tensor([[list(p) + [0.25, 1.0] for p in p2d]], dtype=torch.float32)
    rast, _ = R.rasterize(pos, TRI1, (h, w), backend="torch")
    px, py = pixel_centres(h, w)
    lam = screen_barycentrics(p2d, px, py)
    # Coverage is decided on vertices snapped to 1/16 pixel, as nvdiffrast does; pixel
    # (24, 12) is 0.002 px inside the exact edge 1-2 and outside the snapped one.
    snapped = snap_ndc(p2d, h, w)
    lam_snapped = screen_barycentrics(snapped, px, py)
    assert np.abs(lam_snapped).min() > 1e-9  # no sample exactly on an edge: no tie rule needed
    inside = (lam_snapped > 0).all(0)
    assert inside.sum() > 100 and (lam[:, 12, 24] > 0).all() and not inside[12, 24]
    np.testing.assert_array_equal(rast[0, ..., 3].numpy() == 1, inside)
    np.testing.assert_allclose(rast[0, ..., 0].numpy()[inside], lam[0][inside], atol=2e-6)
    np.testing.assert_allclose(rast[0, ..., 1].numpy()[inside], lam[1][inside], atol=2e-6)
    np.testing.assert_allclose(rast[0, ..., 2].numpy()[inside], 0.25, atol=1e-6)
    # empty pixels are all zeros, and interpolate gives zero there
    assert (rast[0][~torch.from_numpy(inside)] == 0).all()
    out, _ = R.interpolate(torch.ones(3, 2), rast, TRI1, backend="torch")
    np.testing.assert_allclose(out[0, ..., 0].numpy(), inside.astype(np.float32), atol=1e-6)


def test_pixel_convention_rows_bottom_up_and_centres():
    # A small triangle around NDC (0.25, -0.75): the centre of column 2 of the bottom row.
    c = [0.25, -0.75]
    pos = torch.tensor([[[c[0] - 0.1, c[1] - 0.1, 0, 1], [c[0] + 0.1, c[1] - 0.1, 0, 1],
                         [c[0], c[1] + 0.1, 0, 1]]])
    rast, _ = R.rasterize(pos, TRI1, (4, 4), backend="torch")
    assert (rast[0, ..., 3] > 0).nonzero().tolist() == [[0, 2]]
    # moved off every pixel centre (between two centres), it covers nothing
    rast, _ = R.rasterize(pos + torch.tensor([0.25, 0.0, 0, 0]), TRI1, (4, 4), backend="torch")
    assert (rast[..., 3] == 0).all()


def test_overlapping_triangles_nearest_wins():
    h, w = 16, 16
    big = [[-0.9, -0.9], [0.9, -0.9], [0.0, 0.9]]
    pos = torch.tensor([[p + [0.5, 1.0] for p in big] + [p + [-0.2, 1.0] for p in big]
                        + [[-0.9, -0.9, -0.4, 1.0], [0.0, -0.9, -0.4, 1.0], [-0.9, 0.0, -0.4, 1.0]]])
    tri = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    rast, _ = R.rasterize(pos, tri, (h, w), backend="torch")
    ids = rast[0, ..., 3]
    # triangle 0 (z=0.5) is hidden everywhere by triangle 1 (z=-0.2); triangle 2 (z=-0.4) is in front
    assert (ids == 1).sum() == 0
    assert (ids == 3).sum() > 0 and (ids == 2).sum() > 0
    assert torch.allclose(rast[0, ..., 2][ids == 3], torch.tensor(-0.4))
    # order of the triangles in tri does not matter
    rast2, _ = R.rasterize(pos, tri.flip(0).contiguous(), (h, w), backend="torch")
    remap = torch.tensor([0.0, 3, 2, 1])
    assert torch.equal(remap[rast2[0, ..., 3].long()], ids)


def test_perspective_correct_interpolation_matches_hand_computation():
    h, w = 20, 20
    clip = np.array([[-1.6, -1.2, 0.5, 2.0], [0.6, -0.5, 0.2, 1.0], [0.2, 2.1, 1.0, 3.0]])
    attr = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]])
    pos = torch.tensor(clip[None], dtype=torch.float32)
    rast, _ = R.rasterize(pos, TRI1, (h, w), backend="torch")
    out, _ = R.interpolate(attr, rast, TRI1, backend="torch")
    px, py = pixel_centres(h, w)
    lam = screen_barycentrics(clip[:, :2] / clip[:, 3:], px, py)  # screen-space weights
    pc = lam / clip[:, 3, None, None]  # perspective correction: divide by w, renormalize
    pc = pc / pc.sum(0)
    inside = (lam >= 0).all(0)
    expect = np.einsum("kij,ka->ija", pc, attr.numpy())
    np.testing.assert_array_equal((rast[0, ..., 3] > 0).numpy(), inside)
    np.testing.assert_allclose(out[0].numpy()[inside], expect[inside], atol=1e-5)
    depth = np.einsum("kij,k->ij", pc, clip[:, 2]) / np.einsum("kij,k->ij", pc, clip[:, 3])
    np.testing.assert_allclose(rast[0, ..., 2].numpy()[inside], depth[inside], atol=1e-6)
    # and the screen-space (affine) answer differs: the test would catch a missing correction
    affine = np.einsum("kij,ka->ija", lam, attr.numpy())
    assert np.abs(affine[inside] - expect[inside]).max() > 0.1


def test_rast_db_is_the_pixel_derivative():
    h, w = 32, 32
    pos = torch.tensor([[[-0.9, -0.8, 0.1, 1.0], [0.9, -0.7, 0.1, 1.0], [0.1, 0.9, 0.1, 1.0]]])
    rast, db = R.rasterize(pos, TRI1, (h, w), backend="torch")
    # affine triangle: u, v are linear in pixels, so neighbour differences are exact
    y, x = 10, 15
    assert rast[0, y, x - 1:x + 2, 3].eq(1).all() and rast[0, y - 1:y + 2, x, 3].eq(1).all()
    du_dx = (rast[0, y, x + 1, 0] - rast[0, y, x - 1, 0]) / 2
    du_dy = (rast[0, y + 1, x, 0] - rast[0, y - 1, x, 0]) / 2
    dv_dx = (rast[0, y, x + 1, 1] - rast[0, y, x - 1, 1]) / 2
    dv_dy = (rast[0, y + 1, x, 1] - rast[0, y - 1, x, 1]) / 2
    torch.testing.assert_close(db[0, y, x], torch.stack([du_dx, du_dy, dv_dx, dv_dy]), atol=1e-6, rtol=1e-5)
    # perspective: central difference agrees to second order
    pos_p = pos.clone()
    pos_p[0, :, :] *= torch.tensor([[1.0], [2.5], [1.5]])
    rast, db = R.rasterize(pos_p, TRI1, (h, w), backend="torch")
    fd = (rast[0, y, x + 1, 0] - rast[0, y, x - 1, 0]) / 2
    assert abs(db[0, y, x, 0] - fd) < 2e-3 * abs(fd) + 1e-6
    # interpolate's out_da composes rast_db with the attribute differences
    attr = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 5.0]])
    out, da = R.interpolate(attr, rast, TRI1, rast_db=db, diff_attrs="all", backend="torch")
    a = attr
    expect_dx = db[0, y, x, 0] * (a[0] - a[2]) + db[0, y, x, 2] * (a[1] - a[2])
    torch.testing.assert_close(da[0, y, x, 0::2], expect_dx)
    _, da1 = R.interpolate(attr, rast, TRI1, rast_db=db, diff_attrs=[1], backend="torch")
    torch.testing.assert_close(da1[0, y, x], da[0, y, x, 2:4])


def grid_mesh(n=12, seed=0):
    """A full-screen square split into 2*n*n triangles with jittered interior vertices."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.linspace(-1.0, 1.0, n + 1)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    jitter = (torch.rand(n + 1, n + 1, 2, generator=g) - 0.5) * (1.6 / n)
    jitter[[0, -1]] = 0
    jitter[:, [0, -1]] = 0
    xy = torch.stack([xx, yy], -1) + jitter
    verts = torch.cat([xy.reshape(-1, 2), torch.zeros((n + 1) ** 2, 1), torch.ones((n + 1) ** 2, 1)], 1)
    i = torch.arange(n)
    a = (i[:, None] * (n + 1) + i[None, :]).reshape(-1)
    tri = torch.cat([torch.stack([a, a + 1, a + n + 2], 1), torch.stack([a, a + n + 2, a + n + 1], 1)])
    return verts, tri.to(torch.int32)


def test_shared_edges_are_watertight():
    verts, tri = grid_mesh()
    for res in [(37, 53), (64, 64)]:
        rast, _ = R.rasterize(verts[None], tri, res, backend="torch")
        assert (rast[..., 3] > 0).all(), "a pixel between two triangles was dropped"


def test_samples_on_shared_edges_belong_to_exactly_one_triangle():
    """Vertices on pixel centres put many samples exactly on edges: the tie rule must give
    each to one triangle (range mode draws one triangle per image, so counts add up)."""
    size, lattice = 16, torch.tensor([1, 5, 9, 13])
    ndc = (2 * lattice + 1).float() / size - 1
    yy, xx = torch.meshgrid(ndc, ndc, indexing="ij")
    verts = torch.stack([xx.reshape(-1), yy.reshape(-1), torch.zeros(16), torch.ones(16)], 1)
    i = (torch.arange(3)[:, None] * 4 + torch.arange(3)[None, :]).reshape(-1)
    tri = torch.cat([torch.stack([i, i + 1, i + 5], 1), torch.stack([i, i + 5, i + 4], 1)]).int()
    ranges = torch.stack([torch.arange(18), torch.ones(18, dtype=torch.long)], 1).int()
    rast, _ = R.rasterize(verts, tri, (size, size), ranges=ranges, backend="torch")
    count = (rast[..., 3] > 0).sum(0)
    assert count.max() == 1, "a sample on a shared edge was drawn twice"
    assert (count[2:13, 2:13] == 1).all(), "a sample inside the square was dropped"


def test_batches_instanced_and_range_mode():
    verts, tri = grid_mesh(4)
    g = torch.Generator().manual_seed(1)
    pos = torch.stack([verts * 0.7, verts + torch.tensor([0.3, -0.2, 0.1, 0.0])])
    pos = pos + torch.randn(pos.shape, generator=g) * 0.02 * torch.tensor([1.0, 1, 0, 0])
    rast, db = R.rasterize(pos, tri, (16, 24), backend="torch")
    for b in range(2):
        r1, d1 = R.rasterize(pos[b:b + 1], tri, (16, 24), backend="torch")
        assert torch.equal(rast[b:b + 1], r1) and torch.equal(db[b:b + 1], d1)
    # range mode: image 0 draws triangles 0..9, image 1 draws 10..end; ids stay global
    ranges = torch.tensor([[0, 10], [10, tri.shape[0] - 10]], dtype=torch.int32)
    rr, _ = R.rasterize(verts, tri, (16, 24), ranges=ranges, backend="torch")
    ids = rr[..., 3]
    assert ids[0].max() <= 10 and ids[0].max() > 0
    assert ids[1][ids[1] > 0].min() >= 11
    sub, _ = R.rasterize(verts[None], tri[10:].contiguous(), (16, 24), backend="torch")
    assert torch.equal(torch.where(sub[0, ..., 3] > 0, sub[0, ..., 3] + 10, 0), ids[1])
    # per-image attributes in instanced mode, shared ones in range mode
    attr = torch.randn(2, verts.shape[0], 3, generator=g)
    out, _ = R.interpolate(attr, rast, tri, backend="torch")
    out1, _ = R.interpolate(attr[1], rast[1:], tri, backend="torch")
    torch.testing.assert_close(out[1:], out1)
    outr, _ = R.interpolate(attr[0], rr, tri, backend="torch")
    assert outr.shape == (2, 16, 24, 3)


def sutherland_hodgman_near(clip):
    """Clip a polygon ``[n,4]`` (float64) against ``z + w >= 0``; returns the kept polygon."""
    out = []
    n = len(clip)
    for i in range(n):
        a, b = clip[i], clip[(i + 1) % n]
        da, db = a[2] + a[3], b[2] + b[3]
        if da >= 0:
            out.append(a)
        if (da >= 0) != (db >= 0):
            t = da / (da - db)
            out.append(a + t * (b - a))
    return np.array(out)


def test_triangle_crossing_the_near_plane_is_clipped():
    proj = R.perspective(60, 1.0, near=0.5, far=20).double()
    eye = np.array([[-1.0, -0.6, -3.0], [0.8, -0.5, -2.0], [0.1, 0.7, 1.5]])  # last vertex behind
    clip = (torch.from_numpy(np.c_[eye, np.ones(3)]) @ proj.T).numpy()
    assert clip[2, 3] < 0  # behind the camera: w < 0
    attr = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    h = w = 48
    rast, _ = R.rasterize(torch.tensor(clip[None], dtype=torch.float32), TRI1, (h, w), backend="torch")
    out, _ = R.interpolate(attr, rast, TRI1, backend="torch")
    # reference: clip explicitly, fan-triangulate, draw the pieces (all in front of the camera)
    poly = sutherland_hodgman_near(clip)
    assert len(poly) == 4 and (poly[:, 3] > 0).all()
    # barycentric coordinates of each new vertex with respect to the original triangle
    bary = np.linalg.lstsq(clip.T, poly.T, rcond=None)[0].T
    pieces = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    ref, _ = R.rasterize(torch.tensor(poly[None], dtype=torch.float32), pieces, (h, w), backend="torch")
    ref_out, _ = R.interpolate(torch.tensor(bary, dtype=torch.float32) @ attr, ref, pieces, backend="torch")
    cov, ref_cov = rast[0, ..., 3] > 0, ref[0, ..., 3] > 0
    assert cov.sum() > 200
    assert (cov != ref_cov).sum() <= 2  # only pixel centres on the new edges may differ
    both = cov & ref_cov
    torch.testing.assert_close(out[0][both], ref_out[0][both], atol=2e-5, rtol=1e-4)
    # nearest visible depth is at or beyond the near plane
    assert rast[0, ..., 2][cov].min() >= -1
    # a triangle entirely behind the camera draws nothing
    behind = torch.tensor(clip[None], dtype=torch.float32) * torch.tensor([1.0, 1, 1, -1])
    r2, _ = R.rasterize(behind, TRI1, (h, w), backend="torch")
    assert (r2[..., 3] == 0).all()


def test_far_plane_and_frustum_culling():
    pos = torch.tensor([[[-0.5, -0.5, 1.5, 1.0], [0.5, -0.5, 1.5, 1.0], [0.0, 0.5, 1.5, 1.0],
                         [3.0, 3.0, 0.0, 1.0], [4.0, 3.0, 0.0, 1.0], [3.0, 4.0, 0.0, 1.0]]])
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    rast, _ = R.rasterize(pos, tri, (8, 8), backend="torch")
    assert (rast == 0).all()


def test_large_triangles_are_chunked(monkeypatch):
    import zoo.render.torch_raster as tr
    verts, tri = grid_mesh(3)
    calls = []
    real = tr._cover_snapped
    monkeypatch.setattr(tr, "_cover_snapped", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    full, _ = R.rasterize(verts[None], tri, (64, 64), backend="torch")
    whole = len(calls)
    monkeypatch.setattr(tr, "_CHUNK_POINTS", 64)
    chunked, _ = R.rasterize(verts[None], tri, (64, 64), backend="torch")
    # the small budget splits the groups into more, smaller calls, with the same image
    assert len(calls) - whole > whole and max(calls[whole:]) < max(calls[:whole])
    assert torch.equal(full, chunked)


@pytest.mark.parametrize("bad, match", [
    (lambda p, t: R.rasterize(p.long(), t, (8, 8)), "float"),
    (lambda p, t: R.rasterize(p[..., :3], t, (8, 8)), "last dimension"),
    (lambda p, t: R.rasterize(p, t + 5, (8, 8)), "index"),
    (lambda p, t: R.rasterize(p, t.float(), (8, 8)), "int32"),
    (lambda p, t: R.rasterize(p[0], t, (8, 8)), "ranges"),
    (lambda p, t: R.rasterize(p, t, (8, 8), ranges=torch.tensor([[0, 1]])), "instanced"),
    (lambda p, t: R.rasterize(p[0], t, (8, 8), ranges=torch.tensor([[0, 4]])), "inside tri"),
    (lambda p, t: R.rasterize(p, t, (0, 8)), "resolution"),
    (lambda p, t: R.rasterize(p, t, (8, 8), backend="opengl"), "backend"),
    (lambda p, t: R.rasterize(p, t, (8, 8), backend="nvdiffrast"), "nvdiffrast"),
    (lambda p, t: R.interpolate(torch.ones(3, 2), R.rasterize(p, t, (8, 8))[0], t, diff_attrs="all"), "rast_db"),
    (lambda p, t: R.interpolate(torch.ones(3, 3, 2), R.rasterize(p, t, (8, 8))[0], t), "batch"),
    (lambda p, t: R.interpolate(torch.ones(3, 2), R.rasterize(p, t, (8, 8))[0] * 2, t), "pass the tri"),
    (lambda p, t: R.antialias(torch.ones(1, 8, 8, 3), R.rasterize(p, t, (8, 8))[0], p.expand(2, 3, 4), t),
     "pass the pos"),
])
def test_bad_input_raises_render_error(bad, match):
    pos = torch.tensor([[[-0.5, -0.5, 0, 1.0], [0.5, -0.5, 0, 1.0], [0, 0.5, 0, 1.0]]])
    with pytest.raises(RenderError, match=match) as info:
        bad(pos, TRI1)
    assert isinstance(info.value, ZooError)


def test_rasterize_speed_path_matches_on_a_closed_mesh():
    """The benchmark mesh: closed, so front and back layers cover the same pixels."""
    verts, tri = R.capsule(segments=24, rings=16)
    view = R.look_at((0.4, 0.5, 3.0), (0.0, 0.0, 0.0))
    pos = R.world_to_clip(verts, view, R.perspective(40, 1.0, 0.5, 10))
    layers = list(R.depth_peel(pos, tri, (64, 64), 3, backend="torch"))
    front, back, third = (layer[0] for layer in layers)
    assert (front[..., 3] > 0).sum() > 500
    assert torch.equal(front[..., 3] > 0, back[..., 3] > 0)  # every ray enters and leaves once
    assert (third[..., 3] == 0).all()  # convex: nothing behind the back wall
    cov = front[..., 3] > 0
    assert (back[..., 2][cov] > front[..., 2][cov]).all()
    first, _ = R.rasterize(pos, tri, (64, 64), backend="torch")
    assert torch.equal(first, front)


def test_depth_peeler_layers_equal_successive_peels():
    """The torch peeler sorts one coverage pass into layers; each layer must equal what peeling
    one rasterization at a time behind the previous layer's depth gives, on interpenetrating
    closed meshes seen by two cameras (coplanar duplicates included)."""
    from zoo.render.torch_raster import TorchPeelState, rasterize_torch

    a, ta = R.capsule(0.5, 0.6, segments=20, rings=12)
    b, tb = R.capsule(0.35, 1.2, segments=16, rings=10)
    b = b @ torch.tensor([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]) + torch.tensor([0.2, 0.1, 0.1])
    verts = torch.cat([a, b, a])  # the third copy duplicates the first at equal depths
    tri = torch.cat([ta, tb + len(a), ta + len(a) + len(b)])
    eyes = torch.tensor([[0.4, 0.5, 3.0], [-2.0, 0.3, 1.5]])
    pos = R.world_to_clip(verts, R.look_at(eyes, torch.zeros(2, 3)), R.perspective(40, 1.0, 0.5, 10))
    state, deepest = None, 0
    with R.DepthPeeler(pos, tri, (48, 56), backend="torch") as peeler:
        for k in range(6):
            rast, db = peeler.rasterize_next_layer()
            ref, ref_db, keys = rasterize_torch(pos, tri, (48, 56), None, True, state)
            state = TorchPeelState(keys)
            assert torch.equal(rast, ref) and torch.equal(db, ref_db), k
            deepest = k if (rast[..., 3] > 0).any() else deepest
    assert deepest >= 3  # the two capsules cross: four surfaces along some rays
    with R.DepthPeeler(pos, tri, (48, 56), backend="torch") as peeler:
        first_two, db = peeler.rasterize_layers(2)
        rest, _ = peeler.rasterize_layers(4)
    singles = [r for r, _ in R.depth_peel(pos, tri, (48, 56), 6, backend="torch")]
    assert first_two.shape == (2, 2, 48, 56, 4) and db.shape == (2, 2, 48, 56, 4)
    assert torch.equal(torch.cat([first_two, rest]), torch.stack(singles))
    with R.DepthPeeler(pos, tri, (48, 56), backend="torch") as peeler:
        frag, pix, layer = peeler.fragments()
        near, _, near_layer = peeler.fragments(max_layers=2)
    assert int(layer.max()) == deepest and int(near_layer.max()) == 1
    for k, single in enumerate(singles):
        flat = single.reshape(-1, 4)
        sel = layer == k
        assert sel.sum() == (flat[:, 3] > 0).sum()
        assert torch.equal(frag[sel], flat[pix[sel]])


def test_barycentrics_stay_accurate_at_grazing_angles():
    """Near silhouettes of a closed mesh the edge functions nearly cancel; the resolve pass must
    keep float32 barycentrics close to the exact ones (solved here in float64 per pixel)."""
    verts, tri = R.capsule()
    eyes = torch.tensor([[0.3, 0.4, 2.6], [-1.5, -0.5, 2.0]])
    pos = R.world_to_clip(verts, R.look_at(eyes, torch.zeros(2, 3)), R.perspective(45, 1.0, 0.3, 10))
    h, w = 128, 160
    rast, _ = R.rasterize(pos, tri, (h, w), backend="torch")
    b, yy, xx = (rast[..., 3] > 0).nonzero().unbind(1)
    v = pos[b[:, None], tri.long()[rast[b, yy, xx, 3].long() - 1]].double().numpy()  # [N,3,4]
    px = ((2 * xx + 1).double() / w - 1).numpy()[:, None]
    py = ((2 * yy + 1).double() / h - 1).numpy()[:, None]
    # Perspective-correct weights l: sum l_i (x_i - px w_i) = sum l_i (y_i - py w_i) = 0, sum l_i = 1.
    m = np.stack([v[..., 0] - px * v[..., 3], v[..., 1] - py * v[..., 3], np.ones_like(px.repeat(3, 1))], 1)
    lam = np.linalg.solve(m, np.broadcast_to([0.0, 0.0, 1.0], (len(m), 3))[..., None])[..., 0]
    # u, v are clamped to [0, 1] as nvdiffrast's: a sample inside the 1/16-pixel-snapped
    # triangle may lie just outside the exact one.
    err = np.abs(rast[b, yy, xx, :2].double().numpy() - lam[:, :2].clip(0, 1)).max(1)
    assert len(err) > 5000
    assert err.max() < 1e-3, err.max()
    assert (err > 1e-5).mean() < 0.01, (err > 1e-5).mean()  # the plane-equation form: 27%
