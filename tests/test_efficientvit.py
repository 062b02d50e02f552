"""EfficientViT M0-M5: same weights in, same outputs out as timm; official layout; deploy form."""
from __future__ import annotations

import pytest
import timm
import torch

import zoo
from tests.helpers import efficientvit_to_official, load_in_both_layouts, official_index
from zoo.testing import randomize_, rel_err
from zoo.models.layers import bias_index

VARIANTS = [f"m{i}" for i in range(6)]

# The paper's table (arXiv 2305.07027, Table 1): params (M), MMACs.
PAPER = {"m0": (2.3, 79), "m1": (3.0, 167), "m2": (4.2, 201), "m3": (6.9, 263), "m4": (8.8, 299), "m5": (12.4, 522)}


@pytest.fixture(scope="module")
def timm_models():
    """Each variant in timm with random weights, BN statistics and attention biases."""
    return {v: randomize_(timm.create_model(f"efficientvit_{v}").eval(), seed=i) for i, v in enumerate(VARIANTS)}


def test_official_layout_keys_match_the_official_module_tree(timm_models):
    keys = set(efficientvit_to_official(timm_models["m0"].state_dict())["model"])
    # Names read off the official model definition (Sequential indices, Conv2d_BN 'c'/'bn', BN_Linear 'l').
    for k in [
        "patch_embed.0.c.weight", "patch_embed.6.bn.running_var", "blocks1.0.dw0.m.c.weight",
        "blocks1.0.mixer.m.attn.qkvs.3.c.weight", "blocks1.0.mixer.m.attn.attention_biases",
        "blocks1.0.mixer.m.attn.attention_bias_idxs", "blocks2.0.0.m.c.weight", "blocks2.0.1.m.pw1.c.weight",
        "blocks2.1.conv1.c.weight", "blocks2.1.se.fc1.weight", "blocks2.2.1.m.pw2.bn.weight",
        "blocks2.3.ffn1.m.pw2.c.weight", "blocks3.1.conv3.bn.bias", "head.bn.weight", "head.l.weight",
    ]:
        assert k in keys, k


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_weights_same_outputs_as_timm(variant, timm_models, tmp_path):
    ref = timm_models[variant]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
    for path, model in load_in_both_layouts(f"efficientvit_{variant}", ref, tmp_path):
        assert model.pretrained_cfg["tag"] == str(path)
        with torch.no_grad():
            assert rel_err(model(x), expected) < 1e-5, path.name
        deployed = zoo.export.reparameterize(model)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
        with torch.inference_mode():
            assert rel_err(deployed(x), expected) < 1e-5
            assert rel_err(deployed(x[:1]), expected[:1]) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_params_and_macs_within_2_percent_of_the_paper(variant):
    cx = zoo.complexity(f"efficientvit_{variant}")
    params, mmacs = PAPER[variant]
    # Within 2%, or equal once rounded as the table rounds (0.1M params): M0 has 2.349M,
    # printed as 2.3M, which is 2.1% off the printed figure.
    assert abs(cx["params"] / 1e6 - params) / params < 0.02 or round(cx["params"] / 1e6, 1) == params
    assert abs(cx["macs"] / 1e6 - mmacs) / mmacs < 0.02
    model = zoo.create_model(f"efficientvit_{variant}")
    assert cx["params"] == sum(p.numel() for p in model.parameters())


def test_bias_index_matches_the_official_construction():
    for res in (1, 4, 7, 9):
        assert torch.equal(bias_index(res), official_index(res))


def test_deploy_form_drops_bias_tables_and_keeps_outputs_in_grad_mode_too():
    model = randomize_(zoo.create_model("efficientvit_m1", img_size=128))
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        ref = model(x)
    deployed = zoo.export.reparameterize(model)
    assert model.training is False and not model.deployed, "reparameterize() must copy by default"
    names = dict(deployed.named_parameters())
    assert not any("attention_biases" in n for n in names)
    assert any("attention_bias_dense" in n for n, _ in deployed.named_buffers())
    assert rel_err(deployed(x), ref) < 1e-5  # autograd on: the plain conv path
    with torch.inference_mode():
        assert rel_err(deployed(x), ref) < 1e-5  # the eager CPU kernels


@pytest.mark.parametrize("batch", [1, 4])
def test_deploy_attention_on_token_rows_equals_the_module_path(batch, monkeypatch):
    from zoo.models.efficientvit import CascadedGroupAttention

    model = zoo.export.reparameterize(randomize_(zoo.create_model("efficientvit_m0")))
    for attn, r in ((model.stages[0].blocks[0].mixer.m.attn, 7), (model.stages[2].blocks[0].mixer.m.attn, 4)):
        c = attn.num_heads * attn.val_dim
        x = torch.randn(batch, c, r, r)
        rows = x.permute(0, 2, 3, 1).reshape(batch, r * r, c)
        with torch.inference_mode():
            fast = attn.forward_windows(rows)
            fast_plus = attn.forward_windows(rows, rows)
            monkeypatch.setattr(CascadedGroupAttention, "forward_windows", lambda self, t, add=None: None)
            slow = attn(x)
            monkeypatch.undo()
        slow_rows = slow.permute(0, 2, 3, 1).reshape(rows.shape)
        assert fast is not None and rel_err(fast, slow_rows) < 1e-5
        assert rel_err(fast_plus, slow_rows + rows) < 1e-5
        # a window too large for the dense query matrices: no fast form, the module path serves
        monkeypatch.setattr(type(attn.dws[0]), "dense_max_tokens", 8)
        with torch.inference_mode():
            assert attn.forward_windows(rows) is None and rel_err(attn(x), slow) < 1e-5
        monkeypatch.undo()


def _module_path(model, x, monkeypatch):
    """`model(x)` with the channels-last path switched off (the modules' own deploy forwards)."""
    import zoo.models.efficientvit as ev

    monkeypatch.setattr(ev, "nhwc_applies", lambda t: False)
    try:
        return model(x)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("img_size, batch", [(224, 1), (256, 2)])
def test_channels_last_inference_path_is_taken_and_equals_the_module_path(img_size, batch, monkeypatch):
    """Eager CPU inference of the deploy form runs `zoo.models.nhwc` (at 256 the 16x16 grid pads
    its 7x7 windows); it must give the module path's outputs and never fall back."""
    import zoo.models.efficientvit as ev
    import zoo.models.cpu_kernels as kernels
    import zoo.models.nhwc as nhwc
    from zoo.models.efficientvit import CascadedGroupAttention

    model = randomize_(zoo.create_model("efficientvit_m1", img_size=img_size)).eval()
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.no_grad():
        ref = model(x)
    deployed = zoo.export.reparameterize(model)
    windows, fallbacks = [], []
    real_windows, real_fallback = CascadedGroupAttention.forward_windows, nhwc.nchw_fallback
    monkeypatch.setattr(CascadedGroupAttention, "forward_windows",
                        lambda self, t, add=None: windows.append(t.shape[0]) or real_windows(self, t, add))
    for module in (nhwc, ev, kernels):
        monkeypatch.setattr(module, "nchw_fallback", lambda *a, **k: fallbacks.append(a[0]) or real_fallback(*a, **k))
    with torch.inference_mode():
        fast = deployed(x)
    monkeypatch.undo()
    per_image = ((img_size // 16 + 6) // 7) ** 2  # stage 1's 7x7 windows
    assert windows and windows[0] == batch * per_image and not fallbacks
    assert len(windows) == sum(len(s.blocks) for s in deployed.stages)
    with torch.inference_mode():
        slow = _module_path(deployed, x, monkeypatch)
    assert rel_err(fast, slow) < 1e-5 and rel_err(fast, ref) < 1e-5
    with torch.inference_mode():
        f = deployed.forward_features(x)
    assert f.shape == (batch, 192, deployed.feature_resolution, deployed.feature_resolution)


def test_deploy_form_with_trainable_weights_gives_gradients():
    """Weights set trainable again after deploy: every fused unit falls back to autograd-safe ops."""
    model = randomize_(zoo.create_model("efficientvit_m0", img_size=128)).eval()
    deployed = zoo.export.reparameterize(model).requires_grad_(True)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref = model(x)
    out = deployed(x)
    assert rel_err(out, ref) < 1e-5 and out.requires_grad
    out.square().sum().backward()
    grads = [p.grad for p in deployed.parameters()]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)


def test_channels_last_inference_honours_hooks_and_weight_edits(monkeypatch):
    model = zoo.export.reparameterize(randomize_(zoo.create_model("efficientvit_m0")))
    twin = zoo.export.reparameterize(randomize_(zoo.create_model("efficientvit_m0")))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        ref = model(x)
    # hooks inside the fused units fire, with the NCHW tensors the module path gives them
    seen = []
    blk = model.stages[1].blocks[0]
    handles = [
        blk.mixer.m.attn.qkvs[1].register_forward_hook(lambda m, a, out: seen.append(("qkv", tuple(out.shape)))),
        blk.ffn0.m.act.register_forward_hook(lambda m, a, out: seen.append(("act", tuple(out.shape)))),
        model.stages[2].downsample.patchmerge.se.register_forward_pre_hook(lambda m, a: seen.append(("se", tuple(a[0].shape)))),
    ]
    with torch.inference_mode():
        hooked_out = model(x)
    for h in handles:
        h.remove()
    assert sorted(seen) == [("act", (1, 256, 7, 7)), ("qkv", (1, 64, 7, 7)), ("se", (1, 512, 4, 4))]
    assert rel_err(hooked_out, ref) < 1e-5
    # edits after a fast run: in place, a new Parameter, a replaced layer
    with torch.inference_mode():
        assert rel_err(model(x), ref) < 1e-5
    with torch.no_grad():
        model.stages[2].blocks[0].ffn0.m.pw1.weight.mul_(0.5)
        model.stages[1].blocks[0].mixer.m.attn.dws[0].weight.mul_(-1.0)
        model.stages[0].blocks[0].mixer.m.attn.proj[1].weight = torch.nn.Parameter(
            model.stages[0].blocks[0].mixer.m.attn.proj[1].weight * 2, requires_grad=False)
    model.stages[1].blocks[0].dw0 = twin.stages[1].blocks[0].dw0
    with torch.inference_mode():
        edited = model(x)
        expected = _module_path(model, x, monkeypatch)
    assert rel_err(edited, ref) > 1e-3 and rel_err(edited, expected) < 1e-5


def test_img_size_256_pads_windows_and_wrong_sizes_are_clear_errors():
    model = zoo.create_model("efficientvit_m0", img_size=256)
    attn = model.stages[0].blocks[0].mixer.m
    assert (attn.resolution, attn.pad, attn.num_windows) == (16, 5, 3)
    assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)
    with pytest.raises(zoo.ConfigError, match="img_size=224"):
        model(torch.randn(1, 3, 224, 224))
    with pytest.raises(zoo.ConfigError, match="multiple of 16"):
        zoo.create_model("efficientvit_m0", img_size=200)


def test_window_attention_equals_attention_per_padded_window():
    """Partitioning by hand (pad, split into 7x7 windows, attend, stitch) gives the same result."""
    model = randomize_(zoo.create_model("efficientvit_m0", img_size=256))
    lwa = model.stages[0].blocks[0].mixer.m
    x = torch.randn(2, 64, 16, 16)
    padded = torch.nn.functional.pad(x, (0, 5, 0, 5))
    out = torch.zeros_like(padded)
    with torch.no_grad():
        for i in range(3):
            for j in range(3):
                win = padded[:, :, 7 * i: 7 * i + 7, 7 * j: 7 * j + 7]
                out[:, :, 7 * i: 7 * i + 7, 7 * j: 7 * j + 7] = lwa.attn(win)
        assert rel_err(lwa(x), out[:, :, :16, :16]) < 1e-6


def test_weights_at_224_load_into_a_384_model_with_resized_bias_tables(timm_models, tmp_path):
    ref = timm_models["m0"]
    path = tmp_path / "m0.pth"
    torch.save(ref.state_dict(), path)
    model = zoo.create_model("efficientvit_m0", pretrained=str(path), img_size=384)
    # stage 3: grid 6 at 384 (4 at 224), so its bias tables go from 4x4 to 6x6 offsets
    table = model.stages[2].blocks[0].mixer.m.attn.attention_biases
    assert table.shape == (4, 36)
    src = ref.stages[2].blocks[0].mixer.m.attn.attention_biases.detach()
    resized = torch.nn.functional.interpolate(src.view(1, 4, 4, 4), size=(6, 6), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(table, resized.view(4, 36), atol=1e-6)
    # tables whose window did not change are copied as they are
    assert torch.equal(model.stages[0].blocks[0].mixer.m.attn.attention_biases, ref.stages[0].blocks[0].mixer.m.attn.attention_biases)
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_timm_interface_and_timm_training_parts_work_unchanged():
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2

    model = zoo.create_model("efficientvit_m0", num_classes=10, drop_path_rate=0.1)
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406)
    x = torch.randn(2, 3, 224, 224)
    feats = model.forward_features(x)
    assert feats.shape == (2, 192, 4, 4) and model.num_features == 192
    assert model.forward_head(feats, pre_logits=True).shape == (2, 192)
    assert model(x).shape == (2, 10) and model.get_classifier().out_features == 10
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    biases = model.stages[0].blocks[0].mixer.m.attn.attention_biases
    assert id(biases) in no_decay
    # drop path: stochastic in training, deterministic in eval (random weights: at init the
    # residual branches are zero, which would hide it)
    randomize_(model)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(x), model(x))


# dynamo with a dynamic batch is also what `zoo export` runs in test_cli; here it is slow-only
@pytest.mark.parametrize("exporter,opset", [("torchscript", 17), pytest.param("dynamo", 18, marks=pytest.mark.slow)])
def test_onnx_export_both_exporters_dynamic_batch(exporter, opset, tmp_path):
    model = randomize_(zoo.create_model("efficientvit_m0"))
    report = zoo.export.to_onnx(model, tmp_path / "m0.onnx", exporter=exporter, opset=opset, verbose=False)
    assert report.details["opset"] == opset and report.inputs[0]["shape"] == ["batch", 3, 224, 224]
    assert [c.batch_size for c in report.comparisons] == [1, 3]
    assert all(c.rel_diff < 1e-4 for c in report.comparisons)


def test_coreml_export_structure():
    pytest.importorskip("coremltools")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        report = zoo.export.to_coreml("efficientvit_m0", f"{d}/m0.mlpackage", verbose=False)
    assert report.inputs[0]["kind"] == "image" and report.outputs[0]["shape"] == [1, 1000]
    hist = report.details["op_histogram"]
    assert {"conv", "softmax", "matmul"} <= set(hist)
    assert not any("batch_norm" in t for t in hist)  # the deploy form went in

