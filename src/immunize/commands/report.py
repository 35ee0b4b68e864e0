"""`immunize report RUN_DIR [--compare A:B ...] [--publish DIR] [--markdown FILE]`: rebuild a run's
HTML report from its results.json alone, and publish the run for a public write-up."""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from immunize.config import parse_config, positional
from immunize.errors import ImmunizeError
from immunize.io import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    check_output_file,
    publish_dir,
    read_text,
)

HELP = "rebuild RUN_DIR/report/index.html (self-contained HTML) from RUN_DIR/results.json"


@dataclass
class ReportConfig:
    run_dir: str | None = field(default=None, metadata={
        "help": "run directory holding results.json (or give it as the first argument)"})
    phi: float | None = field(default=None, metadata={
        "help": "recompute the verdict with this harmfulness threshold instead of the run's"})
    epsilon: float | None = field(default=None, metadata={
        "help": "recompute the verdict with this capability tolerance instead of the run's"})
    compare: list[str] = field(default_factory=list, metadata={
        "help": "add paired comparisons of two rows each, A:B (defence labels), e.g. repnoise-lens8:repnoise; "
                "computed from results.json's per-example outcomes"})
    publish: str | None = field(default=None, metadata={
        "help": "also write DIR/NAME_results.json (results.json without generations, per-example outcomes or "
                "local paths: fit for a public repository) and the report's resistance-curve and depth "
                "figures to DIR/NAME/"})
    publish_name: str | None = field(default=None, metadata={
        "help": "NAME of --publish (default: the run's name, dashes as underscores)"})
    markdown: str | None = field(default=None, metadata={
        "help": "fill the <!-- BEGIN name --> ... <!-- END name --> blocks of this markdown file, in place, with "
                "the run's tables (main-table, verdict-table, stability-table, held-out-table, comparisons-table, "
                "run-table)"})


def _name(results: dict, given: str | None) -> str:
    name = given or str(results["run"].get("name") or "").replace("-", "_")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ImmunizeError(f"--publish: {name!r} is not a file name: give one with --publish_name NAME")
    return name


def _prepare(cfg: ReportConfig, run_dir: Path) -> tuple[dict, str, str | None]:
    """The published results, their name and the filled markdown text: all computed (and every
    error raised) before anything is written."""
    from immunize.report import load_results
    from immunize.report.publish import fill_blocks, markdown_blocks, publishable

    if cfg.phi is not None or cfg.epsilon is not None:
        raise ImmunizeError("--publish and --markdown publish the verdict the run recorded: drop --phi/--epsilon")
    results = publishable(load_results(run_dir))
    name = ""
    if cfg.publish:
        name = _name(results, cfg.publish_name)
        check_output_dir(cfg.publish, "--publish")
    if not cfg.markdown:
        return results, name, None
    check_output_file(cfg.markdown, "--markdown")
    try:
        text = fill_blocks(read_text(cfg.markdown), markdown_blocks(results))
    except ImmunizeError as err:
        raise ImmunizeError(f"--markdown {cfg.markdown}: {err}") from None
    return results, name, text


def _write(cfg: ReportConfig, results: dict, name: str, text: str | None, figures: Path) -> list[Path]:
    from immunize.report.publish import DOC_FIGURES

    written = []
    if cfg.publish:
        out = Path(cfg.publish)
        out.mkdir(parents=True, exist_ok=True)
        # The figures are gathered beside their directory and swapped in whole, as the report is.
        staging = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}."))
        try:
            for figure in DOC_FIGURES:
                if (figures / f"{figure}.png").is_file():
                    shutil.copyfile(figures / f"{figure}.png", staging / f"{figure}.png")
            written.append(publish_dir(staging, out / name))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        written.append(atomic_write_json(out / f"{name}_results.json", results))
    if text is not None:
        written.append(atomic_write_text(cfg.markdown, text))
    return written


def main(argv: list[str]) -> int:
    # `immunize report RUN_DIR [options]`: the positional form is the natural one for a directory.
    (cfg,) = parse_config([ReportConfig], positional(argv, "run_dir"), prog="immunize report", description=HELP)
    if not cfg.run_dir:
        raise ImmunizeError("give the run directory: immunize report RUN_DIR")
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise ImmunizeError(f"{run_dir}: run directory not found")
    check_output_dir(run_dir, "--run_dir")  # the report is built inside it, then swapped in
    from immunize.report import build_report

    published = _prepare(cfg, run_dir) if cfg.publish or cfg.markdown else None
    index = build_report(run_dir, phi=cfg.phi, epsilon=cfg.epsilon, compare=cfg.compare)
    print(index)
    if published:
        for path in _write(cfg, *published, index.parent / "figures"):
            print(path)
    return 0
