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
