"""zoo.export.reparameterize: the model's own method, or the generic Conv-BN fold."""
from __future__ import annotations

import torch
import torch.nn as nn

import zoo
from zoo.testing import randomize_, rel_err


def test_generic_fallback_folds_adjacent_conv_bn_only():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)),
        nn.BatchNorm2d(8),  # follows a BN, not a conv: must stay
    )
    randomize_(model).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
        deployed = zoo.export.reparameterize(model)
        out = deployed(x)
    assert rel_err(out, ref) < 1e-5
    bns = [m for m in deployed.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 and bns[0] is deployed[4]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3, "the input model must be left as it was"


def test_model_method_is_used_and_inplace_option():
    model = zoo.create_model("efficientvit_m0", img_size=64)
    same = zoo.export.reparameterize(model, inplace=True)
    assert same is model and model.deployed
