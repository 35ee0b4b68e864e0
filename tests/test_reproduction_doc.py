"""docs/reproduction.md says what its run measured: every table is the one its published results render.

The run's results.json, stripped of generations, per-example outcomes and local paths
(``immunize report RUN --publish docs --markdown docs/reproduction.md``), is committed beside the
write-up; the tables between its ``<!-- BEGIN … -->`` markers must be exactly what those results
render, so an edited number or a re-run that was not re-published fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

from immunize.report import validate_results
from immunize.report.publish import DOC_FIGURES, markdown_blocks, publishable, stale_blocks

DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = DOCS / "reproduce_smollm2_results.json"
FIGURES = DOCS / "reproduce_smollm2"


def _results() -> dict:
    return json.loads(RESULTS.read_text())


def test_the_published_results_are_a_run_of_the_recipe_and_hold_nothing_unpublishable():
    results = _results()
    validate_results(results)
    assert results["run"]["name"] == "reproduce-smollm2"
    assert publishable(results) == results  # no generations, per-example outcomes or local paths
    assert "immunize run --config recipes/reproduce_smollm2.yaml" in " ".join(results["run"]["provenance"]["command"])


def test_every_table_of_the_write_up_is_what_the_published_results_render():
    text = (DOCS / "reproduction.md").read_text()
    blocks = markdown_blocks(_results())
    assert all(f"<!-- BEGIN {name} -->" in text for name in ("main-table", "verdict-table", "held-out-table"))
    assert stale_blocks(text, blocks) == []


def test_the_figures_the_write_up_shows_are_published():
    text = (DOCS / "reproduction.md").read_text()
    for name in DOC_FIGURES:
        if f"reproduce_smollm2/{name}.png" in text:
            assert (FIGURES / f"{name}.png").stat().st_size > 1000
    assert "reproduce_smollm2/resistance_curves.png" in text
