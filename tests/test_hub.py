"""Weights: formats, key layouts, downloads, sha256, offline, unsafe and broken files."""
from __future__ import annotations

import dataclasses
import os
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

import zoo
from zoo.testing import randomize_
from tests.helpers import efficientvit_to_official as to_official
from tests.helpers import official_index
from zoo import hub, registry
from zoo.hub import WeightEntry
from zoo.io import sha256_file

NAME = "efficientvit_m0"


@pytest.fixture(scope="module")
def reference():
    """A timm efficientvit_m0 with random weights, its state dict and output on a fixed input."""
    model = randomize_(timm.create_model(NAME).eval(), seed=3)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    return model.state_dict(), x, y


def _write(path, obj, fmt):
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    elif fmt == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(obj, path)


def _layouts(sd):
    """zoo: ours; timm: as older timm saved it (with the bias index buffers); official: the release's."""
    idxs = {
        k.replace("attention_biases", "attention_bias_idxs"): official_index(round(v.shape[1] ** 0.5))
        for k, v in sd.items()
        if k.endswith("attention_biases")
    }
    return {"zoo": dict(sd), "timm": {**sd, **idxs}, "official": to_official(sd)["model"]}


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "torch-legacy"])
@pytest.mark.parametrize("layout", ["zoo", "timm", "official"])
@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_each_format_layout_and_wrapper_loads_with_identical_outputs(reference, tmp_path, fmt, layout, wrapper):
    sd, x, y = reference
    if fmt == "safetensors" and wrapper:
        pytest.skip("safetensors files hold flat tensor dicts")
    flat = _layouts(sd)[layout]
    obj = flat if wrapper is None else {wrapper: flat, "epoch": 3, "arch": NAME}
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    _write(path, obj, fmt)
    model = zoo.create_model(NAME, pretrained=str(path))
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_detected_layout_is_reported(reference):
    sd, _, _ = reference
    model = zoo.create_model(NAME)
    card = zoo.model_card(NAME)
    assert hub.load_weights(model, to_official(sd)["model"], card.layouts) == "official"
    ddp = hub.extract_state_dict({f"module.{k}": v for k, v in sd.items()})  # saved from DistributedDataParallel
    assert set(ddp) == set(sd)
    assert hub.load_weights(model, ddp, card.layouts) == "zoo"


def test_new_num_classes_keeps_a_fresh_head_and_loads_the_rest(reference, tmp_path):
    sd, x, _ = reference
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    model = zoo.create_model(NAME, pretrained=str(path), num_classes=5)
    assert model.head.linear.weight.shape == (5, 192)
    assert torch.equal(model.patch_embed.conv1.conv.weight, sd["patch_embed.conv1.conv.weight"])
    assert torch.equal(model.head.bn.running_var, sd["head.bn.running_var"])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_architecture_is_a_clear_error_and_leaves_the_model_untouched(tmp_path):
    other = tmp_path / "m1.pth"
    torch.save(zoo.create_model("efficientvit_m1").state_dict(), other)
    model = zoo.create_model(NAME)
    before = _state(model)
    card = zoo.model_card(NAME)
    with pytest.raises(zoo.WeightsError, match="another architecture or variant"):
        hub.load_weights(model, hub.read_state_dict(other), card.layouts, head_keys=card.head_keys)
    _assert_untouched(model, before)
    resnet = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), resnet)
    with pytest.raises(zoo.WeightsError, match="does not fit"):
        hub.load_weights(model, hub.read_state_dict(resnet), card.layouts)
    _assert_untouched(model, before)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_truncated_file_is_a_clear_error_and_leaves_the_model_untouched(reference, tmp_path, fmt):
    sd, _, _ = reference
    path = tmp_path / "w.bin"
    _write(path, sd, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = zoo.create_model(NAME)
    before = _state(model)
    with pytest.raises(zoo.WeightsError, match="truncated or corrupt"):
        hub.load_weights(model, hub.read_state_dict(path), zoo.model_card(NAME).layouts)
    _assert_untouched(model, before)


def test_empty_and_foreign_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(zoo.WeightsError, match="empty"):
        hub.read_state_dict(tmp_path / "empty.pth")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(zoo.WeightsError, match="neither a safetensors file nor a torch.save file"):
        hub.read_state_dict(tmp_path / "notes.txt")
    with pytest.raises(zoo.WeightsError, match="does not exist"):
        zoo.create_model(NAME, pretrained=str(tmp_path / "missing.pth"))


class _Payload:
    """Unpickling this runs os.system: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    pass


def test_pickles_with_code_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, evil)
    with pytest.raises(zoo.WeightsError, match="refused"):
        zoo.create_model(NAME, pretrained=str(evil))
    assert not marker.exists()
    custom = tmp_path / "custom.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": _Custom()}, custom)
    with pytest.raises(zoo.WeightsError, match="refused"):
        hub.read_state_dict(custom)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(zoo.WeightsError):
        hub.read_state_dict(raw)
    assert not marker.exists()


def _with_entry(monkeypatch, entry):
    card = dataclasses.replace(zoo.model_card(NAME), weights={entry.tag: entry}, default_tag=entry.tag)
    monkeypatch.setitem(registry._REGISTRY, NAME, card)
    return card


def test_download_is_atomic_checked_and_cached(reference, http_root, monkeypatch, zoo_home):
    sd, x, y = reference
    root, base = http_root
    _write(root / "m0.safetensors", sd, "safetensors")
    digest = sha256_file(root / "m0.safetensors")
    entry = WeightEntry("test", f"{base}/m0.safetensors", sha256=digest, format="safetensors", layout="timm")
    _with_entry(monkeypatch, entry)
    model = zoo.create_model(NAME, pretrained=True)
    with torch.no_grad():
        assert torch.equal(model(x), y)
    dest = hub.cached_path(NAME, entry)
    assert dest == zoo_home / "weights" / NAME / "test" / "m0.safetensors" and dest.is_file()
    assert [p.name for p in dest.parent.iterdir()] == ["m0.safetensors"]  # no temp files left
    (root / "m0.safetensors").unlink()  # a second load needs no server
    assert zoo.create_model(NAME, pretrained="test").pretrained_cfg["tag"] == "test"


def test_sha256_mismatch_deletes_the_download_and_raises(reference, http_root, monkeypatch):
    sd, _, _ = reference
    root, base = http_root
    _write(root / "m0.safetensors", sd, "safetensors")
    entry = WeightEntry("test", f"{base}/m0.safetensors", sha256="0" * 64, format="safetensors")
    _with_entry(monkeypatch, entry)
    with pytest.raises(zoo.WeightsError, match="sha256"):
        zoo.create_model(NAME, pretrained=True)
    folder = hub.cached_path(NAME, entry).parent
    assert not folder.exists() or list(folder.iterdir()) == []


def test_corrupt_cached_file_is_fetched_again(reference, http_root, monkeypatch):
    sd, x, y = reference
    root, base = http_root
    _write(root / "m0.safetensors", sd, "safetensors")
    entry = WeightEntry("test", f"{base}/m0.safetensors", sha256=sha256_file(root / "m0.safetensors"), format="safetensors")
    _with_entry(monkeypatch, entry)
    dest = hub.cached_path(NAME, entry)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"garbage")
    with torch.no_grad():
        assert torch.equal(zoo.create_model(NAME, pretrained=True)(x), y)


@pytest.mark.parametrize("var", ["ZOO_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_miss_names_the_file_and_where_to_put_it(monkeypatch, var, zoo_home):
    monkeypatch.setenv(var, "1")
    with pytest.raises(zoo.WeightsError) as e:
        zoo.create_model(NAME, pretrained=True)
    expected = zoo_home / "weights" / NAME / "r224_in1k" / "model.safetensors"
    assert str(expected) in str(e.value) and "timm/efficientvit_m0.r224_in1k" in str(e.value)
    assert not (zoo_home / "weights").exists()
    with pytest.raises(zoo.WeightsError, match=str(zoo_home / "weights" / NAME / "official" / "efficientvit_m0.pth")):
        zoo.create_model(NAME, pretrained="official")


def test_no_network_is_a_clear_error(monkeypatch, zoo_home):
    entry = WeightEntry("test", "http://127.0.0.1:9/none.pth")  # port 9: nothing listens
    _with_entry(monkeypatch, entry)
    with pytest.raises(zoo.WeightsError, match="put it at"):
        zoo.create_model(NAME, pretrained=True)
    assert not hub.cached_path(NAME, entry).exists()


def test_unknown_tag(monkeypatch):
    with pytest.raises(zoo.UnknownModelError, match="r224_in1k"):
        zoo.create_model(NAME, pretrained="r224_in1kk")


def test_manual_source_says_where_to_save_and_uses_the_file_once_there(reference, monkeypatch, zoo_home):
    """Google Drive releases cannot be fetched by a program: the error is the instructions."""
    sd, x, y = reference
    entry = WeightEntry("drive", "manual:https://drive.google.com/file/d/abc/view", filename="m0.pth", layout="timm")
    _with_entry(monkeypatch, entry)
    dest = zoo_home / "weights" / NAME / "drive" / "m0.pth"
    with pytest.raises(zoo.WeightsError) as e:
        zoo.create_model(NAME, pretrained=True)
    assert "https://drive.google.com/file/d/abc/view" in str(e.value) and str(dest) in str(e.value)
    assert not dest.parent.exists()
    dest.parent.mkdir(parents=True)
    torch.save(sd, dest)
    with torch.no_grad():
        assert torch.equal(zoo.create_model(NAME, pretrained=True)(x), y)
    with pytest.raises(ValueError, match="filename"):
        WeightEntry("drive", "manual:https://example.org/page")


def test_a_host_that_does_not_resolve_fails_at_once_without_retries(monkeypatch, zoo_home):
    import socket
    import time

    import huggingface_hub

    looked_up, downloads = [], []

    def no_dns(host, *a, **k):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: downloads.append(a) or None)
    start = time.perf_counter()
    with pytest.raises(zoo.WeightsError, match="does not resolve.*put it at"):
        zoo.create_model(NAME, pretrained=True)
    assert time.perf_counter() - start < 5 and looked_up == ["huggingface.co"] and not downloads
    assert not (zoo_home / "weights" / NAME / "r224_in1k" / "model.safetensors").exists()


def test_a_converter_bug_is_not_taken_for_another_layout(monkeypatch):
    """Only `NotThisLayout` means 'try the next layout'; a converter that breaks raises as is."""
    model = zoo.create_model(NAME)

    def broken(sd, m):
        return {k: v for k, v in sd["no such key"].items()}  # KeyError: a bug, not a layout answer

    other_layout = {f"net.{k}": v for k, v in model.state_dict().items()}  # the zoo layout does not fit
    with pytest.raises(KeyError):
        hub.load_weights(model, other_layout, {"official": broken}, layout=None)
    assert hub.load_weights(model, model.state_dict(), {"official": zoo.model_card(NAME).layouts["official"]}) == "zoo"


def test_a_model_that_fails_on_its_own_example_input_is_a_bug_not_a_user_error():
    class Broken(torch.nn.Module):
        pretrained_cfg = {"input_size": (3, 8, 8)}

        def forward(self, x):
            raise RuntimeError("bug inside the model")

    from zoo.export import prepare_target

    with pytest.raises(RuntimeError, match="bug inside"):
        prepare_target(Broken(), reparam=False)
    with pytest.raises(zoo.ConfigError, match="cannot take inputs") as e:
        prepare_target(Broken(), input_shape=(1, 3, 8, 8), reparam=False)
    assert isinstance(e.value.__cause__, RuntimeError)  # chained, so ZOO_DEBUG=1 shows it


def test_a_builder_bug_is_not_relabelled_and_a_bad_override_is_chained(monkeypatch):
    card = zoo.model_card(NAME)

    def broken(**kw):
        raise TypeError("bug in the builder")

    monkeypatch.setitem(registry._REGISTRY, NAME, dataclasses.replace(card, builder=broken))
    with pytest.raises(TypeError, match="bug in the builder"):
        zoo.create_model(NAME)
    monkeypatch.undo()
    with pytest.raises(zoo.ConfigError) as e:
        zoo.create_model(NAME, embed_dim=5)  # not a sequence
    assert e.value.__cause__ is not None
