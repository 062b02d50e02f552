"""Shared layers: deploy kernels, in-place deploy helpers and bias-table utilities."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import zoo.models.cpu_kernels as kernels
from zoo.models.cpu_kernels import (DeployConv2d, DeployGELU, DeployLinear, DeploySequential, add_, kernel_cache,
                                   use_deploy_kernels)
from zoo.models.layers import ChannelAffine, bias_index, resize_bias_tables
from zoo.testing import rel_err

needs_onednn = pytest.mark.skipif(not kernels.onednn_enabled(), reason="this PyTorch build has no oneDNN fused ops")


def _deploy_copy(layer: torch.nn.Module, cls: type) -> tuple[torch.nn.Module, torch.nn.Module]:
    ref = copy.deepcopy(layer).requires_grad_(False)
    fast = copy.deepcopy(layer).requires_grad_(False)
    fast.__class__ = cls
    return ref, fast


@pytest.mark.parametrize(
    "conv",
    [
        torch.nn.Conv2d(16, 48, 1),  # small 1x1: addmm
        torch.nn.Conv2d(96, 128, 1),  # 1x1 above onednn_matmul_min_macs at 14x14
        torch.nn.Conv2d(96, 128, 1, bias=False),
        torch.nn.Conv2d(16, 16, 5, padding=2, groups=16),
        torch.nn.Conv2d(32, 32, 3, padding=1, groups=32),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        torch.nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24),  # strided depthwise: oneDNN prepacked
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),  # dense stem-like conv: oneDNN prepacked
        torch.nn.Conv2d(8, 16, 3, padding=1, bias=False),
    ],
)
@pytest.mark.parametrize("shape", [(1, 7, 7), (3, 4, 4), (2, 14, 14), (1, 14, 14)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_deploy_conv_kernels_equal_conv2d(conv, shape, channels_last):
    b, h, w = shape
    ref, fast = _deploy_copy(conv, DeployConv2d)
    x = torch.randn(b, conv.in_channels, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert rel_err(fast(x), ref(x)) < 1e-5
    # derived weights are a cache: changing the weights must not serve stale results
    with torch.no_grad():
        fast.weight.mul_(-2.0)
        ref.weight.mul_(-2.0)
    with torch.inference_mode():
        assert rel_err(fast(x), ref(x)) < 1e-5
    assert not any("cache" in k for k in fast.state_dict())


ACTS = {"gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU(approximate="tanh"), "relu": torch.nn.ReLU()}


@pytest.mark.parametrize(
    "conv, shape",
    [
        (torch.nn.Conv2d(32, 128, 1), (1, 28, 28)),  # channels-last rows through oneDNN: act fused
        (torch.nn.Conv2d(96, 128, 1), (1, 14, 14)),  # W @ X at batch 1: act after
        (torch.nn.Conv2d(16, 48, 1), (2, 7, 7)),  # small 1x1: matmul, act after
        (torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), (1, 7, 7)),  # dense depthwise: act after
        (torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), (2, 14, 14)),  # oneDNN conv: act fused
        (torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), (1, 16, 16)),
    ],
)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_deploy_conv_forward_act_and_add_equal_conv_then_act_or_sum(conv, shape, act, channels_last):
    ref, fast = _deploy_copy(conv, DeployConv2d)
    b, h, w = shape
    x = torch.randn(b, conv.in_channels, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = ref(x)
        assert rel_err(fast.forward_act(x, act), ACTS[act](y)) < 1e-5
        add = torch.randn_like(y).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert rel_err(fast.forward_add(x, add), y + add) < 1e-5
    with torch.no_grad():  # outside inference too (stock ops, out of place): same function
        assert rel_err(fast.forward_act(x, act), ACTS[act](ref(x))) < 1e-5


@needs_onednn
def test_deploy_sequential_fuses_conv_activation_pairs_but_not_hooked_or_captured_ones(monkeypatch):
    seq = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(32, 8, 1),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1)).eval().requires_grad_(False)
    ref = copy.deepcopy(seq)
    use_deploy_kernels(seq)
    assert type(seq) is DeploySequential and seq.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(1, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    attrs = []
    real = kernels._Switch.conv

    def spy(*args):
        attrs.append(args[7])  # the fused post-op
        return real(*args)

    monkeypatch.setattr(kernels._Switch, "conv", spy)
    with torch.inference_mode():
        assert rel_err(seq(x), ref(x)) < 1e-5
    assert attrs and attrs[0] == "gelu"  # the 3x3 conv ran with GELU fused
    seen = []
    seq[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    attrs.clear()
    with torch.inference_mode():
        assert rel_err(seq(x), ref(x)) < 1e-5
    assert seen == [(1, 32, 20, 20)] and attrs[0] == "none"  # a hooked GELU is called, not fused
    traced = torch.jit.trace(seq, x)
    assert "aten::gelu" in {n.kind() for n in traced.inlined_graph.nodes()}


@needs_onednn
def test_deploy_conv_takes_the_onednn_paths_and_falls_back_outside_float32_inference(monkeypatch):
    dense = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    pointwise = torch.nn.Conv2d(96, 128, 1)
    calls = []
    real = kernels._Switch.linear

    def spy(*args):
        calls.append("matmul")
        return real(*args)

    for conv, x in ((dense, torch.randn(1, 8, 16, 16)), (pointwise, torch.randn(1, 96, 14, 14))):
        ref, fast = _deploy_copy(conv, DeployConv2d)
        with torch.inference_mode():
            if conv is pointwise:
                monkeypatch.setattr(kernels._Switch, "linear", spy)
            assert rel_err(fast(x), ref(x)) < 1e-5
            monkeypatch.undo()
        if conv is dense:
            assert [k[0] for k in kernel_cache(fast)] == ["conv"]
        else:
            assert calls == ["matmul"]
            # channels-last in: rows through the prepacked weight, channels-last out
            xcl = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                y = fast(xcl)
            assert y.is_contiguous(memory_format=torch.channels_last) and rel_err(y, ref(x)) < 1e-5
            assert [k[0] for k in kernel_cache(fast)] == ["rows"]
        # float64, and autograd through the weights: the stock convolution, nothing cached
        fresh = copy.deepcopy(fast)
        assert len(kernel_cache(fresh)) == 0
        with torch.inference_mode():
            assert rel_err(fresh.double()(x.double()), ref.double()(x.double())) < 1e-10
        fresh = copy.deepcopy(fast).float().requires_grad_(True)
        fresh(x).sum().backward()
        assert fresh.weight.grad is not None and len(kernel_cache(fresh)) == 0


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 48), (2, 49, 48), (1, 1, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_deploy_linear_equals_linear_and_copies_drop_the_prepacked_weight(shape, bias):
    ref, fast = _deploy_copy(torch.nn.Linear(48, 96, bias=bias), DeployLinear)
    x = torch.randn(shape)
    with torch.inference_mode():
        assert rel_err(fast(x), ref(x)) < 1e-5
    assert len(kernel_cache(fast)) == 1
    with torch.no_grad():
        fast.weight.mul_(0.5)
        ref.weight.mul_(0.5)
    with torch.inference_mode():
        assert rel_err(fast(x), ref(x)) < 1e-5
    # an opaque prepacked tensor cannot be copied or saved; the layer still can
    twin = copy.deepcopy(fast)
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.inference_mode():
        assert rel_err(twin(x), ref(x)) < 1e-5 and rel_err(loaded(x), ref(x)) < 1e-5
    # autograd: the plain forward, gradients flow to the weight
    fast.requires_grad_(True)
    fast(x).square().sum().backward()
    assert fast.weight.grad is not None


def test_deploy_gelu_and_residual_add_write_in_place_only_when_safe():
    gelu = DeployGELU()
    a = torch.randn(4, 8)
    expected = torch.nn.functional.gelu(a)
    with torch.inference_mode():
        b = a.clone()
        out = gelu(b)
        assert out.data_ptr() == b.data_ptr() and torch.equal(out, expected)  # the fresh buffer is reused
        r = torch.randn(4, 8)
        r_before = r.clone()
        s = add_(r, a)
        assert s.data_ptr() == r.data_ptr() and torch.equal(s, a + r_before)
    g = a.clone().requires_grad_(True)
    out = gelu(g)
    assert out.data_ptr() != g.data_ptr() and torch.allclose(out, expected)  # autograd keeps its input
    x = torch.randn(4, 8, requires_grad=True)
    branch = x * 2
    total = add_(branch, a)
    assert total.data_ptr() != branch.data_ptr() and torch.equal(total, a + branch)
    total.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_channel_affine_equals_eval_batchnorm():
    bn = torch.nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 5, 3, 3)
    assert torch.allclose(ChannelAffine.from_bn(bn)(x), bn(x), atol=1e-6)


def test_resize_bias_tables_only_touches_tables_that_differ():
    model = torch.nn.Module()
    model.register_parameter("attention_biases", torch.nn.Parameter(torch.zeros(2, 64)))
    model.register_parameter("other", torch.nn.Parameter(torch.zeros(2, 64)))
    src = torch.randn(2, 49)
    out = resize_bias_tables({"attention_biases": src, "other": src}, model, antialias=False)
    assert out["attention_biases"].shape == (2, 64)
    assert out["other"] is src  # not a bias table: left for the loader to report
    # a constant table stays constant (bicubic reproduces constants)
    const = resize_bias_tables({"attention_biases": torch.full((2, 49), 3.0)}, model, antialias=False)
    assert torch.allclose(const["attention_biases"], torch.full((2, 64), 3.0))
    assert bias_index(3).shape == (9, 9) and bias_index(4, query_stride=2).shape == (4, 16)


# --- channels-last inference (zoo.models.nhwc) -----------------------------------------


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


@needs_onednn
@pytest.mark.parametrize(
    "conv, size",
    [
        (torch.nn.Conv2d(16, 48, 1), 4),  # small product: addmm
        (torch.nn.Conv2d(96, 192, 1), 14),  # above onednn_rows_min_macs: prepacked oneDNN
        (torch.nn.Conv2d(96, 192, 1, bias=False), 14),
        (torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), 7),  # depthwise: oneDNN conv
        (torch.nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24), 14),
        (torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), 16),  # stem-like
    ],
)
@pytest.mark.parametrize("act, with_add", [("none", False), ("relu", False), ("none", True)])
def test_deploy_conv_nhwc_equals_conv_act_add(conv, size, act, with_add):
    ref, fast = _deploy_copy(conv, DeployConv2d)
    x = torch.randn(2, conv.in_channels, size, size)
    with torch.inference_mode():
        expected = ref(x)
        if act == "relu":
            expected = expected.relu()
        add = torch.randn_like(expected) if with_add else None
        if add is not None:
            expected = expected + add
        y = fast.forward_nhwc(_nhwc(x), act=act, add=None if add is None else _nhwc(add))
    assert y.is_contiguous() and y.shape == _nhwc(expected).shape
    assert rel_err(y, _nhwc(expected)) < 1e-5
    # one cached kernel, of the path the docstring names
    tags = [k[0] for k in kernel_cache(fast)]
    big_product = fast._is_pointwise() and 2 * size * size * fast.weight.numel() > fast.onednn_rows_min_macs
    assert tags == (["rows"] if big_product else [] if fast._is_pointwise() else ["conv"])
    # in-place edits reach the cached kernels
    with torch.no_grad():
        fast.weight.mul_(-0.5)
        ref.weight.mul_(-0.5)
    with torch.inference_mode():
        expected = ref(x).relu() if act == "relu" else ref(x)
        expected = expected + add if add is not None else expected
        assert rel_err(fast.forward_nhwc(_nhwc(x), act=act, add=None if add is None else _nhwc(add)), _nhwc(expected)) < 1e-5


@needs_onednn
def test_deploy_conv_nhwc_falls_back_to_its_forward_for_hooks_dtypes_and_autograd():
    ref, fast = _deploy_copy(torch.nn.Conv2d(32, 64, 1), DeployConv2d)
    x = torch.randn(1, 32, 8, 8)
    seen = []
    handle = fast.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    with torch.inference_mode():
        y = fast.forward_nhwc(_nhwc(x), act="relu")
    handle.remove()
    assert seen == [torch.Size([1, 32, 8, 8])], "the hook must fire, with the NCHW input it always sees"
    assert rel_err(y, _nhwc(ref(x).relu())) < 1e-5 and len(kernel_cache(fast)) == 0
    with torch.inference_mode():
        y64 = fast.double().forward_nhwc(_nhwc(x.double()))
    assert y64.dtype == torch.float64 and rel_err(y64, _nhwc(ref.double()(x.double()))) < 1e-10
    fast.float().requires_grad_(True)
    fast.forward_nhwc(_nhwc(x)).sum().backward()
    assert fast.weight.grad is not None
    with pytest.raises(ValueError, match="act"):
        fast.forward_nhwc(_nhwc(x), act="gelu")


@needs_onednn
def test_run_nhwc_fuses_sequences_and_residuals_and_falls_back_for_the_rest():
    from zoo.models.cpu_kernels import use_deploy_kernels
    from zoo.models.layers import Residual
    from zoo.models.nhwc import nhwc_applies, run_nhwc

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(8, 32, 3, padding=1),
        torch.nn.ReLU(),
        Residual(torch.nn.Sequential(torch.nn.Conv2d(32, 64, 1), torch.nn.ReLU(), torch.nn.Conv2d(64, 32, 1))),
        torch.nn.Identity(),
        torch.nn.GELU(),  # no channels-last form: its own forward on the NCHW view
        torch.nn.Conv2d(32, 16, 3, stride=2, padding=1),
    ).eval()
    x = torch.randn(2, 8, 12, 12)
    with torch.inference_mode():
        expected = net(x)
        use_deploy_kernels(net.requires_grad_(False))
        assert nhwc_applies(x) and not nhwc_applies(x.double())
        y = run_nhwc(net, x.permute(0, 2, 3, 1))
        assert rel_err(y, _nhwc(expected)) < 1e-5
        # a hook anywhere is honoured: on the whole residual, and on a fused ReLU
        calls = []
        h1 = net[2].register_forward_hook(lambda *a: calls.append("residual"))
        h2 = net[1].register_forward_hook(lambda *a: calls.append("relu"))
        y = run_nhwc(net, x.permute(0, 2, 3, 1))
        h1.remove(), h2.remove()
    assert calls == ["relu", "residual"] and rel_err(y, _nhwc(expected)) < 1e-5
    glob = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not nhwc_applies(x)
    finally:
        glob.remove()
