"""zoo.render.texture / antialias / composite / cameras on the torch backend."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import zoo.render as R
from zoo.errors import RenderError

QUAD_TRI = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)


def full_screen_quad():
    verts, uv, tri = R.quad(1.0)
    pos = torch.cat([verts[:, :2], torch.zeros(4, 1), torch.ones(4, 1)], 1)[None]
    return pos, uv, tri


def checkerboard(h, w):
    r = torch.arange(h)[:, None]
    c = torch.arange(w)[None, :]
    return ((r + c) % 2).float()[None, :, :, None].expand(1, h, w, 3).clone()


def test_textured_quad_samples_a_checkerboard_exactly():
    pos, uv, tri = full_screen_quad()
    tex = checkerboard(8, 8) * torch.tensor([1.0, 0.5, 0.25])
    rast, _ = R.rasterize(pos, tri, (8, 8), backend="torch")
    tc, _ = R.interpolate(uv, rast, tri, backend="torch")
    # pixel (r, c) lands on texel (r, c)'s centre, so bilinear filtering returns it exactly
    img = R.texture(tex, tc, filter_mode="linear", backend="torch")
    torch.testing.assert_close(img, tex, atol=1e-5, rtol=0)
    # at twice the resolution, nearest filtering repeats every texel 2x2
    rast, _ = R.rasterize(pos, tri, (16, 16), backend="torch")
    tc, _ = R.interpolate(uv, rast, tri, backend="torch")
    img = R.texture(tex, tc, filter_mode="nearest", backend="torch")
    expect = tex.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(img, expect)
    # and bilinear halfway between two texel centres averages them
    half = R.texture(tex, torch.tensor([[[[1.0 / 8, 0.5 / 8]]]]), filter_mode="linear")
    torch.testing.assert_close(half[0, 0, 0], (tex[0, 0, 0] + tex[0, 0, 1]) / 2)


def test_boundary_modes():
    g = torch.Generator().manual_seed(0)
    tex = torch.rand(1, 4, 4, 2, generator=g)
    at = lambda u, v, mode, f="linear": R.texture(tex, torch.tensor([[[[u, v]]]]), filter_mode=f,
                                                  boundary_mode=mode)[0, 0, 0]
    torch.testing.assert_close(at(1.3, -0.2, "wrap"), at(0.3, 0.8, "wrap"))
    torch.testing.assert_close(at(1.7, 0.375, "clamp"), tex[0, 1, 3])  # clamp to edge texel centre
    assert torch.equal(at(1.7, 0.375, "zero"), torch.zeros(2))
    # wrap blends the last and first texel across the seam
    torch.testing.assert_close(at(0.0, 0.125, "wrap"), (tex[0, 0, 3] + tex[0, 0, 0]) / 2)
    torch.testing.assert_close(at(0.0, 0.125, "zero"), tex[0, 0, 0] / 2)
    torch.testing.assert_close(at(0.99, 0.6, "wrap", "nearest"), tex[0, 2, 3])


def uv_da_for(texels_x, texels_y, h, w):
    """uv_da whose footprint spans the given texel counts along X and Y."""
    return torch.tensor([[[[texels_x / w, 0.0, 0.0, texels_y / h]]]])


def test_mipmap_levels_follow_the_footprint():
    g = torch.Generator().manual_seed(0)
    tex = torch.rand(1, 16, 16, 3, generator=g)
    lvl1 = F.avg_pool2d(tex.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    lvl2 = F.avg_pool2d(tex.permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1)
    uv = torch.tensor([[[[5.0 / 16, 9.0 / 16]]]])  # on a level-1 texel centre
    sample = lambda da, **kw: R.texture(tex, uv, uv_da=da, backend="torch", **kw)[0, 0, 0]

    def bilinear_at(level, x, y):  # texel-space coordinates, texel centres at integers
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        a = level[0, y0, x0] * (1 - fx) + level[0, y0, x0 + 1] * fx
        b = level[0, y0 + 1, x0] * (1 - fx) + level[0, y0 + 1, x0 + 1] * fx
        return a * (1 - fy) + b * fy

    at_lvl2 = bilinear_at(lvl2, 5 / 16 * 4 - 0.5, 9 / 16 * 4 - 0.5)
    # footprint of 2 texels: exactly level 1
    torch.testing.assert_close(sample(uv_da_for(2, 2, 16, 16)), lvl1[0, 4, 2])
    # the major axis decides: 4 texels along X only -> level 2
    torch.testing.assert_close(sample(uv_da_for(4, 1, 16, 16)), at_lvl2)
    # 2*sqrt(2) texels -> level 1.5: halfway between levels 1 and 2
    torch.testing.assert_close(sample(uv_da_for(2 * math.sqrt(2), 1, 16, 16)),
                               (lvl1[0, 4, 2] + at_lvl2) / 2)
    # ...which linear-mipmap-nearest rounds down to level 1
    torch.testing.assert_close(sample(uv_da_for(2 * math.sqrt(2), 1, 16, 16),
                                      filter_mode="linear-mipmap-nearest"), lvl1[0, 4, 2])
    # magnification stays at level 0; a bias moves it; the level is capped by max_mip_level
    torch.testing.assert_close(sample(uv_da_for(0.5, 0.5, 16, 16)),
                               R.texture(tex, uv, filter_mode="linear")[0, 0, 0])
    torch.testing.assert_close(sample(uv_da_for(1, 1, 16, 16), mip_level_bias=torch.ones(1, 1, 1)),
                               lvl1[0, 4, 2])
    torch.testing.assert_close(sample(uv_da_for(4, 4, 16, 16), max_mip_level=1), lvl1[0, 4, 2])
    # a prebuilt stack gives the same answer; a huge footprint averages the whole texture
    mip = R.texture_construct_mip(tex)
    assert [m.shape[1] for m in mip] == [16, 8, 4, 2, 1]
    torch.testing.assert_close(sample(uv_da_for(64, 64, 16, 16)), tex.mean((0, 1, 2)))
    torch.testing.assert_close(R.texture(tex, uv, uv_da=uv_da_for(3, 3, 16, 16), mip=mip),
                               R.texture(tex, uv, uv_da=uv_da_for(3, 3, 16, 16)))


def test_mip_of_odd_size_needs_a_level_limit():
    tex = torch.rand(1, 12, 12, 1)
    with pytest.raises(RenderError, match="max_mip_level=2"):
        R.texture_construct_mip(tex)
    assert len(R.texture_construct_mip(tex, max_mip_level=2)) == 3
    with pytest.raises(RenderError, match="uv_da"):
        R.texture(tex, torch.zeros(1, 1, 1, 2), filter_mode="linear-mipmap-linear")
    with pytest.raises(RenderError, match="boundary_mode"):
        R.texture(tex, torch.zeros(1, 1, 1, 2), boundary_mode="cube")


def edge_scene(edge_x, height=6, width=10):
    """A quad whose only on-screen silhouette edge is the vertical line x = edge_x (NDC)."""
    pos = torch.tensor([[[-3.0, -3.0, 0, 1], [edge_x, -3.0, 0, 1], [edge_x, 3.0, 0, 1],
                         [-3.0, 3.0, 0, 1]]], requires_grad=True)
    rast, _ = R.rasterize(pos, QUAD_TRI, (height, width), backend="torch")
    color = (rast[..., 3:] > 0).float()
    return pos, rast, color


def test_antialias_gives_exact_box_filter_coverage_at_a_vertical_edge():
    h, w = 6, 10
    for edge_x in [0.1234, -0.47, 0.61]:
        pos, rast, color = edge_scene(edge_x, h, w)
        out = R.antialias(color, rast, pos, QUAD_TRI, backend="torch")
        edge_px = (edge_x + 1) * w / 2  # edge position in pixels from the left
        expect = (edge_px - torch.arange(w, dtype=torch.float32)).clamp(0, 1)
        torch.testing.assert_close(out[0, :, :, 0], expect.expand(h, w), atol=1e-5, rtol=0)
        # moving the edge by d NDC adds d * W/2 pixels of coverage on each of the H rows
        out.sum().backward()
        grad_edge = pos.grad[0, 1, 0] + pos.grad[0, 2, 0]
        torch.testing.assert_close(grad_edge, torch.tensor(h * w / 2.0))
        assert pos.grad[0, [0, 3]].abs().max() == 0  # the far vertices are off-screen


def test_antialias_leaves_interior_edges_alone():
    pos, _, tri = full_screen_quad()
    pos = pos * torch.tensor([1.3, 1.3, 1.0, 1.0])  # the quad's outline is off-screen
    rast, _ = R.rasterize(pos, tri, (12, 12), backend="torch")
    color = torch.stack([rast[..., 3] == 1, rast[..., 3] == 2, torch.zeros_like(rast[..., 3]).bool()], -1).float()
    out = R.antialias(color, rast, pos, tri, backend="torch")
    assert torch.equal(out, color)  # the diagonal is shared: not a silhouette
    # with the two triangles split apart (no shared vertices), the diagonal is a boundary
    split_pos = torch.cat([pos[:, [0, 1, 2]], pos[:, [0, 2, 3]]], 1)
    split_tri = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    rast2, _ = R.rasterize(split_pos, split_tri, (12, 12), backend="torch")
    out2 = R.antialias(color, rast2, split_pos, split_tri, backend="torch")
    assert not torch.equal(out2, color)


def test_antialias_approaches_supersampled_coverage():
    pos = torch.tensor([[[-0.83, -0.71, 0.2, 1.0], [0.77, -0.38, 0.2, 1.0], [-0.12, 0.86, 0.2, 1.0]]])
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    n, k = 24, 8
    rast, _ = R.rasterize(pos, tri, (n, n), backend="torch")
    color = (rast[..., 3:] > 0).float()
    aa = R.antialias(color, rast, pos, tri, backend="torch")
    fine, _ = R.rasterize(pos, tri, (n * k, n * k), backend="torch")
    truth = F.avg_pool2d((fine[..., 3] > 0).float()[:, None], k)[:, 0, :, :, None]
    err_aliased = (color - truth).abs().mean()
    err_aa = (aa - truth).abs().mean()
    assert err_aa < 0.5 * err_aliased, (err_aa, err_aliased)


def test_topology_hash_pairs_shared_edges():
    verts, tri = R.capsule(segments=8, rings=4)
    topo = R.antialias_construct_topology_hash(tri)
    assert (topo.opposite >= 0).all()  # closed mesh: every edge has a neighbour
    _, _, qtri = R.quad()
    opp = R.antialias_construct_topology_hash(qtri).opposite
    # triangle 0 = (0,1,2), edge facing vertex 1 is (2,0), shared with triangle 1 = (0,2,3)
    assert opp.tolist() == [[-1, 3, -1], [-1, -1, 1]]


def test_composite_front_to_back_over():
    red = torch.tensor([1.0, 0.0, 0.0, 0.5])
    blue = torch.tensor([0.0, 0.0, 1.0, 1.0])
    green = torch.tensor([0.0, 1.0, 0.0, 1.0])
    out = R.composite([red, blue, green])
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0, 0.5, 1.0]))
    pre = R.composite(torch.stack([red * torch.tensor([0.5, 0.5, 0.5, 1]), blue]), premultiplied=True)
    torch.testing.assert_close(pre, out)
    half = R.composite([red], background=torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(half, torch.tensor([0.5, 0.0, 0.5, 0.5]))
    # order matters: blue first hides red completely
    torch.testing.assert_close(R.composite([blue, red]), blue)
    with pytest.raises(RenderError):
        R.composite([red, torch.zeros(3)])


def test_peeled_layers_composite_interpenetrating_shells():
    """Two crossing translucent quads: per pixel, the nearer one must be composited first."""
    a = torch.tensor([[-1.0, -1, -0.5, 1], [1, -1, 0.5, 1], [1, 1, 0.5, 1], [-1, 1, -0.5, 1]])
    b = a * torch.tensor([1.0, 1, -1, 1])  # tilted the other way: they cross at x = 0
    pos = torch.cat([a, b])[None]
    tri = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]], dtype=torch.int32)
    colors = torch.tensor([[1.0, 0, 0, 0.5]] * 4 + [[0.0, 0, 1, 0.5]] * 4)
    layers = []
    for rast, _ in R.depth_peel(pos, tri, (8, 8), 3, backend="torch"):
        rgba, _ = R.interpolate(colors, rast, tri, backend="torch")
        layers.append(rgba)
    assert (layers[2] == 0).all()
    img = R.composite(layers)
    left, right = img[0, :, 1], img[0, :, 6]
    # left half: shell a (red) is nearer; right half: shell b (blue) is nearer
    torch.testing.assert_close(left, torch.tensor([0.5, 0, 0.25, 0.75]).expand(8, 4))
    torch.testing.assert_close(right, torch.tensor([0.25, 0, 0.5, 0.75]).expand(8, 4))


def test_cameras_follow_opengl_conventions():
    proj = R.perspective(90, 2.0, near=1.0, far=10.0)
    ndc = lambda p: (R.transform(torch.tensor(p), proj) / R.transform(torch.tensor(p), proj)[..., 3:])
    torch.testing.assert_close(ndc([0.0, 0.0, -1.0])[2], torch.tensor(-1.0))
    torch.testing.assert_close(ndc([0.0, 0.0, -10.0])[2], torch.tensor(1.0))
    torch.testing.assert_close(ndc([2.0, 1.0, -1.0])[:2], torch.tensor([1.0, 1.0]))  # 90 deg, aspect 2
    view = R.look_at((1.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    eye_space = R.transform(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), view)
    torch.testing.assert_close(eye_space[0, :3], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(eye_space[1, :3], torch.tensor([0.0, 0.0, -math.sqrt(14)]), atol=1e-5, rtol=0)
    ortho = R.orthographic(-2, 2, -1, 1, 0.5, 4.5)
    torch.testing.assert_close(R.transform(torch.tensor([2.0, -1.0, -4.5]), ortho),
                               torch.tensor([1.0, -1.0, 1.0, 1.0]))
    views = R.look_at(torch.tensor([[0.0, 0, 3], [3.0, 0, 0]]), (0.0, 0.0, 0.0))
    clip = R.world_to_clip(torch.zeros(5, 3), views, proj)
    assert clip.shape == (2, 5, 4)
    assert R.world_to_clip(torch.zeros(5, 3), view, proj).shape == (1, 5, 4)
    with pytest.raises(RenderError):
        R.perspective(0, 1.0)
    with pytest.raises(RenderError):
        R.look_at((0.0, 1.0, 0.0), (0.0, 0.0, 0.0))


def test_capsule_is_closed_outward_and_smpl_sized():
    verts, tri = R.capsule()
    assert tri.shape == (13824, 3) and tri.dtype == torch.int32
    edges = torch.cat([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]).long()
    # every directed edge appears once and its reverse once: closed and consistently wound
    key = edges[:, 0] * len(verts) + edges[:, 1]
    rev = edges[:, 1] * len(verts) + edges[:, 0]
    assert key.unique().numel() == key.numel()
    assert torch.equal(key.sort().values, rev.sort().values)
    assert len(verts) - key.numel() // 2 + len(tri) == 2  # Euler characteristic of a sphere
    v = verts[tri.long()].double()
    volume = (v[:, 0] * torch.linalg.cross(v[:, 1], v[:, 2], dim=1)).sum() / 6
    exact = math.pi * 0.5 ** 2 * 1.0 + 4 / 3 * math.pi * 0.5 ** 3
    assert 0.97 * exact < volume < exact  # positive: outward; inscribed: slightly smaller
