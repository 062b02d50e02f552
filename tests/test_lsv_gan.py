"""LSV-GAN: the discriminator, the posed-camera data, the GAN task on the shared engine (resume,
a short run, gradients through the renderer), the command line."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from zoo.data.humans import LABEL_DIM, PosedImageFolder, check_label, split_label, write_posed_dataset
from zoo.errors import DataError
from zoo.models.lsv.discriminator import Discriminator, DiscriminatorConfig, minibatch_std
from zoo.models.lsv.render import opencv_to_clip, orbit_cameras, orbit_opencv
from zoo.train.engine import Engine, TrainConfig, setup_distributed
from zoo.train.gan import GANConfig, LSVGANTask, blur_images, r1_penalty, synthetic_humans

TINY_G = {"texture_size": 16, "z_dim": 16, "w_dim": 16, "mapping_layers": 2, "channel_base": 256, "channel_max": 32}


def tiny(**kw) -> GANConfig:
    base = dict(model_overrides=TINY_G, resolution=16, num_images=40, num_outfits=4, batch_size=4, eval_images=8,
                d_channel_base=256, d_channel_max=32, blur_fade_kimg=0.1, blur_sigma=2.0)
    return GANConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- cameras and labels

def test_opencv_cameras_give_the_orbit_cameras_matrices_and_project_as_opencv_does():
    az, el = torch.tensor([0.0, 1.1, 4.0]), torch.tensor([0.2, -0.1, 0.3])
    c2w, k = orbit_opencv(az, el, 2.5, 40.0)
    ours = opencv_to_clip(c2w, k)
    ref = torch.stack([orbit_cameras(1, 2.5, math.degrees(e), 40.0, start=math.degrees(a))[0]
                       for a, e in zip(az.tolist(), el.tolist())])
    assert torch.allclose(ours, ref, atol=1e-5)
    # an off-centre principal point and skew: NDC must match OpenCV's pixel formula (v down)
    k2 = torch.tensor([[1.3, 0.05, 0.42], [0.0, 1.1, 0.61], [0.0, 0.0, 1.0]])
    world = torch.tensor([[0.1, 1.0, 0.2], [-0.3, 0.5, -0.1]])
    cam = (torch.linalg.inv(c2w[1]) @ torch.cat([world, torch.ones(2, 1)], 1).T).T[:, :3]
    u = (k2[0, 0] * cam[:, 0] + k2[0, 1] * cam[:, 1]) / cam[:, 2] + k2[0, 2]
    v = k2[1, 1] * cam[:, 1] / cam[:, 2] + k2[1, 2]
    clip = (opencv_to_clip(c2w[1], k2) @ torch.cat([world, torch.ones(2, 1)], 1).T).T
    ndc = clip[:, :2] / clip[:, 3:]
    assert torch.allclose(ndc[:, 0], 2 * u - 1, atol=1e-5) and torch.allclose(ndc[:, 1], 1 - 2 * v, atol=1e-5)


def _label(c2w=None) -> list:
    c2w = torch.eye(4) if c2w is None else c2w
    k = torch.tensor([[1.2, 0, 0.5], [0, 1.2, 0.5], [0, 0, 1.0]])
    return torch.cat([c2w.reshape(16), k.reshape(9), torch.randn(72) * 0.1, torch.zeros(10)]).tolist()


def test_labels_are_checked_and_split():
    lab = torch.tensor(_label())
    parts = split_label(lab[None])
    assert parts["c2w"].shape == (1, 4, 4) and parts["K"].shape == (1, 3, 3) and parts["pose"].shape == (1, 24, 3)
    assert torch.equal(parts["pose"].reshape(72), lab[25:97])
    with pytest.raises(DataError, match="107"):
        check_label(lab[:100].tolist(), "x")
    scaled = torch.eye(4)
    scaled[:3, :3] *= 1.5
    with pytest.raises(DataError, match="rigid"):
        check_label(_label(scaled), "x")
    mirrored = torch.diag(torch.tensor([-1.0, 1, 1, 1]))
    with pytest.raises(DataError, match="rigid"):
        check_label(_label(mirrored), "x")


def _folder(tmp_path, n=3):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 8, 8, 4, generator=g)
    labels = torch.tensor([_label() for _ in range(n)])
    return write_posed_dataset(tmp_path / "data", images, labels), images, labels


def test_a_posed_folder_round_trips_and_composites_over_its_background(tmp_path):
    root, images, labels = _folder(tmp_path)
    data = PosedImageFolder(root, channels=3, background=(0.0, 0.0, 0.0))
    assert len(data) == 3 and data.resolution == 8
    assert torch.allclose(data.labels, labels, atol=1e-6)
    q = (images * 255 + 0.5).floor() / 255
    assert torch.allclose(data[1]["image"], (q[1, ..., :3] * q[1, ..., 3:]).permute(2, 0, 1), atol=1e-6)
    assert torch.allclose(PosedImageFolder(root, channels=4)[2]["image"], q[2].permute(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize("fault", ["length", "missing", "not-rigid"])
def test_a_bad_dataset_json_names_the_file(tmp_path, fault):
    root, _, _ = _folder(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    if fault == "length":
        meta["labels"][1][1] = meta["labels"][1][1][:106]
    elif fault == "missing":
        (root / "img00002.png").unlink()
    else:
        meta["labels"][0][1][0] = 2.0  # c2w[0, 0]: a stretch, not a rotation
    (root / "dataset.json").write_text(json.dumps(meta))
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(DataError) as err:
        PosedImageFolder(root)
    name = {"length": "img00001.png", "missing": "img00002.png", "not-rigid": "img00000.png"}[fault]
    assert name in str(err.value)
    assert sorted(p.name for p in root.iterdir()) == before


def test_writing_a_bad_label_writes_nothing(tmp_path):
    labels = torch.tensor([_label(), _label()])
    labels[1, 0] = 3.0
    with pytest.raises(DataError):
        write_posed_dataset(tmp_path / "out", torch.rand(2, 8, 8, 4), labels)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- discriminator

def test_the_discriminator_halves_to_4x4_and_reads_its_condition():
    torch.manual_seed(0)
    d = Discriminator(DiscriminatorConfig(resolution=32, channel_base=256, channel_max=32, mapping_layers=2))
    x, c = torch.rand(4, 3, 32, 32), torch.randn(4, LABEL_DIM)
    y = d(x, c)
    assert y.shape == (4,) and torch.isfinite(y).all()
    assert not torch.allclose(y, d(x, c + torch.randn_like(c)))
    # minibatch std: each group's extra channel is the mean over features of the std over the group
    f = torch.randn(8, 6, 4, 4)
    out = minibatch_std(f, 4, 1)
    grouped = f.reshape(4, 2, 6, 4, 4)
    expect = (grouped.var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))
    assert torch.allclose(out[:, 6, 0, 0], expect.repeat(4), atol=1e-6)


def test_r1_is_the_squared_input_gradient():
    torch.manual_seed(0)
    d = Discriminator(DiscriminatorConfig(resolution=8, channel_base=64, channel_max=16, c_dim=0, mbstd_channels=0))
    x = torch.rand(2, 3, 8, 8)
    penalty, _ = r1_penalty(d, x, None)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(d(xg).sum(), [xg])
    assert torch.allclose(penalty, g.square().sum((1, 2, 3)), rtol=1e-5)


def test_the_fade_in_blur_keeps_flat_images_and_softens_edges():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(blur_images(flat, 2.0), flat, atol=1e-6)
    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 8:] = 1
    out = blur_images(edge, 1.5)
    assert 0.05 < out[0, 0, 0, 7] < 0.5 < out[0, 0, 0, 8] < 0.95
    assert torch.equal(blur_images(edge, 0.0), edge)


# ----------------------------------------------------------------------------- data and the task

def test_the_built_in_humans_need_their_off_surface_layer():
    import zoo

    model = zoo.create_model("lsv_mannequin", texture_size=32)
    rgba, labels = synthetic_humans(model, 6, 48, seed=3, num_outfits=2)
    assert rgba.shape == (6, 48, 48, 4) and labels.shape == (6, LABEL_DIM)
    for lab in labels:
        check_label(lab.tolist(), "synthetic")
    assert 0.05 < rgba[..., 3].mean() < 0.6
    # the same images without the outer layer (hair, skirt) lose coverage: the shells matter
    from zoo.models.lsv import procedural_outfit

    outfits = torch.stack([procedural_outfit(model, 32, seed=3000 + k) for k in range(2)])
    bare = outfits.clone()
    bare[:, 0, 3] = 0
    parts = split_label(labels)
    shells = model.pose(parts["pose"])["shells"]
    mvp = opencv_to_clip(parts["c2w"], parts["K"])[:, None]
    g = torch.Generator().manual_seed(3)
    which = torch.randint(2, (6,), generator=g)
    full = model.render(outfits[which], shells, mvp, 48)[:, 0, ..., 3]
    without = model.render(bare[which], shells, mvp, 48)[:, 0, ..., 3]
    assert torch.allclose(full, rgba[..., 3], atol=1e-5)
    assert ((full > 0.5) & (without < 0.5)).float().sum() > 0.03 * (full > 0.5).float().sum()


def _fit(out, epochs, resume="", **kw):
    env = setup_distributed("cpu")
    task = LSVGANTask(tiny(**kw), env)
    tc = TrainConfig(epochs=epochs, sched="none", output=str(out), experiment="run", resume=resume, log_interval=0)
    engine = Engine(task, tc, env=env)
    engine.fit()
    return engine, task


def test_a_resumed_gan_run_ends_with_the_uninterrupted_runs_weights(tmp_path):
    full, full_task = _fit(tmp_path / "a", 2)
    _fit(tmp_path / "b", 1)
    resumed, resumed_task = _fit(tmp_path / "b", 2, resume=str(tmp_path / "b" / "run" / "last.pth.tar"))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b) and any(k.startswith("G_ema.") for k in a) and any(k.startswith("D.") for k in a)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    # 10 D steps per epoch: R1 ran on D steps 0 and 16, the second after the resume
    assert full_task.r1_steps == resumed_task.r1_steps == [0, 16]
    assert full_task.d_steps == resumed_task.d_steps == 20
    for name in ("G", "D"):
        sa, sb = full.optimizers[name].state_dict()["state"], resumed.optimizers[name].state_dict()["state"]
        assert all(torch.allclose(sa[i]["exp_avg"], sb[i]["exp_avg"], atol=1e-6) for i in sa)
    assert (tmp_path / "b" / "run" / "curves.png").is_file() and (tmp_path / "b" / "run" / "samples_epoch001.png").is_file()


def test_a_short_gan_run_learns_and_every_generator_weight_gets_gradients(tmp_path):
    env = setup_distributed("cpu")
    task = LSVGANTask(tiny(num_images=48, blur_fade_kimg=0.0), env)
    gan = task.build_model()
    # one generator loss through the renderer reaches every generator weight
    batch = next(iter(task.train_loader(0)))
    fake = task.fake_images(gan, torch.randn(4, 16), batch["label"])
    torch.nn.functional.softplus(-gan.D(fake, batch["label"])).mean().backward()
    for name, p in gan.G.generator.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    steps = []
    step = task.train_step
    task.train_step = lambda *a: steps.append(step(*a)[0]) or (steps[-1], 4)  # noqa: E731
    tc = TrainConfig(epochs=3, sched="none", output=str(tmp_path), experiment="short", log_interval=0)
    engine = Engine(task, tc, env=env)
    engine.fit()
    assert len(steps) == 36
    assert all(math.isfinite(v) for s in steps for v in s.values())
    acc = np.array([s["D_accuracy"] for s in steps])
    assert not (acc == 1.0).all() and not (acc == 0.5).all()
    assert acc[-12:].mean() > 0.5  # D learns to tell them apart at first
    assert [h["epoch"] for h in engine.history] == [0, 1, 2] and "train_loss_G" in engine.history[0]
    assert 0 < engine.history[-1]["eval_silhouette_iou"] <= 1


# ----------------------------------------------------------------------------- consistency, weights, CLI

def test_multiview_consistency_tells_surface_colour_from_mismatched_views():
    import zoo
    from zoo.models.lsv import procedural_outfit
    from zoo.models.lsv.consistency import multiview_consistency

    model = zoo.create_model("lsv_mannequin", texture_size=32)
    tex = torch.stack([procedural_outfit(model, 32, seed=k) for k in range(2)])
    pose = torch.zeros(2, 24, 3)
    a, b = model.cameras(4)[:2], model.cameras(4, start=25)[:2]
    same = multiview_consistency(model, tex, pose, a, b, 48)
    other = multiview_consistency(model, tex, pose, a, b, 48, mismatched=True)
    assert 0.3 < same["fraction"] <= 1 and same["fraction"] == other["fraction"]
    assert same["l1"] < 0.3 * other["l1"]
    # from the very same camera the warp is the identity
    assert multiview_consistency(model, tex, pose, a, a, 48)["l1"] < 1e-4


def test_a_gan_checkpoint_loads_its_ema_generator(tmp_path):
    import zoo

    engine, _ = _fit(tmp_path, 1, num_images=8)
    path = tmp_path / "run" / "last.pth.tar"
    model = zoo.create_model("lsv_mannequin", pretrained=str(path), **TINY_G)
    ema = engine.model.G_ema.state_dict()
    for k, v in model.generator.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert not any(k.startswith(("shells.", "uv")) for k in model.state_dict())  # geometry is rebuilt, never saved


def test_zoo_train_and_evaluate_a_human_generator_from_the_command_line(tmp_path, capsys):
    from zoo.cli import main

    overrides = tmp_path / "tiny.yaml"
    overrides.write_text("model: lsv_mannequin\nimg_size: 16\nnum_images: 8\nbatch_size: 4\nepochs: 1\n"
                         "blur_fade_kimg: 0.01\nlog_interval: 0\n")
    # the GAN flags sit beside timm's; -c YAML and flags mix as for any model
    assert main(["train", "-c", str(overrides), "--r1-gamma", "0.5", "--d-reg-interval", "2", "--output",
                 str(tmp_path), "--experiment", "cli"]) == 0
    run = tmp_path / "cli"
    assert (run / "last.pth.tar").is_file() and (run / "curves.png").is_file()
    summary = (run / "summary.csv").read_text().splitlines()
    assert "train_loss_G" in summary[0] and "eval_fid" in summary[0] and len(summary) == 2
    capsys.readouterr()
    code = main(["evaluate", "lsv_mannequin", "--random", "--num", "4", "--img-size", "16",
                 "--json", str(tmp_path / "m.json")])
    assert code == 0
    out = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert set(out) >= {"fid", "kid", "silhouette_iou", "multiview_l1"} and out["fid"] > 0
    assert "fid" in capsys.readouterr().out


def test_the_shipped_mannequin_weights_load_and_dress_the_body():
    import zoo

    card = zoo.model_card("lsv_mannequin")
    if card.default_tag is None:
        pytest.skip("this checkout has no lsv_mannequin weights")
    trained = zoo.create_model("lsv_mannequin", pretrained=True).eval()
    untrained = zoo.create_model("lsv_mannequin").eval()
    with torch.no_grad():
        z = trained.noise(4, seed=0)
        tex, raw = trained(z), untrained(z)
    # samples differ from each other and from an untrained network's near-uniform grey, and the
    # generator learnt to make the outermost shell mostly clear (the data has hair and a skirt there only)
    assert tex[:, :, :3].std(0).mean() > 0.02 and (tex - raw).abs().mean() > 0.05
    assert tex[:, 0, 3].mean() < 0.5 < raw[:, 0, 3].mean()


def test_the_model_and_the_data_agree_on_the_label_layout():
    """The discriminator (zoo.models, which may not import zoo.data) keeps its own copy of the
    label length; the two must not drift apart."""
    from zoo.models.lsv import discriminator

    assert discriminator.LABEL_DIM == LABEL_DIM == 16 + 9 + 72 + 10


def test_an_epochs_evaluation_and_figures_render_the_ema_samples_once(tmp_path):
    task = LSVGANTask(tiny(), setup_distributed("cpu"))
    gan = task.build_model()
    calls = []
    render = gan.render_labels
    gan.render_labels = lambda *a, **k: calls.append(1) or render(*a, **k)
    task.evaluate(gan)
    task.epoch_figures(gan, 0, tmp_path, [{"train_loss_G": 1.0}])
    assert len(calls) == 1 and (tmp_path / "samples_epoch000.png").is_file()
    with torch.no_grad():  # the EMA moves (in place, as its update does): the samples are rendered again
        next(gan.G_ema.parameters()).mul_(0.5)
    task.evaluate(gan)
    assert len(calls) == 2
