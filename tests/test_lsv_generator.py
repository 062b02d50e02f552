"""The RGBA texture generator: fused and non-fused modulated convolution, truncation, style
mixing, export."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.errors import ConfigError
from zoo.models.lsv import GeneratorConfig, ModulatedConv2d, TextureGenerator
from zoo.models.lsv.generator import upsample2d, _lowpass

SMALL = GeneratorConfig(num_layers=5, resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=256,
                        channel_max=32)


def test_fused_and_non_fused_modulated_convolutions_agree_with_the_formula():
    torch.manual_seed(0)
    for up in (False, True):
        conv = ModulatedConv2d(6, 5, 8, 3, up=up)
        x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 8)
        a, b = conv(x, w, fused=True), conv(x, w, fused=False)
        assert a.shape == (3, 5, 16 if up else 8, 16 if up else 8)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        if not up:  # the paper's equations, per sample, written out
            s = conv.affine(w) * conv.weight_gain
            for i in range(3):
                wt = conv.weight * s[i][None, :, None, None]
                wt = wt / wt.square().sum((1, 2, 3), keepdim=True).add(1e-8).sqrt()
                torch.testing.assert_close(a[i], F.conv2d(x[i:i + 1], wt, padding=1)[0], atol=1e-5, rtol=0)


def test_upsampling_is_zero_insertion_then_the_filter():
    x = torch.randn(2, 3, 5, 4)
    f = _lowpass()
    stuffed = torch.zeros(2, 3, 10, 8)
    stuffed[..., ::2, ::2] = x
    want = F.conv2d(F.pad(stuffed, (2, 1, 2, 1)), (4 * f)[None, None].expand(3, 1, 4, 4), groups=3)
    torch.testing.assert_close(upsample2d(x, f), want, atol=1e-6, rtol=0)
    const = upsample2d(torch.full((1, 2, 4, 4), 3.0), f)
    torch.testing.assert_close(const[..., 2:-2, 2:-2], torch.full((1, 2, 4, 4), 3.0))


def test_generator_shapes_range_and_both_paths():
    torch.manual_seed(0)
    g = TextureGenerator(SMALL).eval()
    z = torch.randn(2, 16)
    a, b = g(z, fused=True), g(z, fused=False)
    assert a.shape == (2, 5, 4, 16, 16) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(a[0], a[1])
    assert torch.equal(g(z), g(z))  # const noise outside training: a seed gives one texture
    g.train()
    for m in g.modules():  # StyleGAN2 starts noise strengths at zero; give them some
        if hasattr(m, "noise_strength"):
            m.noise_strength.data.fill_(0.5)
    torch.manual_seed(1)
    r1 = g.synthesize(g.mapping(z))
    r2 = g.synthesize(g.mapping(z))
    assert not torch.equal(r1, r2)  # random noise while training
    assert g.num_ws == 2 * int(math.log2(16)) - 2


def test_truncation_pulls_styles_to_the_running_mean_and_mixing_swaps_later_styles():
    torch.manual_seed(0)
    g = TextureGenerator(SMALL)
    g.train()
    for _ in range(3):
        g(torch.randn(8, 16))  # updates w_avg
    assert g.mapping.w_avg.abs().sum() > 0
    g.eval()
    z = torch.randn(4, 16)
    ws = g.mapping(z, psi=0.0)
    torch.testing.assert_close(ws, g.mapping.w_avg.expand_as(ws))
    half = g.mapping(z, psi=0.5, truncation_cutoff=2)
    full = g.mapping(z)
    torch.testing.assert_close(half[:, :2], g.mapping.w_avg.lerp(full[:, :2], 0.5))
    torch.testing.assert_close(half[:, 2:], full[:, 2:])
    gen = torch.Generator().manual_seed(5)
    mixed = g.style_mixing(z, full, prob=1.0, generator=gen)
    same = (mixed == full).all(-1).all(0)  # per style index
    cut = int(same.logical_not().nonzero()[0])
    assert 1 <= cut < g.num_ws and same[:cut].all() and not same[cut:].any()
    assert torch.equal(g.style_mixing(z, full, prob=0.0), full)


@pytest.mark.parametrize("bad", [dict(resolution=24), dict(resolution=4), dict(num_layers=0)])
def test_bad_generator_configs(bad):
    with pytest.raises(ConfigError):
        TextureGenerator(GeneratorConfig(**{**SMALL.__dict__, **bad}))
    with pytest.raises(ConfigError, match="power of two"):
        zoo.create_model("lsv_mannequin", texture_size=100)


def test_texture_generator_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from zoo.export import to_onnx

    torch.manual_seed(0)
    model = zoo.create_model("lsv_mannequin", texture_size=16, z_dim=16, w_dim=16, mapping_layers=2,
                             channel_base=128, channel_max=16)
    report = to_onnx(model, tmp_path / "lsv.onnx", verbose=False)
    assert report.verified and [c.batch_size for c in report.comparisons] == [1, 3]
    assert report.outputs[0]["shape"] == ["batch", 5, 4, 16, 16]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "lsv.onnx"), providers=["CPUExecutionProvider"])
    z = torch.randn(2, 16)
    got = sess.run(None, {"z": z.numpy()})[0]
    np.testing.assert_allclose(got, model.eval()(z).detach().numpy(), atol=1e-4)


@pytest.mark.slow  # about 20 s of conversion at the card's size
def test_texture_generator_converts_to_coreml_at_the_cards_size(tmp_path):
    pytest.importorskip("coremltools")
    from zoo.export import to_coreml

    # the card's own size: a 128-pixel generator once made a rank-6 tensor that CoreML refuses
    r = to_coreml("lsv_mannequin", tmp_path / "lsv.mlpackage", verbose=False, image_input=False)
    ops = r.details["op_histogram"]
    assert "conv" in ops and "conv_transpose" in ops and r.outputs[0]["shape"] == [1, 5, 4, 128, 128]
    assert (tmp_path / "lsv.mlpackage").is_dir()
