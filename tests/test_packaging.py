"""A wheel built from the repo, installed into a fresh environment, imports from outside the repo."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_imports_outside_the_repo(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True,
    )
    (wheel,) = wheels.glob("zoo-*.whl")
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # Install the wheel into the fresh environment with this environment's pip (no index).
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        check=True,
    )
    # Dependencies (torch, timm...) come from this environment's site-packages: a path line in
    # a .pth adds the folder but does not run its .pth files, so our editable install stays out.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import zoo, zoo.models, zoo.render, zoo.export, zoo.cli; "
        "print(zoo.__file__); print(zoo.models.__file__); print(zoo.export.__file__); "
        "print(len(zoo.list_models('efficientvit_*'))); "
        "import torch, zoo.render as R; v, t = R.capsule(); "
        "p = R.world_to_clip(v, R.look_at((0, 0, 3.0), (0, 0, 0)), R.perspective(45)); "
        "print(int((R.rasterize(p, t, (32, 32))[0][..., 3] > 0).sum() > 0))"
    )
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert all(line.startswith(str(site)) for line in lines[:3]), lines
    assert lines[3] == "6"
    assert lines[4] == "1"  # zoo.render is packaged whole and rasterizes


def test_loading_a_model_needs_none_of_the_export_or_3d_extras():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for heavy in ("coremltools", "onnxruntime", "onnxscript", "onnx", "scipy"):
        assert heavy not in core, heavy
    extras = project["optional-dependencies"]
    assert {"export", "3d", "all"} <= set(extras)
    # and a model really loads, runs and deploys with those packages unimportable
    blocked = ["coremltools", "onnxruntime", "onnxscript", "onnx", "scipy"]
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); "
            "import torch, zoo; m = zoo.create_model('efficientvit_m0'); d = zoo.export.reparameterize(m); "
            "print(tuple(d(torch.randn(1, 3, 224, 224)).shape))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 1000)"


def test_a_missing_extra_is_a_zoo_error_naming_the_install(tmp_path, monkeypatch):
    import pytest
    import torch

    import zoo
    from zoo.metrics import emd

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(zoo.ZooError, match=r'pip install "zoo\[export\]"'):
        zoo.export.to_onnx("efficientvit_m0", tmp_path / "m.onnx", verbose=False)
    assert not list(tmp_path.iterdir())
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(zoo.ZooError, match=r'pip install "zoo\[3d\]"'):
        emd(torch.randn(1, 8, 3), torch.randn(1, 8, 3), exact=True)
