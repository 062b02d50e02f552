"""zoo train / zoo validate on a generated pattern dataset: learning, checkpoints, exact resume,
torchrun, bad input."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.cli.train import parse_train_args, run_train
from zoo.data.patterns import make_pattern_folder

# Small enough for CPU, strong enough to learn stripes from scratch in a few epochs.
BASE = ["--model", "efficientvit_m0", "--img-size", "32", "-b", "8", "--lr", "3e-3", "--workers", "0",
        "--scale", "0.6", "1.0", "--color-jitter", "0", "--smoothing", "0", "--log-interval", "0", "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pattern_folder(tmp_path_factory.mktemp("patterns"), num_classes=2, train_per_class=32,
                               val_per_class=12, size=32)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = ["train", *BASE, "--data-dir", str(data), "--epochs", "8", "--output", str(out), "--experiment", "run",
            "--model-ema", "--model-ema-decay", "0.9"]
    assert main(argv) == 0
    return out / "run"


def test_training_beats_chance_and_writes_timm_outputs(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["args.yaml", "last.pth.tar", "model_best.pth.tar",
                                                         "summary.csv"]
    rows = list(csv.DictReader((trained / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(8))
    assert {"train_loss", "eval_top1", "eval_top5", "eval_loss", "lr"} <= set(rows[0])
    # the rate each epoch trained with, as timm's train.py writes it: the first epoch at the
    # base rate (no warm-up), then the cosine's decreasing rates, the last one still above 0
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(3e-3) and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0
    best = max(float(r["eval_top1"]) for r in rows)
    assert best >= 70.0, f"chance is 50%; best top-1 {best}"
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    ckpt = torch.load(trained / "model_best.pth.tar", map_location="cpu", weights_only=True)
    assert {"epoch", "arch", "state_dict", "state_dict_ema", "optimizer", "args", "metric"} <= set(ckpt)
    assert ckpt["arch"] == "efficientvit_m0" and ckpt["metric"] == best
    assert ckpt["args"]["model"] == "efficientvit_m0"


def test_checkpoint_loads_through_create_model_and_timm(trained):
    import timm

    sd = torch.load(trained / "last.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    ours = zoo.create_model("efficientvit_m0", pretrained=str(trained / "last.pth.tar"), num_classes=2, img_size=32)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in sd.items())
    ref = timm.create_model("efficientvit_m0", num_classes=2, img_size=32)
    timm.models.load_checkpoint(ref, str(trained / "last.pth.tar"), use_ema=False)  # timm's own loader
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ref.eval()(x), ours(x), atol=1e-5)


def test_validate_reproduces_the_logged_metric_before_and_after_reparam(trained, data, capsys):
    rows = list(csv.DictReader((trained / "summary.csv").open()))
    best = max(float(r["eval_top1"]) for r in rows)
    from zoo.cli.train import run_validate
    import argparse

    args = argparse.Namespace(model="efficientvit_m0", checkpoint=str(trained / "model_best.pth.tar"),
                              data_dir=str(data), split="val", img_size=32, batch_size=16, workers=0, use_ema=True,
                              reparam=True)
    result = run_validate(args)
    assert abs(result["top1"] - best) < 1e-6, "EMA weights picked the best checkpoint, so validate them"
    assert abs(result["reparam"]["top1"] - result["top1"]) < 1e-6 and abs(result["reparam"]["loss"] - result["loss"]) < 1e-4
    assert main(["validate", "--model", "efficientvit_m0", "--checkpoint", str(trained / "model_best.pth.tar"),
                 "--data-dir", str(data), "--img-size", "32", "--use-ema", "--workers", "0"]) == 0
    assert f"top-1 {best:.3f}" in capsys.readouterr().out


class StopAfter:
    def __init__(self, epoch: int):
        self.epoch = epoch

    def __call__(self, engine, epoch, metrics):
        if epoch == self.epoch:
            raise KeyboardInterrupt  # as if the run were killed right after this epoch's checkpoint


def test_resume_is_exact(data, tmp_path):
    common = [*BASE, "--data-dir", str(data), "--epochs", "4", "--output", str(tmp_path), "--mixup", "0.2",
              "--model-ema", "--drop-path", "0.1", "--grad-accum-steps", "2", "--clip-grad", "1.0"]
    run_train(parse_train_args([*common, "--experiment", "full"]))
    with pytest.raises(KeyboardInterrupt):
        run_train(parse_train_args([*common, "--experiment", "cut"]), callbacks=[StopAfter(1)])
    assert torch.load(tmp_path / "cut" / "last.pth.tar", weights_only=True)["epoch"] == 1
    run_train(parse_train_args([*common, "--resume", str(tmp_path / "cut" / "last.pth.tar")]))
    a = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pth.tar", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in ("state_dict", "state_dict_ema"):
        for k, v in a[key].items():
            if v.is_floating_point():
                assert (v - b[key][k]).abs().max().item() <= 1e-6, (key, k)
    rows = list(csv.DictReader((tmp_path / "cut" / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3], "the resumed run appends to its summary"


def test_yaml_config_and_flag_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: efficientvit_m0\nepochs: 7\nlr: 0.01\nmodel-ema: true\n")
    args = parse_train_args(["-c", str(cfg), "--lr", "0.02"])
    assert (args.model, args.epochs, args.lr, args.model_ema) == ("efficientvit_m0", 7, 0.02, True)
    cfg.write_text("modle: x\n")
    with pytest.raises(zoo.ConfigError, match="unknown options"):
        parse_train_args(["-c", str(cfg)])


def test_bad_input_fails_before_training(data, tmp_path, capsys):
    run = lambda *extra: main(["train", *BASE, "--epochs", "1", "--output", str(tmp_path / "o"), *extra])  # noqa: E731
    assert run("--data-dir", str(tmp_path / "missing")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run("--data-dir", str(data), "--num-classes", "5") == 2
    assert "--num-classes 5 disagrees with the 2 class folders" in capsys.readouterr().err
    empty = make_pattern_folder(tmp_path / "d", 2, 2, 2, 16)
    (empty / "train" / "extra").mkdir()
    assert run("--data-dir", str(empty)) == 2
    assert "['extra']" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert run("--data-dir", str(data), "--model", "efficientvit_m9") == 2
    assert "no model named" in capsys.readouterr().err
    other = tmp_path / "other.pth.tar"
    torch.save({"arch": "efficientformer_l1", "state_dict": {}}, other)
    assert run("--data-dir", str(data), "--initial-checkpoint", str(other)) == 2
    assert "checkpoint of efficientformer_l1, not efficientvit_m0" in capsys.readouterr().err


def test_unreadable_images_are_counted_not_fatal(tmp_path, capsys):
    root = make_pattern_folder(tmp_path / "d", 2, 6, 2, 32)
    (root / "train" / "hstripes" / "broken.png").write_bytes(b"not a png")
    (root / "train" / "vstripes" / "cut.png").write_bytes((root / "train" / "vstripes" / "0000.png").read_bytes()[:60])
    assert main(["train", *BASE, "--data-dir", str(root), "--epochs", "1", "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    # the header check drops the non-image before training; the truncated one fails on decode
    # and is replaced by the next image, counted in the epoch's figures
    assert "1 unreadable image(s) skipped" in out and "broken.png" in out
    assert "train_skipped_images 1" in out


def _assert_is_a_count_over_the_val_images(best: dict, n_val: int = 24) -> None:
    """A real evaluation: top-1 and top-5 are whole counts out of the 24 validation images, top-5
    is at least top-1 (2 classes: top-5 is every image) and the loss is finite."""
    for key in ("top1", "top5"):
        count = best[key] * n_val / 100
        assert abs(count - round(count)) < 1e-6, (key, best[key])
    assert best["top5"] == pytest.approx(100.0) and best["top1"] <= best["top5"]
    assert math.isfinite(best["loss"]) and best["loss"] > 0


def test_distillation_into_the_distillation_head(data, tmp_path):
    teacher = zoo.create_model("efficientvit_m0", num_classes=2, img_size=32)
    from safetensors.torch import save_file

    save_file(teacher.state_dict(), tmp_path / "teacher.safetensors")
    argv = ["--model", "efficientformerv2_s0", "--img-size", "64", "-b", "8", "--workers", "0", "--epochs", "1",
            "--data-dir", str(data), "--output", str(tmp_path), "--experiment", "d", "--log-interval", "0",
            "--distill", "efficientvit_m0", "--distill-pretrained", str(tmp_path / "teacher.safetensors")]
    with pytest.raises(zoo.ConfigError, match="distillation head"):
        run_train(parse_train_args([*BASE, "--data-dir", str(data), "--epochs", "1", "--output", str(tmp_path),
                                    "--distill", "efficientvit_m0"]))
    best = run_train(parse_train_args(argv))
    _assert_is_a_count_over_the_val_images(best)
    sd = torch.load(tmp_path / "d" / "last.pth.tar", weights_only=True)["state_dict"]
    fresh = zoo.create_model("efficientformerv2_s0", num_classes=2, img_size=64).state_dict()
    assert not torch.equal(sd["head_dist.weight"], fresh["head_dist.weight"]), "the distillation head trained"


def test_torchrun_two_processes_gloo(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "zoo", "train", *BASE, "--data-dir", str(data), "--epochs", "2", "--device", "cpu",
           "--output", str(tmp_path), "--experiment", "ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["args.yaml", "last.pth.tar", "model_best.pth.tar",
                                                                     "summary.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"], "only rank 0 writes"
    assert proc.stdout.count("epoch 1:") == 1, "only rank 0 logs"
    rows = list(csv.DictReader((tmp_path / "ddp" / "summary.csv").open()))
    assert len(rows) == 2


def test_amp_on_cpu_trains_in_bfloat16(data, tmp_path):
    seen = []

    def spy(engine, epoch, metrics):
        with engine._autocast():
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    best = run_train(parse_train_args([*BASE, "--data-dir", str(data), "--epochs", "1", "--amp", "--output",
                                       str(tmp_path), "--experiment", "amp"]), callbacks=[spy])
    assert seen == [torch.bfloat16]
    _assert_is_a_count_over_the_val_images(best)
    sd = torch.load(tmp_path / "amp" / "last.pth.tar", weights_only=True)["state_dict"]
    assert all(v.dtype != torch.bfloat16 for v in sd.values()), "weights stay fp32 under autocast"
