"""EfficientFormer L1/L3/L7 and V2 S0/S1/S2/L: same weights in, same outputs out as timm;
official layouts; deploy form; other input sizes; export."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo
from zoo.models.layers import bias_index
from tests.helpers import load_in_both_layouts, official_downsample_index, to_official
from torch.utils._python_dispatch import TorchDispatchMode
from zoo.testing import randomize_, rel_err

V1 = ["efficientformer_l1", "efficientformer_l3", "efficientformer_l7"]
V2 = ["efficientformerv2_s0", "efficientformerv2_s1", "efficientformerv2_s2", "efficientformerv2_l"]
ALL = V1 + V2
# Every model of a generation converts through the same code: the smallest of each (L1, S0) is
# exported in the default run, the others with `-m slow`.
EXPORTED = [n if n in ("efficientformer_l1", "efficientformerv2_s0") else pytest.param(n, marks=pytest.mark.slow)
            for n in ALL]

# The papers' tables (arXiv 2206.01191 Table 1, 2212.08059 Table 2): params (M), GMACs.
PAPER = {
    "efficientformer_l1": (12.3, 1.3), "efficientformer_l3": (31.4, 3.9), "efficientformer_l7": (82.2, 10.2),
    "efficientformerv2_s0": (3.6, 0.40), "efficientformerv2_s1": (6.2, 0.65),
    "efficientformerv2_s2": (12.7, 1.25), "efficientformerv2_l": (26.3, 2.56),
}


@pytest.fixture(scope="module")
def timm_models():
    """Each variant in timm with random weights, BN statistics, layer scales and attention biases."""
    return {n: randomize_(timm.create_model(n).eval(), seed=i, scale=0.1) for i, n in enumerate(ALL)}


def test_official_layout_keys_match_the_official_module_trees(timm_models):
    v1 = set(to_official("efficientformer_l1", timm_models["efficientformer_l1"].state_dict())["model"])
    # Read off models/efficientformer.py: stem Sequential, network ModuleList (stages and Embeddings),
    # L1's last stage = 3 Meta4D, Flat (index 3), 1 Meta3D (index 4).
    for k in ["patch_embed.0.weight", "patch_embed.4.running_mean", "network.0.0.mlp.fc1.weight",
              "network.0.0.mlp.norm2.weight", "network.0.0.layer_scale_1", "network.1.proj.weight",
              "network.1.norm.running_var", "network.6.4.token_mixer.qkv.weight",
              "network.6.4.token_mixer.attention_bias_idxs", "network.6.4.norm1.weight", "network.6.4.mlp.fc2.bias",
              "network.6.4.layer_scale_2", "dist_head.bias", "norm.weight"]:
        assert k in v1, k
    v2 = set(to_official("efficientformerv2_s0", timm_models["efficientformerv2_s0"].state_dict())["model"])
    # Read off models/efficientformer_v2.py (S0: stage 3 has 6 blocks, the last 2 with attention).
    for k in ["patch_embed.0.weight", "patch_embed.1.running_var", "network.0.0.mlp.fc1.weight",
              "network.0.0.mlp.mid_norm.running_var", "network.0.0.layer_scale_2", "network.1.proj.weight",
              "network.1.norm.bias", "network.4.5.token_mixer.stride_conv.0.weight",
              "network.4.5.token_mixer.talking_head1.weight", "network.4.5.token_mixer.proj.1.weight",
              "network.4.5.token_mixer.attention_bias_idxs", "network.4.5.layer_scale_1",
              "network.5.attn.q.local.0.weight", "network.5.attn.q.proj.1.running_mean", "network.5.conv.weight",
              "network.5.bn.weight", "network.5.attn.proj.2.bias", "network.6.3.token_mixer.v_local.1.weight",
              "dist_head.weight", "norm.running_var"]:
        assert k in v2, k
    assert "network.4.3.token_mixer.q.0.weight" not in v2  # block 3 of 6 has no attention


def test_downsample_bias_index_matches_the_official_construction():
    for res in (1, 4, 7, 8, 14, 15):
        assert torch.equal(bias_index(res, query_stride=2), official_downsample_index(res))


@pytest.mark.parametrize("name", ALL)
def test_same_weights_same_outputs_as_timm_in_both_layouts_and_deployed(name, timm_models, tmp_path):
    ref = timm_models[name]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
    for path, model in load_in_both_layouts(name, ref, tmp_path):
        with torch.no_grad():
            assert rel_err(model(x), expected) < 1e-5, path.name
    deployed = zoo.export.reparameterize(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    assert not any(n.endswith("attention_biases") for n, _ in deployed.named_parameters())
    with torch.inference_mode():
        assert rel_err(deployed(x), expected) < 1e-5
        assert rel_err(deployed(x[:1]), expected[:1]) < 1e-5
    # With autograd recording: plain convs, no in-place writes (what tracing and export see too),
    # and gradients reach the input.
    xg = x.clone().requires_grad_(True)
    out = deployed(xg)
    assert rel_err(out.detach(), expected) < 1e-5
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_params_and_macs_within_2_percent_of_the_paper(name):
    cx = zoo.complexity(name)
    params, gmacs = PAPER[name]
    assert abs(cx["params"] / 1e6 - params) / params < 0.02
    assert abs(cx["macs"] / 1e9 - gmacs) / gmacs < 0.02
    assert cx["params"] == sum(p.numel() for p in zoo.create_model(name).parameters())


@pytest.mark.parametrize("name, tables", [
    # (module path, heads, grid at 224, grid at 256)
    ("efficientformer_l1", [("stages.3.blocks.4.token_mixer", 8, 7, 8)]),
    ("efficientformerv2_s0", [("stages.2.blocks.5.token_mixer", 8, 7, 8), ("stages.3.downsample.attn", 8, 14, 16),
                              ("stages.3.blocks.3.token_mixer", 8, 7, 8)]),
])
def test_weights_at_224_load_into_a_256_model_with_bicubic_resized_tables(name, tables, timm_models, tmp_path):
    ref = timm_models[name]
    path = tmp_path / "w.pth"
    torch.save(to_official(name, ref.state_dict()), path)
    model = zoo.create_model(name, pretrained=str(path), img_size=256)
    for mod, heads, src, dst in tables:
        got = model.get_submodule(mod).attention_biases
        table = ref.get_submodule(mod).attention_biases.detach()
        assert table.shape == (heads, src * src) and got.shape == (heads, dst * dst)
        # The docstring's promise: the [heads, R, R] offset grid resized bicubically, align_corners=False,
        # no antialiasing, as the official detection backbone interpolates.
        expected = F.interpolate(table.view(1, heads, src, src), size=(dst, dst), mode="bicubic", align_corners=False)
        assert torch.allclose(got, expected.view(heads, -1), atol=1e-6)
    # tables are not the only state that moves: everything else is copied as it is
    assert torch.equal(model.stem.state_dict()[next(iter(model.stem.state_dict()))],
                       ref.stem.state_dict()[next(iter(ref.stem.state_dict()))])
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    with torch.inference_mode():
        assert rel_err(zoo.export.reparameterize(model)(x), y) < 1e-5


def test_bad_sizes_and_configs_are_clear_errors():
    with pytest.raises(zoo.ConfigError, match="multiple of 32"):
        zoo.create_model("efficientformerv2_s0", img_size=240)  # stage 3 grid 15: stride-2 attention cannot undo
    with pytest.raises(zoo.ConfigError, match="img_size=256"):
        zoo.create_model("efficientformer_l1")(torch.randn(1, 3, 256, 256))
    with pytest.raises(zoo.ConfigError, match="num_vit"):
        zoo.create_model("efficientformer_l1", num_vit=5)
    with pytest.raises(zoo.ConfigError, match="MLP ratios"):
        zoo.create_model("efficientformerv2_s0", mlp_ratios=(4, 4, (4, 4), 4))


def test_sub_networks_from_the_same_classes():
    """Slimming builds sub-networks by arguments: widths, depths, num_vit, MLP ratios."""
    v1 = zoo.create_model("efficientformer_l1", depths=(1, 1, 2, 2), embed_dims=(16, 32, 48, 64), num_vit=2,
                          mlp_ratios=2.0, num_classes=5, img_size=128)
    assert v1(torch.randn(2, 3, 128, 128)).shape == (2, 5)
    assert sum(type(b).__name__ == "MetaBlock1d" for b in v1.stages[3].blocks) == 2
    v1_conv_only = zoo.create_model("efficientformer_l1", num_vit=0, num_classes=3)
    x = torch.randn(1, 3, 224, 224)
    assert v1_conv_only(x).shape == (1, 3)
    v2 = zoo.create_model("efficientformerv2_s0", depths=(1, 1, 3, 2), embed_dims=(16, 24, 32, 48), num_vit=1,
                          mlp_ratios=(2, 2, (2, 3, 4), (4, 2)), num_classes=4)
    assert v2(x).shape == (1, 4)
    assert [b.token_mixer is not None for b in v2.stages[2].blocks] == [False, False, True]
    for m in (v1, v1_conv_only, v2):
        randomize_(m, scale=0.1).eval()
        inp = torch.randn(1, 3, m.img_size, m.img_size)
        with torch.no_grad():
            ref = m(inp)
        with torch.inference_mode():
            assert rel_err(zoo.export.reparameterize(m)(inp), ref) < 1e-5


@pytest.mark.parametrize("name", ["efficientformer_l1", "efficientformerv2_s0"])
def test_timm_interface_distillation_and_training_parts(name):
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2

    model = zoo.create_model(name, num_classes=10, drop_path_rate=0.1)
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.95
    x = torch.randn(2, 3, 224, 224)
    head, dist = model.get_classifier()
    assert head.out_features == dist.out_features == 10
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    randomize_(model)
    model.train()
    model.set_distilled_training(True)
    cls, dst = model(x)
    assert cls.shape == dst.shape == (2, 10) and not torch.allclose(cls, dst)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), (model.head(model.forward_head(model.forward_features(x), True))
                                         + model.head_dist(model.forward_head(model.forward_features(x), True))) / 2)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    biases = [p for n, p in model.named_parameters() if n.endswith("attention_biases")]
    assert biases and all(id(p) in no_decay for p in biases)


@pytest.mark.parametrize("name", EXPORTED)
def test_onnx_export_matches_onnxruntime_with_dynamic_batch(name, tmp_path):
    model = randomize_(zoo.create_model(name), scale=0.1)
    report = zoo.export.to_onnx(model, tmp_path / f"{name}.onnx", verbose=False)
    assert report.inputs[0]["shape"][0] == "batch" and report.outputs[0]["shape"] == ["batch", 1000]
    assert [c.batch_size for c in report.comparisons] == [1, 3]
    assert all(c.rel_diff < 1e-4 for c in report.comparisons)


@pytest.mark.parametrize("name", EXPORTED)
def test_coreml_export(name, tmp_path):
    pytest.importorskip("coremltools")
    report = zoo.export.to_coreml(name, tmp_path / f"{name}.mlpackage", verbose=False)
    assert report.inputs[0]["kind"] == "image" and report.inputs[0]["shape"] == [224, 224]
    assert report.outputs[0]["shape"] == [1, 1000]
    ops = report.details["op_histogram"]
    assert {"conv", "softmax", "matmul"} <= set(ops)
    assert not any("cubic" in t for t in ops)  # bias tables are resized at load, never in the graph
    assert set(report.details["compute_op_dtypes"]) == {"FLOAT16"}


def test_meta4d_export_form_equals_the_eager_deploy_form_and_stays_in_nchwc(tmp_path):
    """Traced and exported, a deployed Meta4D block takes its export form (both mixer scales as
    1x1 depthwise convs); it computes what the eager form and the training form compute, and
    onnxruntime keeps every Meta4D block in its blocked layout (no reorder between the stem and
    the attention stage)."""
    model = randomize_(zoo.create_model("efficientformer_l1", img_size=64, num_classes=10), scale=0.1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        deployed = zoo.export.reparameterize(model)
        traced = torch.jit.trace(deployed, x)
        assert rel_err(deployed(x), y) < 1e-5 and rel_err(traced(x), y) < 1e-5
    graph_ops = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "aten::avg_pool2d" in graph_ops and "aten::addcmul" not in graph_ops  # the export form was traced
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    zoo.export.to_onnx(deployed, tmp_path / "l1.onnx", verbose=False)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "l1_opt.onnx")
    ort.InferenceSession(str(tmp_path / "l1.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [(n.op_type, n.domain) for n in onnx.load(str(tmp_path / "l1_opt.onnx")).graph.node]
    if not any(d == "com.microsoft.nchwc" for _, d in ops):
        pytest.skip("this CPU's onnxruntime has no NCHWc layout (no AVX2)")
    reorders = [i for i, (op, _) in enumerate(ops) if op in ("ReorderInput", "ReorderOutput")]
    assert len(reorders) <= 1  # once, out of the blocked layout, into the attention stage
    pools = [i for i, (op, d) in enumerate(ops) if op == "AveragePool"]
    assert pools and all(ops[i][1] == "com.microsoft.nchwc" for i in pools)
    assert not reorders or reorders[0] > pools[-1]


class Ops(TorchDispatchMode):
    """Records the name of every aten op dispatched while active (``names``)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_v2_ffn_deploy_path_fuses_its_gelus_and_residual_sum():
    """In eager CPU inference the deployed V2 FFN runs with no separate GELU or sum pass; the
    output is the training form's, and a hook on a GELU turns the fusion off for that FFN."""
    model = randomize_(zoo.create_model("efficientformerv2_s0", img_size=64, num_classes=10), scale=0.1)
    onednn = zoo.models.cpu_kernels.onednn_enabled()  # probes oneDNN now, not inside the recording
    x = torch.randn(1, 32, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model.stages[0].blocks[0](x)  # FFN only
        block = zoo.export.reparameterize(model).stages[0].blocks[0]
    with torch.inference_mode():
        with Ops() as ops:
            got = block(x)
    assert rel_err(got, y) < 1e-5
    if onednn:
        assert "_linear_pointwise.binary" in ops.names  # the residual sum, fused
        assert not any(n.startswith(("gelu", "add")) for n in ops.names), ops.names
        block.mlp.fc1[1].register_forward_hook(lambda *a: None)
        with torch.inference_mode():
            with Ops() as ops:
                assert rel_err(block(x), y) < 1e-5
        assert any(n.startswith("gelu") for n in ops.names)


def test_v2_attention_deploy_path_runs_on_token_rows():
    """In eager CPU inference the deployed V2 attentions (stride-2 with upsampling, full
    resolution, downsampling) run on token rows: the output is the training form's, the
    residual sum is fused into the output projection (no separate add of two maps), no
    bilinear upsampling of an NCHW map through two products is left, and a hook inside the
    attention turns the path off for that module (the hook then fires)."""
    model = randomize_(zoo.create_model("efficientformerv2_s0", num_classes=10), scale=0.1).eval()
    onednn = zoo.models.cpu_kernels.onednn_enabled()
    g = torch.Generator().manual_seed(0)
    cases = {  # name: (module, its input)
        "stride-2 attention": (lambda m: m.stages[2].blocks[4], torch.randn(2, 96, 14, 14, generator=g)),
        "attention": (lambda m: m.stages[3].blocks[3], torch.randn(2, 176, 7, 7, generator=g)),
        "downsampling attention": (lambda m: m.stages[3].downsample, torch.randn(2, 96, 14, 14, generator=g)),
    }
    with torch.no_grad():
        expected = {k: get(model)(x) for k, (get, x) in cases.items()}
        deployed = zoo.export.reparameterize(model)
    for name, (get, x) in cases.items():
        module = get(deployed)
        for batch in (x[:1], x):
            xs = batch.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), Ops() as ops:
                got = module(xs)
            assert rel_err(got, expected[name][: len(batch)]) < 1e-5, name
            if onednn:
                assert ("upsample_bilinear2d.vec" in ops.names) == name.startswith("stride-2"), name
                assert "_linear_pointwise.binary" in ops.names, name  # the residual sum, fused
                assert "add.Tensor" not in ops.names, name
    if onednn:
        attn = deployed.stages[2].blocks[4].token_mixer
        calls = []
        attn.act.register_forward_hook(lambda *a: calls.append(1))
        x = cases["stride-2 attention"][1]
        with torch.inference_mode(), Ops() as ops:
            assert rel_err(deployed.stages[2].blocks[4](x), expected["stride-2 attention"]) < 1e-5
        assert calls and "upsample_bilinear2d.vec" not in ops.names  # the module path: two products instead
