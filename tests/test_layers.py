"""Shared layers: in-place deploy helpers and bias-table utilities."""
from __future__ import annotations

import torch

from zoo.models.layers import ChannelAffine, DeployGELU, add_, bias_index, resize_bias_tables


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
