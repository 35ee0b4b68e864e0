"""The HTML report of a run: ``build_report(run_dir)`` reads ``run_dir/results.json`` (schema in
SCHEMA.md next to this file) and writes a self-contained ``run_dir/report/index.html``."""

from immunize.report.build import SECTION_IDS, build_report, render_html
from immunize.report.schema import SCHEMA_VERSION, load_results, validate_results

__all__ = ["SCHEMA_VERSION", "SECTION_IDS", "build_report", "load_results", "render_html", "validate_results"]
