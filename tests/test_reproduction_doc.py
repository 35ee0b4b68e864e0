"""The write-ups in docs/ say what their runs measured: every table is the one its published results render.

Each run's results.json, stripped of generations, per-example outcomes and local paths
(``immunize report RUN --publish docs --markdown docs/DOC.md``), is committed beside its write-up; the
tables between the write-up's ``<!-- BEGIN … -->`` markers must be exactly what those results render, so an
edited number or a re-run that was not re-published fails here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from immunize.report import validate_results
from immunize.report.publish import DOC_FIGURES, markdown_blocks, publishable, stale_blocks

DOCS = Path(__file__).resolve().parents[1] / "docs"


@dataclass(frozen=True)
class WriteUp:
    doc: str  # docs/<doc>
    stem: str  # docs/<stem>_results.json and docs/<stem>/ (figures)
    run: str  # the run's name
    recipe: str
    blocks: tuple[str, ...]  # tables it must show

    def results(self) -> dict:
        return json.loads((DOCS / f"{self.stem}_results.json").read_text())


WRITE_UPS = [
    WriteUp("reproduction.md", "reproduce_smollm2", "reproduce-smollm2", "recipes/reproduce_smollm2.yaml",
            ("main-table", "verdict-table", "held-out-table")),
    WriteUp("worst_case.md", "worst_case", "worst-case", "recipes/worst_case.yaml",
            ("main-table", "verdict-table", "worst-case-table")),
    WriteUp("rlhf.md", "rlhf", "rlhf", "recipes/rlhf.yaml", ("main-table", "verdict-table", "feedback-table")),
]


@pytest.mark.parametrize("write_up", WRITE_UPS, ids=lambda w: w.doc)
def test_the_published_results_are_a_run_of_the_recipe_and_hold_nothing_unpublishable(write_up):
    results = write_up.results()
    validate_results(results)
    assert results["run"]["name"] == write_up.run
    assert publishable(results) == results  # no generations, per-example outcomes or local paths
    assert f"immunize run --config {write_up.recipe}" in " ".join(results["run"]["provenance"]["command"])


@pytest.mark.parametrize("write_up", WRITE_UPS, ids=lambda w: w.doc)
def test_every_table_of_the_write_up_is_what_the_published_results_render(write_up):
    text = (DOCS / write_up.doc).read_text()
    blocks = markdown_blocks(write_up.results())
    assert all(f"<!-- BEGIN {name} -->" in text for name in write_up.blocks)
    assert stale_blocks(text, blocks) == []


@pytest.mark.parametrize("write_up", WRITE_UPS, ids=lambda w: w.doc)
def test_the_figures_the_write_up_shows_are_published(write_up):
    text = (DOCS / write_up.doc).read_text()
    for name in DOC_FIGURES:
        if f"{write_up.stem}/{name}.png" in text:
            assert (DOCS / write_up.stem / f"{name}.png").stat().st_size > 1000
    assert f"{write_up.stem}/resistance_curves.png" in text
