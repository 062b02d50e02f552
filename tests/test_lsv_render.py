"""The shell renderer: compositing rules, agreement with an independent per-layer composite,
gradients, batching, and texture fitting through it end to end."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import zoo.render as R
from zoo.errors import RenderError
from zoo.models.lsv import ShellConfig, Shells, render_shells, template_from_mannequin
from zoo.models.lsv.render import orbit_cameras


def quad_layers(depths, tilts, size=0.8, dtype=torch.float32):
    """Layers of one quad each ``[1, N, 4, 3]``, at depth ``z`` tilted about ``y`` (so layers cross),
    with the quad's faces and uv (uv_faces = faces)."""
    verts, uv, tri = R.quad(size)
    layers = []
    for z, tilt in zip(depths, tilts):
        v = verts.clone().to(dtype)
        v[:, 2] = z + tilt * v[:, 0]
        layers.append(v)
    return torch.stack(layers)[None], tri.long(), uv.to(dtype)


def ortho(batch=1, views=1, dtype=torch.float32):
    m = R.orthographic(-1, 1, -1, 1, 0.1, 10, dtype=dtype) @ R.look_at((0, 0, 3.0), (0, 0, 0), dtype=dtype)
    return m.expand(batch, views, 4, 4)


def test_one_opaque_layer_equals_that_layer_alone():
    t = template_from_mannequin()
    shells = Shells(t.body, ShellConfig(), t.tips)(torch.zeros(1, 24, 3))["shells"]
    g = torch.Generator().manual_seed(0)
    tex = torch.rand(1, 5, 4, 32, 32, generator=g)
    tex[:, 0, 3] = 1
    mvp = orbit_cameras(2, 3.0, 10.0)[None]
    full = render_shells(shells, t.body.faces, t.uv, t.uv_faces, tex, mvp, (48, 48), background=torch.ones(3) * 0.3)
    alone = render_shells(shells[:, :1], t.body.faces, t.uv, t.uv_faces, tex[:, :1], mvp, (48, 48), num_layers=1,
                          background=torch.ones(3) * 0.3)
    assert (alone[..., 3] > 0.99).float().mean() > 0.1
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=0)


def test_two_half_transparent_layers_cover_three_quarters():
    layers, tri, uv = quad_layers([0.0, -0.5], [0.0, 0.0])
    layers[0, 1, :, 0] += 0.6  # shift the back quad right: overlap in the middle only
    tex = torch.full((1, 2, 4, 8, 8), 0.5)
    out = render_shells(layers, tri, uv, tri, tex, ortho(), (32, 32), antialias=False)[0, 0]
    alpha = out[..., 3]
    assert torch.allclose(alpha[16, 18], torch.tensor(0.75))  # both quads
    assert torch.allclose(alpha[16, 4], torch.tensor(0.5))  # front only
    assert torch.allclose(alpha[16, 30], torch.tensor(0.5))  # back only
    assert alpha[0, 0] == 0


def test_composite_equals_separately_rasterized_layers_sorted_per_pixel():
    """Three quads that cross one another (the front-most changes across the image), each drawn
    alone with zoo.render's rasterize, interpolate and texture (clamp, bilinear), sorted by depth
    per pixel and composited by a loop: the renderer must give the same image."""
    layers, tri, uv = quad_layers([0.0, 0.05, -0.05], [0.6, -0.5, 0.1])
    g = torch.Generator().manual_seed(1)
    tex = torch.rand(2, 3, 4, 16, 16, generator=g)  # two samples
    layers = layers.expand(2, -1, -1, -1).clone()
    layers[1, :, :, 1] += 0.2
    mvp = torch.stack([ortho()[0, 0], R.perspective(50, 1.0, 0.5, 10) @ R.look_at((0.5, 0.3, 2.5), (0, 0, 0))])
    mvp = mvp[None].expand(2, -1, -1, -1)  # two cameras per sample
    bg = torch.tensor([0.2, 0.4, 0.6])
    got = render_shells(layers, tri, uv, tri, tex, mvp, (24, 32), antialias=False, background=bg)
    for b in range(2):
        for c in range(2):
            frags = []
            for s in range(3):
                pos = R.transform(layers[b, s], mvp[b, c])[None]
                rast, _ = R.rasterize(pos, tri.int(), (24, 32), backend="torch")
                uvp, _ = R.interpolate(uv, rast, tri.int())
                rgba = R.texture(tex[b, s].permute(1, 2, 0)[None].contiguous(), uvp, filter_mode="linear",
                                 boundary_mode="clamp")
                hit = rast[..., 3] > 0
                frags.append((torch.where(hit, rast[..., 2], torch.full_like(rast[..., 2], math.inf)),
                              rgba * hit[..., None]))
            depth = torch.stack([d for d, _ in frags])[:, 0]  # [3, H, W]
            rgba = torch.stack([f for _, f in frags])[:, 0]  # [3, H, W, 4]
            order = depth.argsort(0)
            color, trans = torch.zeros(24, 32, 3), torch.ones(24, 32, 1)
            for k in range(3):
                layer = rgba.gather(0, order[k][None, ..., None].expand(1, -1, -1, 4))[0]
                color = color + trans * layer[..., 3:] * layer[..., :3]
                trans = trans * (1 - layer[..., 3:])
            want = torch.cat([color + trans * bg, 1 - trans], -1).flip(0)
            assert (depth[0] < math.inf).sum() > 100
            torch.testing.assert_close(got[b, c], want, atol=1e-5, rtol=0)
    # the crossing is real: which layer is in front changes across the image
    assert len(order[0].unique()) >= 2


def test_gradcheck_in_textures_and_vertex_positions():
    layers, tri, uv = quad_layers([0.0, -0.3], [0.3, -0.2], size=0.7, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    tex = torch.rand(1, 2, 4, 4, 4, generator=g, dtype=torch.float64) * 0.8 + 0.1
    mvp = ortho(dtype=torch.float64)
    layers = layers + 0.01 * torch.rand(layers.shape, generator=g, dtype=torch.float64)
    # keep pixel centres off the quads' diagonals: within 1/16 pixel of an edge, u, v are clamped
    # forward and differentiated unclamped (nvdiffrast's rule), which finite differences cannot see
    layers[..., 0] += 0.1

    def fn(t, v):
        return render_shells(v, tri, uv, tri, t, mvp, (6, 6))

    assert gradcheck(fn, (tex.clone().requires_grad_(), layers.clone().requires_grad_()), eps=1e-6, atol=1e-6)


def test_texture_fitting_through_the_renderer_reaches_the_target():
    """No GAN: fit five RGBA textures to 16 views (64x64) of the mannequin in a known procedural
    outfit (skin, clothes 0.025 m out, hair and a translucent skirt 0.05 m out) by Adam for 60
    steps (the issue allows 300); held-out views must reach PSNR >= 28 dB and alpha IoU >= 0.9."""
    from zoo.models.lsv.clothing import procedural_outfit

    torch.manual_seed(0)
    t = template_from_mannequin()
    shells = Shells(t.body, ShellConfig(), t.tips)(torch.zeros(1, 24, 3))["shells"]
    size = 64
    gt = procedural_outfit(t, size, seed=1)[None]
    assert 0.5 < float(gt[0, 0, 3].max()) and float(gt[0, 0, 3].mean()) < 0.5  # a partial outer layer

    def cams(n, start, elevation):
        return orbit_cameras(n, 2.9, elevation, 40.0, (0.0, 0.88, 0.0), start)

    train = torch.cat([cams(8, 0, 10), cams(8, 22.5, -10)])[None]
    test = torch.cat([cams(2, 45, 0), cams(2, 135, 20)])[None]

    def draw(tex, mvp):
        return render_shells(shells, t.body.faces, t.uv, t.uv_faces, tex, mvp, (64, 64))

    with torch.no_grad():
        target, held_out = draw(gt, train), draw(gt, test)
    logits = torch.zeros(1, 5, 4, size, size, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(60):
        loss = (draw(torch.sigmoid(logits), train) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = draw(torch.sigmoid(logits), test)
    psnr = 10 * torch.log10(1 / (pred[..., :3] - held_out[..., :3]).square().mean())
    a, b = pred[..., 3] > 0.5, held_out[..., 3] > 0.5
    iou = (a & b).sum() / (a | b).sum()
    assert psnr >= 28 and iou >= 0.9, (float(psnr), float(iou))


def test_bad_inputs_are_render_errors():
    layers, tri, uv = quad_layers([0.0], [0.0])
    tex = torch.rand(1, 1, 4, 8, 8)
    with pytest.raises(RenderError, match="textures"):
        render_shells(layers, tri, uv, tri, tex[:, :, :3], ortho(), (8, 8))
    with pytest.raises(RenderError, match="mvp"):
        render_shells(layers, tri, uv, tri, tex, ortho()[0], (8, 8))
    with pytest.raises(RenderError, match="num_layers"):
        render_shells(layers, tri, uv, tri, tex, ortho(), (8, 8), num_layers=0)
    with pytest.raises(RenderError, match="num_views"):
        orbit_cameras(0)


def test_gradients_reach_the_pose():
    """Pose is fitted through the renderer: a knee angle recovered from two views by Adam."""
    torch.manual_seed(0)
    t = template_from_mannequin()
    shells = Shells(t.body, ShellConfig(), t.tips)
    tex = torch.rand(1, 5, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.25
    tex[:, 0, 3] = 1
    mvp = orbit_cameras(2, 3.0, 0.0)[None]

    def draw(angle):
        pose = torch.zeros(1, 24, 3).index_put((torch.tensor([0]), torch.tensor([4]), torch.tensor([0])),
                                               angle.reshape(1))
        return render_shells(shells(pose)["shells"], t.body.faces, t.uv, t.uv_faces, tex, mvp, (64, 64))

    with torch.no_grad():
        target = draw(torch.tensor(0.5))
    angle = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([angle], lr=0.05)
    for _ in range(40):
        loss = (draw(angle) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(float(angle) - 0.5) < 0.05, float(angle)


def test_the_layer_by_layer_path_nvdiffrast_takes_matches_the_fragment_path(monkeypatch):
    """On CUDA, nvdiffrast peels K dense layers; on the torch backend every fragment is
    composited sparsely. Run the dense path on the CPU (the torch peeler's rasterize_layers) and
    compare: equal with enough layers, and a shallow K drops what lies deeper."""
    import zoo.models.lsv.render as lsv_render

    class LayerByLayer(R.DepthPeeler):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.backend = "layer-by-layer"  # anything but "torch" takes the dense path

    t = template_from_mannequin()
    shells = Shells(t.body, ShellConfig(), t.tips)(torch.zeros(2, 24, 3))["shells"]
    tex = torch.rand(2, 5, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    mvp = orbit_cameras(2, 3.0, 10.0, start=60.0)[None].expand(2, -1, -1, -1)
    sparse = render_shells(shells, t.body.faces, t.uv, t.uv_faces, tex, mvp, (40, 40))
    monkeypatch.setattr(lsv_render, "DepthPeeler", LayerByLayer)
    dense = render_shells(shells, t.body.faces, t.uv, t.uv_faces, tex, mvp, (40, 40), num_layers=60)
    torch.testing.assert_close(dense, sparse, atol=1e-6, rtol=0)
    shallow = render_shells(shells, t.body.faces, t.uv, t.uv_faces, tex, mvp, (40, 40), num_layers=3)
    monkeypatch.undo()
    same = render_shells(shells, t.body.faces, t.uv, t.uv_faces, tex, mvp, (40, 40), num_layers=3)
    torch.testing.assert_close(shallow, same, atol=1e-6, rtol=0)
    assert (shallow - sparse).abs().max() > 0.01


@pytest.mark.skipif(not torch.cuda.is_available() or not R.nvdiffrast_available(),
                    reason="needs a CUDA GPU with nvdiffrast")
def test_nvdiffrast_renders_the_shells_like_the_torch_backend():
    """On a GPU: nvdiffrast's layer-by-layer path against the torch backend's fragments, on the
    posed mannequin (edge pixels may differ where the two rasterizers clip differently)."""
    t = template_from_mannequin()
    shells = Shells(t.body, ShellConfig(), t.tips)(torch.zeros(2, 24, 3))["shells"].cuda()
    tex = torch.rand(2, 5, 4, 32, 32, generator=torch.Generator().manual_seed(6)).cuda()
    mvp = orbit_cameras(2, 3.0, 10.0)[None].expand(2, -1, -1, -1).cuda()
    args = (shells, t.body.faces.cuda(), t.uv.cuda(), t.uv_faces.cuda(), tex, mvp, (96, 96))
    ours = render_shells(*args, backend="torch", antialias=False)
    theirs = render_shells(*args, num_layers=60, backend="nvdiffrast", antialias=False)
    close = ((ours - theirs).abs().amax(-1) < 1e-4).float().mean()
    assert close > 0.995, float(close)
