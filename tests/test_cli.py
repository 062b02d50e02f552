"""The `zoo` command: output, exit codes, and errors without tracebacks."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import zoo
from zoo import registry
from zoo.cli import main
from zoo.hub import WeightEntry
from zoo.io import sha256_file


def test_list_table_json_markdown(capsys):
    assert main(["list", "efficientvit_m[01]"]) == 0
    out = capsys.readouterr().out
    assert "efficientvit_m0" in out and "efficientvit_m1" in out and "efficientvit_m2" not in out
    assert "2.35M" in out  # computed params of m0
    assert main(["list", "--format", "json", "--task", "image-classification"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in cards} == set(zoo.list_models(task="image-classification"))
    assert main(["list", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("| model | family |")


def test_info(capsys):
    assert main(["info", "efficientvit_m5"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["config"]["depth"] == [1, 3, 4] and card["complexity"]["params"] > 12e6


def test_errors_are_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "zoo", "info", "efficientvit_m9"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no model named 'efficientvit_m9'")
    assert "Traceback" not in proc.stderr


def test_download_prints_path_and_sha256(http_root, monkeypatch, capsys, zoo_home):
    root, base = http_root
    save_file({"w": torch.zeros(3)}, str(root / "w.safetensors"))
    digest = sha256_file(root / "w.safetensors")
    entry = WeightEntry("t", f"{base}/w.safetensors", sha256=digest, format="safetensors")
    card = dataclasses.replace(zoo.model_card("efficientvit_m0"), weights={"t": entry}, default_tag="t")
    monkeypatch.setitem(registry._REGISTRY, "efficientvit_m0", card)
    assert main(["download", "efficientvit_m0"]) == 0
    path, sha = capsys.readouterr().out.split("\n")[:2]
    assert path == str(zoo_home / "weights" / "efficientvit_m0" / "t" / "w.safetensors")
    assert sha == f"sha256 {digest}"
    assert main(["download", "efficientvit_m0", "--tag", "nope"]) == 2


def test_download_offline_exits_2_with_the_path(monkeypatch, capsys, zoo_home):
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    assert main(["download", "efficientvit_m2", "--tag", "official"]) == 2
    err = capsys.readouterr().err
    assert str(zoo_home / "weights" / "efficientvit_m2" / "official" / "efficientvit_m2.pth") in err


@pytest.mark.slow
def test_demo_writes_a_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "models.json").read_text())
    assert set(report) == set(zoo.list_models())


def test_demo_render_writes_the_shells_picture(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from zoo.cli.demo import demo_render

    demo_render(tmp_path)
    img = np.asarray(Image.open(tmp_path / "render_shells.png")).astype(int)
    assert img.shape == (384, 384, 3)
    assert (img[0, 0] == 255).all()  # background corner
    r, b = img[..., 0], img[..., 2]
    assert ((r - b) > 80).sum() > 5000 and ((b - r) > 80).sum() > 5000  # both shells visible
    assert "4 depth-peeled layers" in capsys.readouterr().out


def test_export_writes_both_formats_and_the_report(tmp_path, capsys):
    pytest.importorskip("coremltools")
    out = tmp_path / "out"
    assert main(["export", "efficientvit_m0", "--format", "onnx", "coreml", "--out", str(out), "--img-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "rel " in printed and "structural only" in printed and "export-report.json" in printed
    assert sorted(p.name for p in out.iterdir()) == ["efficientvit_m0.mlpackage", "efficientvit_m0.onnx",
                                                     "export-report.json"]
    report = json.loads((out / "export-report.json").read_text())
    assert report["model"] == "efficientvit_m0" and report["zoo_version"] == zoo.__version__
    onnx_r, coreml_r = report["exports"]
    assert onnx_r["format"] == "onnx" and onnx_r["path"] == "efficientvit_m0.onnx"
    assert onnx_r["files"][0]["sha256"] == sha256_file(out / "efficientvit_m0.onnx")
    assert onnx_r["inputs"][0]["shape"] == ["batch", 3, 64, 64] and onnx_r["verified"]
    assert [c["batch_size"] for c in onnx_r["comparisons"]] == [1, 3]
    assert coreml_r["format"] == "coreml" and coreml_r["inputs"][0] == {
        "name": "image", "kind": "image", "shape": [64, 64], "dtype": "RGB"}
    assert coreml_r["precision"] == "fp16" and "op_histogram" in coreml_r["details"]


def test_export_fixed_batch_and_opset(tmp_path):
    out = tmp_path / "out"
    assert main(["export", "efficientformerv2_s0", "--format", "onnx", "--out", str(out), "--img-size", "64",
                 "--batch-size", "2", "--exporter", "torchscript", "--opset", "17", "--no-reparam"]) == 0
    r = json.loads((out / "export-report.json").read_text())["exports"][0]
    assert r["inputs"][0]["shape"] == [2, 3, 64, 64] and r["details"]["opset"] == 17 and not r["reparameterized"]
    assert [c["batch_size"] for c in r["comparisons"]] == [2]
    import onnx

    dims = onnx.load(str(out / "efficientformerv2_s0.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 64, 64]
    # --dynamic-batch with --batch-size: traced and checked at 2, the batch left symbolic
    dyn = tmp_path / "dyn"
    assert main(["export", "efficientformerv2_s0", "--format", "onnx", "--out", str(dyn), "--img-size", "64",
                 "--batch-size", "2", "--dynamic-batch", "--exporter", "torchscript", "--opset", "17"]) == 0
    dims = onnx.load(str(dyn / "efficientformerv2_s0.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]


@pytest.mark.parametrize("argv,message", [
    (["efficientvit_m9"], "no model named 'efficientvit_m9'"),
    (["efficientvit_m0", "--opset", "16"], "opsets 18-"),
    (["efficientvit_m0", "--img-size", "100"], "multiple of 16"),
    (["psf_tiny", "--img-size", "64"], "--img-size is for image models"),
])
def test_export_errors_leave_the_output_folder_empty(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", *argv, "--format", "onnx", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


def test_export_to_an_unwritable_place(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "efficientvit_m0", "--format", "onnx", "--out", str(blocker / "out")]) == 2
    assert "cannot write to" in capsys.readouterr().err


def test_benchmark_against_timm_on_torch_and_onnxruntime(tmp_path, capsys):
    csv_path = tmp_path / "bench.csv"
    argv = ["benchmark", "efficientvit_m0", "--backend", "torch", "onnxruntime", "--compare", "timm",
            "--img-size", "64", "--reps", "3", "--warmup", "1", "--threads", "1", "--csv", str(csv_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "zoo/timm" in out and "onnxruntime" in out
    import csv

    from zoo.flops import count_params

    rows = list(csv.DictReader(csv_path.open()))
    assert [r["backend"] for r in rows] == ["torch", "onnxruntime"]
    for r in rows:
        assert r["model"] == "efficientvit_m0" and r["peer"] == "timm" and r["threads"] == "1"
        assert float(r["median_ms"]) > 0 and float(r["p90_ms"]) >= float(r["median_ms"])
        assert abs(float(r["ratio"]) - float(r["median_ms"]) / float(r["peer_median_ms"])) < 1e-9
        assert float(r["max_rel_diff"]) < 1e-4, "same weights in both, so the outputs agree"
        assert int(r["params"]) == count_params(zoo.create_model("efficientvit_m0", img_size=64))
        assert int(r["img_size"]) == 64


def test_benchmark_names_and_errors(capsys):
    from zoo.benchmark import expand_names

    assert expand_names(["efficientvit", "efficientvit_m0"]) == zoo.list_models(family="efficientvit")
    assert expand_names(["efficientformer_l*"]) == ["efficientformer_l1", "efficientformer_l3", "efficientformer_l7"]
    assert main(["benchmark", "efficientvit_m9"]) == 2
    assert "no model named" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["benchmark", "efficientvit_m0", "--backend", "cuda"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main(["benchmark", "efficientvit_m0", "--dtype", "fp16"]) == 2
    assert "cuda backend" in capsys.readouterr().err
    # a name timm lacks is refused before the first model is timed
    assert main(["benchmark", "efficientvit_m0", "efficientformer_supernet", "--compare", "timm", "--reps", "1"]) == 2
    captured = capsys.readouterr()
    assert "timm has no model named efficientformer_supernet" in captured.err and "efficientvit_m0" not in captured.out


@pytest.mark.parametrize("name", ["efficientvit_m0", "efficientformer_l1", "efficientformerv2_s0", "psf_tiny"])
def test_info_benchmark_and_export_work_or_refuse_clearly_for_every_family(name, tmp_path, capsys):
    """Each command either works or ends in a ZooError's one-line message (status 2), never a
    traceback: this once ended in a bare KeyError for psf_tiny."""
    assert main(["info", name]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == name
    small = ["--img-size", "64"] if zoo.model_card(name).input.kind == "image" else []
    assert main(["benchmark", name, "--reps", "1", "--warmup", "0", "--quiet", *small]) == 0
    assert name in capsys.readouterr().out
    status = main(["export", name, "--format", "onnx", "--out", str(tmp_path / "out"), *small])
    err = capsys.readouterr().err
    assert status == 0 or (status == 2 and err.startswith("error: ")), err
    if status == 0:
        assert (tmp_path / "out" / f"{name}.onnx").is_file()


def test_zoo_debug_prints_the_traceback_and_its_cause(monkeypatch, capsys):
    assert main(["info", "efficientvit_m9"]) == 2
    quiet = capsys.readouterr().err
    assert quiet.startswith("error: no model named") and "Traceback" not in quiet
    monkeypatch.setenv("ZOO_DEBUG", "1")
    assert main(["info", "efficientvit_m9"]) == 2
    loud = capsys.readouterr().err
    assert "Traceback (most recent call last)" in loud and "UnknownModelError" in loud
    assert loud.rstrip().splitlines()[-1].startswith("error: no model named")
