"""`immunize run`: the whole experiment from a recipe (align → defend → attack → evaluate → report)."""

from __future__ import annotations

HELP = "run a whole experiment from a recipe: align, defend, attack, evaluate, explain, report"


def main(argv: list[str]) -> int:
    from immunize.config import parse_config
    from immunize.pipeline.recipe import RunConfig
    from immunize.pipeline.run import Experiment

    (cfg,) = parse_config([RunConfig], argv, prog="immunize run", description=HELP)
    experiment = Experiment(cfg)
    experiment.argv = list(argv)
    report = experiment.run()
    print(f"results: {experiment.root / 'results.json'}\nreport:  {report}")
    return 0
