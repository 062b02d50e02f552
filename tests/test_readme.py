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
