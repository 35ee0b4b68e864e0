"""`immunize run`: the whole experiment from a recipe (align → defend → attack → evaluate → report)."""

from __future__ import annotations

HELP = ("run a whole experiment from a recipe: align, defend, attack, evaluate, explain, report. "
        "Recipe entries are set with dotted flags: --defences.LABEL.OPTION VALUE, "
        "--attacks.LABEL.OPTION VALUE, --attacks.LABEL.grid.OPTION V1,V2, --align.OPTION VALUE, --align false, "
        "--search.OPTION VALUE (the worst-case search: attack, seeds and the search_* options), --search false")


def main(argv: list[str]) -> int:
    from immunize.pipeline.recipe import parse_run_config
    from immunize.pipeline.run import Experiment

    cfg = parse_run_config(argv, prog="immunize run", description=HELP)
    experiment = Experiment(cfg)
    experiment.argv = list(argv)
    report = experiment.run()
    print(f"results: {experiment.root / 'results.json'}\nreport:  {report}")
    return 0
