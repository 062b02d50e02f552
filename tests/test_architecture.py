"""The dependency rule of ../shared/DESIGN.md, checked on every import statement, those inside
functions included.

import-linter checks the contracts inside ``zoo/`` (configured in pyproject.toml). It finds
subpackages by walking ``zoo/``'s folder, so it cannot see ``zoo.models``, ``zoo.render`` and
``zoo.export``, which live in ``models/``, ``render/`` and ``export/``; the AST walk below
checks the same table over every module of all four folders.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"zoo": "zoo", "models": "zoo.models", "render": "zoo.render", "export": "zoo.export"}

CORE = {"zoo._version", "zoo.features", "zoo.errors", "zoo.io", "zoo.hub", "zoo.registry", "zoo.nn", "zoo.flops", "zoo.tables", "zoo.testing", "zoo.boxes"}

# module prefix -> the zoo modules (prefixes) it may import; the first matching row applies
RULES: list[tuple[str, set[str]]] = [
    ("zoo.cli", {"*"}),  # the top: anything
    ("zoo.__main__", {"zoo.cli"} | CORE),
    ("zoo.benchmark", CORE | {"zoo.export"}),
    # slim measures what zoo.export writes (ONNX for onnxruntime, CoreML packages for a phone),
    # timing calls as zoo.benchmark does
    ("zoo.slim", CORE | {"zoo.models", "zoo.train", "zoo.data", "zoo.metrics", "zoo.export", "zoo.benchmark",
                         "zoo.slim"}),
    ("zoo.train", CORE | {"zoo.models", "zoo.data", "zoo.metrics", "zoo.train"}),
    ("zoo.data", CORE | {"zoo.data", "zoo.render"}),  # synthetic worlds render their camera images
    ("zoo.metrics", CORE | {"zoo.metrics", "zoo.data"}),  # a metric may read its dataset's format
    ("zoo.models", CORE | {"zoo.models", "zoo.render"}),
    ("zoo.export", CORE | {"zoo.export"}),
    ("zoo.render", {"zoo.errors", "zoo.render"}),
]
# core modules import core only; the face (``zoo``) may name zoo.models too: importing it is
# what registers the families, and `zoo.models` / `zoo.export` / `zoo.render` load on first use
CORE_RULES = {m: CORE for m in CORE}
CORE_RULES["zoo"] = CORE | {"zoo.models", "zoo.export", "zoo.render"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def zoo_imports(source: str, module: str, is_package: bool) -> set[str]:
    """Every ``zoo.*`` module named by an import statement anywhere in `source`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)  # `from zoo import models`
    return {n for n in found if n == "zoo" or n.startswith("zoo.")}


def allowed(module: str) -> set[str]:
    if module in CORE_RULES:
        return CORE_RULES[module]
    for prefix, ok in RULES:
        if module == prefix or module.startswith(prefix + "."):
            return ok
    raise AssertionError(f"{module} has no row in the dependency table; add it")


def permitted(target: str, ok: set[str]) -> bool:
    """`target` is one of `ok` or inside one; ``"*"`` allows anything. ``from zoo import X``
    also records ``zoo.X``: a name there that is no module of ours (``zoo.__version__``) is
    the face's attribute, and counts as importing the face."""
    if "*" in ok or any(target == p or target.startswith(p + ".") for p in ok):
        return True
    head, _, tail = target.partition(".")
    return head == "zoo" and "." not in tail and not (ROOT / "zoo" / tail).exists() \
        and not (ROOT / "zoo" / f"{tail}.py").exists() and tail not in _OUTSIDE and "zoo" in ok


_OUTSIDE = {"models", "render", "export"}


def all_modules() -> list[tuple[str, Path]]:
    out = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out.append((module_name(path), path))
    return out


def test_every_import_follows_the_dependency_table():
    violations = []
    for module, path in all_modules():
        ok = allowed(module)
        for target in zoo_imports(path.read_text(), module, path.name == "__init__.py"):
            if not permitted(target, ok):
                violations.append(f"{module} imports {target}")
    assert not violations, "\n".join(violations)


def test_nothing_but_the_entry_point_imports_the_cli():
    users = [m for m, p in all_modules() if not m.startswith("zoo.cli") and m != "zoo.__main__"
             and any(t.startswith("zoo.cli") for t in zoo_imports(p.read_text(), m, p.name == "__init__.py"))]
    assert not users


def test_the_checker_sees_imports_inside_functions_and_relative_ones():
    src = "def f():\n    from zoo.models import efficientvit\n    import zoo.cli\nfrom . import pointcloud\n"
    found = zoo_imports(src, "zoo.metrics", is_package=True)
    assert {"zoo.models", "zoo.models.efficientvit", "zoo.cli", "zoo.metrics.pointcloud"} <= found
    ok = allowed("zoo.metrics")
    assert not permitted("zoo.models.efficientvit", ok) and not permitted("zoo.cli", ok)
    assert permitted("zoo.metrics.pointcloud", ok) and permitted("zoo.errors", ok)
    assert not permitted("zoo.models", allowed("zoo.registry"))


def test_import_linter_contracts_hold():
    pytest.importorskip("importlinter")
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" not in r.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize("code, banned", [
    ("import zoo.export", ("zoo.models", "timm")),
    ("import zoo.render", ("zoo.models", "zoo.export", "timm")),
    ("import zoo", ("zoo.models", "zoo.export", "zoo.render", "timm")),
    ("import zoo.data.pointclouds, zoo.metrics", ("zoo.models", "zoo.train", "timm")),
])
def test_importing_a_part_loads_none_of_what_it_must_not_use(code, banned):
    probe = (f"import sys; {code}; "
             f"print([m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in {banned!r})])")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("folder", ["models", "render", "export"])
def test_bare_folder_names_refuse_to_import_a_second_copy(folder):
    probe = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {folder}"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode != 0 and f"import zoo.{folder} instead" in r.stderr
