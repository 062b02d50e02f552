"""Registry: listing, filtering, building every model, cards, computed complexity, errors."""
from __future__ import annotations

import json

import pytest
import torch

import zoo
from zoo import flops as complexity_mod


def test_list_and_filter():
    names = zoo.list_models()
    assert names == sorted(names) and len(names) >= 6
    assert zoo.list_models("efficientvit_m[0-2]") == ["efficientvit_m0", "efficientvit_m1", "efficientvit_m2"]
    assert set(zoo.list_models(task="image-classification")) >= set(zoo.list_models("efficientvit_*"))
    assert zoo.list_models(task="no-such-task") == []
    assert zoo.list_models("nothing*") == []


# pathfusion_kitti runs a dilated ResNet-50 on a full KITTI image (about 390 GMACs with its
# sparse stages): its forward runs with -m slow; the tiny fusion model covers the code path.
HEAVY = ("pathfusion_kitti",)
# lsv_smpl needs the user's SMPL file (tests/test_lsv_files.py builds it from an SMPL-format one)
NEEDS_USER_FILE = ("lsv_smpl",)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
                                  for n in zoo.list_models()])
def test_every_registered_model_builds_and_runs(name):
    card = zoo.model_card(name)
    if name in NEEDS_USER_FILE:
        with pytest.raises(zoo.errors.MissingAssetError, match="ZOO_SMPL_MODEL"):
            zoo.create_model(name)
        return
    model = zoo.create_model(name)
    assert not model.training
    assert model.pretrained_cfg["architecture"] == name
    inputs = card.input.example(batch_size=2)  # a completion model takes two tensors
    with torch.no_grad():
        y = model(*inputs)
    if card.input.kind in ("lidar-points", "lidar-camera"):  # a detector: one box set per sample
        assert len(y["final_box_dicts"]) == 2
        assert all(torch.isfinite(d["pred_boxes"]).all() and d["pred_boxes"].shape[1] == 7 for d in y["final_box_dicts"])
        return
    assert y.shape[0] == 2 and torch.isfinite(y).all()


def test_unknown_name_lists_the_closest():
    with pytest.raises(zoo.UnknownModelError) as e:
        zoo.create_model("efficientvit_m9")
    assert "efficientvit_m" in str(e.value) and "zoo list" in str(e.value)
    with pytest.raises(zoo.ZooError, match="efficientvit_m0"):
        zoo.model_card("efficentvit_m0")


def test_bad_override_names_the_valid_ones():
    with pytest.raises(zoo.ConfigError) as e:
        zoo.create_model("efficientvit_m0", num_clases=10)
    msg = str(e.value)
    assert "num_clases" in msg and "num_classes" in msg and "img_size" in msg and "drop_path_rate" in msg


def test_override_changes_the_model():
    model = zoo.create_model("efficientvit_m0", num_classes=7, img_size=160)
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, 7)
    assert model.pretrained_cfg["input_size"] == (3, 160, 160)


def test_card_contents():
    card = zoo.model_card("efficientvit_m3")
    d = card.to_dict()
    assert d["family"] == "efficientvit" and d["task"] == "image-classification"
    assert d["paper"]["arxiv"] == "2305.07027"
    assert d["config"]["embed_dim"] == [128, 240, 320]
    assert d["input"]["shape"] == (3, 224, 224) and d["input"]["mean"] == (0.485, 0.456, 0.406)
    assert d["metrics"]["imagenet_top1"]["value"] == 73.4 and "Table" in d["metrics"]["imagenet_top1"]["source"]
    assert {w["layout"] for w in d["weights"].values()} == {"timm", "official"}
    assert d["default_weights"] == "r224_in1k"
    json.dumps(d)  # serialisable for `zoo info`


def test_complexity_is_computed_then_cached(zoo_home, monkeypatch):
    monkeypatch.setattr(complexity_mod, "_memory", {})  # earlier tests may have filled it
    cx = zoo.complexity("efficientvit_m0")
    model = zoo.create_model("efficientvit_m0")
    assert cx["params"] == sum(p.numel() for p in model.parameters())
    assert cx["macs"] == complexity_mod.count_macs(model, (torch.randn(1, 3, 224, 224),))
    assert (zoo_home / "complexity.json").is_file()
    # second call (memory, then disk after clearing memory) does not recompute
    monkeypatch.setattr(complexity_mod, "count_macs", lambda *a: pytest.fail("recomputed"))
    assert zoo.complexity("efficientvit_m0") == cx
    monkeypatch.setattr(complexity_mod, "_memory", {})
    assert zoo.complexity("efficientvit_m0") == cx


def test_count_macs_counts_convs_and_matmuls():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert complexity_mod.count_macs(conv, (torch.randn(1, 3, 10, 10),)) == 3 * 8 * 9 * 100
    lin = torch.nn.Linear(16, 4)
    assert complexity_mod.count_macs(lin, (torch.randn(5, 16),)) == 5 * 16 * 4
