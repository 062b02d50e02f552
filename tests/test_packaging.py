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
