"""Gradients of the torch backend: torch.autograd.gradcheck on small problems, and fits."""
from __future__ import annotations

import torch
from torch.autograd import gradcheck

import zoo.render as R

TRI2 = torch.tensor([[0, 1, 2], [1, 3, 2]], dtype=torch.int32)
RES = (7, 9)


def two_triangles(dtype=torch.float64):
    # generic coordinates: no pixel centre lies within 1e-3 of an edge
    return torch.tensor([[[-0.83, -0.77, 0.11, 1.3], [0.71, -0.66, -0.2, 0.9],
                          [-0.52, 0.74, 0.3, 1.1], [0.93, 0.88, 0.05, 1.2]]], dtype=dtype)


def test_gradcheck_rasterize_wrt_positions():
    pos = two_triangles().requires_grad_()

    def fn(p):
        rast, db = R.rasterize(p, TRI2, RES, backend="torch")
        return rast[..., :3], db

    assert (R.rasterize(pos, TRI2, RES)[0][..., 3] > 0).sum() > 20
    assert gradcheck(fn, (pos,), eps=1e-6, atol=1e-6)


def test_gradcheck_interpolate_wrt_attributes_barycentrics_and_db():
    pos = two_triangles()
    rast, db = R.rasterize(pos, TRI2, RES, backend="torch")
    fixed = rast[..., 2:].detach()
    g = torch.Generator().manual_seed(0)
    attr = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_()
    uv = rast[..., :2].detach().clone().requires_grad_()
    db = db.detach().clone().requires_grad_()

    def fn(a, bary, d):
        r = torch.cat([bary, fixed], -1)
        return R.interpolate(a, r, TRI2, rast_db=d, diff_attrs=[0, 2], backend="torch")

    assert gradcheck(fn, (attr, uv, db), eps=1e-6, atol=1e-6)


def test_gradcheck_texture_wrt_texture_uv_and_footprint():
    g = torch.Generator().manual_seed(1)
    tex = torch.rand(1, 8, 8, 2, generator=g, dtype=torch.float64).requires_grad_()
    uv = (torch.rand(1, 3, 4, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2).requires_grad_()
    for mode in ["wrap", "clamp", "zero"]:
        assert gradcheck(lambda t, u: R.texture(t, u, filter_mode="linear", boundary_mode=mode),
                         (tex, uv), eps=1e-6, atol=1e-6)
    # footprint between 1.5 and 5 texels: strictly inside levels 0..3, fractional level
    da = (torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64) * 0.4 + 0.2).requires_grad_()
    assert gradcheck(lambda t, u, d: R.texture(t, u, uv_da=d, filter_mode="linear-mipmap-linear"),
                     (tex, uv, da), eps=1e-6, atol=1e-6)


def test_gradcheck_antialias_wrt_color_and_positions():
    pos = two_triangles()
    pos[..., 3] = 1.0
    pos = pos.requires_grad_()
    rast, _ = R.rasterize(pos, TRI2, RES, backend="torch")
    g = torch.Generator().manual_seed(2)
    color = torch.rand(1, *RES, 3, generator=g, dtype=torch.float64).requires_grad_()
    out = R.antialias(color, rast, pos, TRI2, backend="torch")
    assert not torch.equal(out, color)  # some silhouette pixels were blended
    assert gradcheck(lambda c, p: R.antialias(c, rast.detach(), p, TRI2, backend="torch"),
                     (color, pos), eps=1e-6, atol=1e-6)


def test_gradcheck_composite():
    g = torch.Generator().manual_seed(3)
    layers = torch.rand(3, 2, 4, generator=g, dtype=torch.float64).requires_grad_()
    bg = torch.rand(3, generator=g, dtype=torch.float64).requires_grad_()
    assert gradcheck(lambda x, b: R.composite(x, background=b), (layers, bg))


def render(colors, tex, pos, uv, tri, res=(32, 32)):
    """Vertex colour times a bilinear texture, antialiased."""
    rast, _ = R.rasterize(pos, tri, res, backend="torch")
    col, _ = R.interpolate(colors, rast, tri, backend="torch")
    tc, _ = R.interpolate(uv, rast, tri, backend="torch")
    img = col * R.texture(tex, tc, filter_mode="linear", boundary_mode="clamp", backend="torch")
    return R.antialias(img, rast, pos, tri, backend="torch")


def test_fit_vertex_colours_and_texture_to_a_target():
    torch.manual_seed(0)
    verts, uv, tri = R.quad(0.8)
    pos = torch.cat([verts[:, :2], torch.zeros(4, 1), torch.ones(4, 1)], 1)[None]
    true_colors = torch.rand(4, 3) * 0.8 + 0.2
    true_tex = torch.rand(1, 8, 8, 3)
    target = render(true_colors, true_tex, pos, uv, tri)
    # (a) vertex colours, texture known
    colors = torch.full((4, 3), 0.5, requires_grad=True)
    opt = torch.optim.Adam([colors], lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        loss = (render(colors, true_tex, pos, uv, tri) - target).pow(2).mean()
        loss.backward()
        opt.step()
    assert (colors - true_colors).abs().max() < 0.02
    # (b) texture, colours known
    tex = torch.full((1, 8, 8, 3), 0.5, requires_grad=True)
    opt = torch.optim.Adam([tex], lr=0.05)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = (render(true_colors, tex, pos, uv, tri) - target).pow(2).mean()
        first = first or loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * first
    assert (tex - true_tex).abs().max() < 0.05


def test_fit_position_through_silhouette_gradients():
    """Only antialias gives the silhouette a position gradient: a shifted triangle moves back."""
    base = torch.tensor([[-0.6, -0.5, 0.0, 1.0], [0.5, -0.6, 0.0, 1.0], [0.0, 0.6, 0.0, 1.0]])
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)

    def draw(offset):
        pos = (base + torch.cat([offset, torch.zeros(2)]))[None]
        rast, _ = R.rasterize(pos, tri, (32, 32), backend="torch")
        return R.antialias((rast[..., 3:] > 0).float(), rast, pos, tri, backend="torch")

    target = draw(torch.zeros(2))
    offset = torch.tensor([0.15, -0.1], requires_grad=True)
    opt = torch.optim.Adam([offset], lr=0.01)
    for _ in range(120):
        opt.zero_grad()
        (draw(offset) - target).pow(2).sum().backward()
        opt.step()
    assert offset.detach().abs().max() < 0.02, offset
