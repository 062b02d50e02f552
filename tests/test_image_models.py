"""All 13 image models against timm with the same random weights: timm's backbone API
(``features_only``, ``forward_intermediates``, ``prune_intermediate_layers``) and the deploy
form with the CPU kernels switched off or failing."""
from __future__ import annotations

import threading
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

import zoo
import zoo.models.cpu_kernels as kernels
from zoo.testing import randomize_, rel_err

NAMES = [f"efficientvit_m{i}" for i in range(6)] + [f"efficientformer_l{i}" for i in (1, 3, 7)] + [
    f"efficientformerv2_{v}" for v in ("s0", "s1", "s2", "l")]
BIG = {"efficientformer_l7", "efficientformer_l3", "efficientformerv2_l", "efficientformerv2_s2"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (timm model with random weights, its state dict as a safetensors file, input)."""
    folder = tmp_path_factory.mktemp("timm_weights")
    out = {}
    for i, name in enumerate(NAMES):
        ref = randomize_(timm.create_model(name).eval(), seed=i)
        path = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
        x = torch.randn(1 if name in BIG else 2, 3, 224, 224, generator=torch.Generator().manual_seed(i))
        out[name] = (ref, path, x)
    return out


@pytest.fixture
def kernels_reset():
    kernels.reset_cpu_kernels()
    yield
    kernels.reset_cpu_kernels()


@pytest.mark.parametrize("name", NAMES)
def test_features_only_equals_timm_features_only(name, reference):
    ref, path, x = reference[name]
    theirs = timm.create_model(name, features_only=True, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    ours = zoo.create_model(name, features_only=True, pretrained=str(path))  # a classification file
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    assert ours.feature_info.module_name() == theirs.feature_info.module_name()
    assert not any(k.startswith(("model.head", "model.head_dist")) for k in ours.state_dict())  # pruned
    with torch.no_grad():
        want, got = theirs(x), ours(x)
    assert len(got) == len(want) == len(ours.feature_info)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5
    deployed = zoo.export.reparameterize(ours)
    with torch.inference_mode():
        fast = deployed(x)
    for a, b in zip(fast, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_and_pruning_equal_timm(name, reference):
    ref, path, x = reference[name]
    ours = zoo.create_model(name, pretrained=str(path))
    for kwargs in (dict(), dict(norm=True), dict(indices=2), dict(indices=[0, -1], norm=True),
                   dict(indices=[1], stop_early=True)):
        with torch.no_grad():
            want_x, want = ref.forward_intermediates(x, **kwargs)
            got_x, got = ours.forward_intermediates(x, **kwargs)
        assert len(got) == len(want), kwargs
        for a, b in zip(got, want):
            assert a.shape == b.shape and rel_err(a, b) < 1e-5, kwargs
        assert got_x.shape == want_x.shape and rel_err(got_x, want_x) < 1e-5, kwargs
    with torch.no_grad():
        only = ours.forward_intermediates(x, indices=1, intermediates_only=True)
        last = ref.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(only) == 1 and rel_err(only[0], last[0]) < 1e-5
    theirs_pruned = timm.create_model(name).eval()
    theirs_pruned.load_state_dict(ref.state_dict())
    kept = theirs_pruned.prune_intermediate_layers(2)
    assert ours.prune_intermediate_layers(2) == kept
    assert len(ours.stages) == len(theirs_pruned.stages) and ours.num_features == theirs_pruned.num_features
    with torch.no_grad():
        a = ours.forward_intermediates(x, indices=2, intermediates_only=True)
        b = theirs_pruned.forward_intermediates(x, indices=2, intermediates_only=True)
    assert all(rel_err(p, q) < 1e-5 for p, q in zip(a, b))


def _deployed(name: str, reference) -> tuple:
    """(deploy form loaded with the reference weights, input, timm's output)."""
    ref, path, x = reference[name]
    with torch.no_grad():
        want = ref(x)
    return zoo.export.reparameterize(zoo.create_model(name, pretrained=str(path))), x, want


def _cached_kernels(model: torch.nn.Module) -> set:
    """The kinds of fast-kernel data the model's layers built ("rows", "conv", "dense"...)."""
    return {key[0] for m in model.modules() for key in m.__dict__.get("_kernel_cache", {})}


ONEDNN_KINDS = {"rows", "conv", "linear"}  # what only the oneDNN paths build


@pytest.mark.parametrize("name", NAMES)
def test_deploy_form_equals_timm_with_the_kernels_off_and_with_a_failed_probe(name, reference, monkeypatch,
                                                                                kernels_reset):
    deployed, x, want = _deployed(name, reference)
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    kernels.reset_cpu_kernels()
    with torch.inference_mode():
        assert rel_err(deployed(x), want) < 1e-5
    assert not kernels.cpu_kernels_enabled() and not _cached_kernels(deployed)  # stock ops only
    monkeypatch.delenv("ZOO_CPU_KERNELS")
    monkeypatch.setattr(kernels, "probe_onednn", lambda: (False, "forced to fail by the test"))
    kernels.reset_cpu_kernels()
    with pytest.warns(RuntimeWarning, match="forced to fail"):
        assert not kernels.onednn_enabled()
    with torch.inference_mode():
        assert rel_err(deployed(x), want) < 1e-5
    assert not _cached_kernels(deployed) & ONEDNN_KINDS


@pytest.mark.parametrize("name", ["efficientvit_m0", "efficientformer_l1", "efficientformerv2_s0"])
def test_deploy_form_equals_timm_with_the_kernels_on_and_they_are_used(name, reference, kernels_reset):
    if not kernels.probe_onednn()[0]:
        pytest.skip("oneDNN's fused ops do not pass the probe on this build")
    deployed, x, want = _deployed(name, reference)
    with torch.inference_mode():
        assert rel_err(deployed(x), want) < 1e-5
    assert kernels.onednn_enabled() and _cached_kernels(deployed) & ONEDNN_KINDS


def test_a_kernel_that_fails_later_falls_back_in_that_layer_with_one_warning(reference, monkeypatch, kernels_reset):
    if not kernels.probe_onednn()[0]:
        pytest.skip("oneDNN's fused ops do not pass the probe on this build")
    deployed, x, want = _deployed("efficientformer_l1", reference)
    assert kernels.onednn_enabled()

    def broken(*args):
        raise RuntimeError("oneDNN: unsupported on this CPU (simulated)")

    monkeypatch.setattr(kernels._Switch, "linear", broken)
    monkeypatch.setattr(kernels._Switch, "linear_add", broken)
    monkeypatch.setattr(kernels._Switch, "conv", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            out = deployed(x)
    assert rel_err(out, want) < 1e-5
    failed = [m for m in deployed.modules() if "_onednn_off" in m.__dict__]
    messages = [w for w in caught if "simulated" in str(w.message)]
    assert failed and len(messages) == len(failed)  # one warning per layer, then silence
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        with torch.inference_mode():
            assert rel_err(deployed(x), want) < 1e-5
    assert not [w for w in again if "simulated" in str(w.message)]


@pytest.mark.parametrize("name", ["efficientvit_m0", "efficientformerv2_s0"])
def test_two_threads_running_one_deploy_model_get_correct_outputs(name, reference, kernels_reset):
    """Different batch sizes in each thread churn the shared kernel caches (one entry per
    input shape, a few kept per layer) while the other thread reads them."""
    ref, path, _ = reference[name]
    deployed = zoo.export.reparameterize(zoo.create_model(name, pretrained=str(path)))
    inputs = [torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(b)) for b in (1, 2, 3, 4, 5)]
    with torch.no_grad():
        wants = [ref(x) for x in inputs]
    errors, worst = [], []

    def work(order):
        try:
            for _ in range(2):
                for i in order:
                    with torch.inference_mode():
                        worst.append(rel_err(deployed(inputs[i]), wants[i]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(o,)) for o in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(worst) == 20 and max(worst) < 1e-5


def test_features_only_refusals_are_clear():
    with pytest.raises(zoo.ConfigError, match="no feature maps"):
        zoo.create_model("psf_tiny", features_only=True)
    with pytest.raises(zoo.ConfigError, match="out_indices"):
        zoo.create_model("efficientvit_m0", features_only=True, out_indices=(0, 5))
    with pytest.raises(zoo.ConfigError, match="features_only"):
        zoo.create_model("efficientvit_m0", out_indices=(0, 1))
    model = zoo.create_model("efficientvit_m0", features_only=True, out_indices=(-1,))
    assert model.feature_info.channels() == [192] and model.pretrained_cfg["out_indices"] == (2,)


def test_features_only_exports_to_onnx_with_one_output_per_level(tmp_path):
    model = zoo.create_model("efficientformerv2_s0", features_only=True)
    randomize_(model)
    report = zoo.export.to_onnx(model, tmp_path / "features.onnx", verbose=False)
    import onnx

    graph = onnx.load(str(report.path)).graph
    assert len(graph.output) == 4
    assert max(c.rel_diff for c in report.comparisons) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_training_form_scripts_fx_traces_and_works_with_timms_fx_feature_extractor(name, reference):
    """As timm's: ``torch.jit.script`` (still used for C++ deployment), ``torch.fx.symbolic_trace``
    and timm's fx ``create_feature_extractor``, each with the eager outputs."""
    from timm.models._features_fx import create_feature_extractor

    ref, path, x = reference[name]
    model = zoo.create_model(name, pretrained=str(path))
    with torch.no_grad():
        want = model(x)
        scripted = torch.jit.script(model)
        assert rel_err(scripted(x), want) < 1e-5
        traced = torch.fx.symbolic_trace(model)
        assert rel_err(traced(x), want) < 1e-5
        extractor = create_feature_extractor(model, {"stages.1": "s1", f"stages.{len(model.stages) - 1}": "last"})
        feats = extractor(x)
        maps = model.forward_intermediates(x, indices=[1, len(model.stages) - 1], intermediates_only=True)
    assert rel_err(feats["s1"], maps[0]) < 1e-5
    assert rel_err(model._as_map(feats["last"]), maps[1]) < 1e-5


@pytest.mark.parametrize("name", ["efficientvit_m0", "efficientformer_l1", "efficientformerv2_s0"])
def test_torch_export_gives_the_eager_outputs(name, reference):
    ref, path, x = reference[name]
    model = zoo.create_model(name, pretrained=str(path))
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert rel_err(program.module()(x), model(x)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientvit_m0", "efficientformer_l1", "efficientformerv2_s0"])
def test_a_training_step_runs_under_torch_compile(name):
    model = zoo.create_model(name, num_classes=4, img_size=64).train()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    before = [p.detach().clone() for p in model.parameters()]
    out = compiled(x)
    logits = out[0] if isinstance(out, tuple) else out
    torch.nn.functional.cross_entropy(logits, y).backward()
    opt.step()
    assert torch.isfinite(logits).all()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["efficientvit_m0", "efficientformer_l1", "efficientformerv2_s0"])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(name, monkeypatch):
    """timm's ``set_grad_checkpointing``: the stages run through ``checkpoint_seq`` in training
    (activations recomputed in backward), with the same loss and gradients as without."""
    import zoo.models.image_model as image_model

    model = randomize_(zoo.create_model(name, num_classes=3, img_size=64), scale=0.1).train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    calls = []
    real = image_model.checkpoint_seq
    monkeypatch.setattr(image_model, "checkpoint_seq", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        runs.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], len(calls)))
    (a, ga, calls_off), (b, gb, calls_on) = runs
    assert calls_off == 0 and calls_on == 1, "checkpointing must be off by default and used when set"
    assert rel_err(b, a) < 1e-6 and len(ga) == len(gb)
    assert all(rel_err(q, p) < 1e-5 for p, q in zip(ga, gb) if p.abs().max() > 0)
