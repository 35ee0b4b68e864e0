"""`immunize report RUN_DIR [--compare A:B ...]`: rebuild a run's HTML report from its results.json alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from immunize.config import parse_config, positional
from immunize.errors import ImmunizeError
from immunize.io import check_output_dir

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

    print(build_report(run_dir, phi=cfg.phi, epsilon=cfg.epsilon, compare=cfg.compare))
    return 0
