"""The README's model table is what `zoo list --format markdown` prints now."""
from __future__ import annotations

from pathlib import Path

from zoo.registry import list_models
from zoo.tables import MODEL_HEADERS, format_table, model_rows

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- zoo-list:start -->", "<!-- zoo-list:end -->"


def test_readme_model_table_is_current():
    text = README.read_text()
    assert START in text and END in text, "README lost its generated-table markers"
    table = text.split(START, 1)[1].split(END, 1)[0].strip()
    expected = format_table(model_rows(list_models()), MODEL_HEADERS, "markdown")
    assert table == expected, "README table is stale: regenerate it with `zoo list --format markdown`"


def test_readme_starts_with_the_two_commands():
    head = README.read_text()[:1500]
    assert "make test" in head and "make demo" in head


ROOT = README.parent
RESULTS = ROOT / "docs" / "results"


def test_readme_is_short_and_every_relative_link_resolves():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    import re

    for page in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_every_results_file_names_its_command_date_and_environment():
    files = sorted(p for p in RESULTS.glob("*.md") if p.name != "README.md")
    assert files
    import re

    for path in files:
        head = path.read_text().splitlines()[:6]
        assert head[0].startswith("# "), path.name
        written = next(line for line in head if line.startswith("Written by `python benchmarks/"))
        assert re.search(r"on \d{4}-\d{2}-\d{2}", written), path.name
        script = written.split("`python ", 1)[1].split()[0].rstrip("`")
        assert (ROOT / script).is_file(), f"{path.name}: {script} is not in the repository"
        assert any(line.startswith("Environment: ") and "torch" in line for line in head), path.name


def test_results_file_writes_the_header_and_the_output_and_nothing_on_error(tmp_path, capsys):
    from zoo.tables import results_file

    out = tmp_path / "r.md"
    with results_file(out, "A title"):
        print("| a |\n|---|\n| 1 |")
    text = out.read_text()
    assert text.startswith("# A title\n\nWritten by `python ") and "Environment: " in text
    assert text.rstrip().endswith("| 1 |") and "| a |" in capsys.readouterr().out
    failed = tmp_path / "failed.md"
    try:
        with results_file(failed, "t"):
            print("partial")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not failed.exists()
