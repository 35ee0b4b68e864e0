"""`immunize attack`: fine-tune a (defended) model back into a harmful one under stated budgets,
or search the worst-case budget under a utility bound (``--search``, ``immunize.attacks.search``)."""

from __future__ import annotations

import argparse

from immunize.config import load_yaml, parse_config
from immunize.errors import ImmunizeError

HELP = ("attack a model under stated budgets (harmful SFT/LoRA, reversed-preference DPO, toxicity; --grid), "
        "or search the worst case (--search)")


def _attack_name(argv: list[str]) -> str:
    """The attack picks the config class, so read it first: the flag, else the YAML key, else sft."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--attack")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.attack:
        return known.attack
    if known.config:
        return str(load_yaml(known.config).get("attack", "sft"))
    return "sft"


def parse_command(argv: list[str]):
    """The validated attack config and search options of ``argv`` (flags over ``--config``), without
    running anything."""
    from immunize.attacks import available_attacks, get_attack
    from immunize.attacks.arguments import GRID_HELP
    from immunize.attacks.search import SearchArguments, check_search

    attack = get_attack(_attack_name(argv))
    catalogue = "; ".join(f"{name}: {summary}" for name, summary in available_attacks().items())
    description = (f"{HELP}. Attacks (--attack NAME --help shows an attack's own options): {catalogue}. "
                   f"Grid: {GRID_HELP}. Runs go to OUTPUT_DIR/RUN_ID; finished runs are skipped, "
                   "interrupted ones resume. --search: Optuna TPE over the --search_* space, each trial an attack "
                   "run in OUTPUT_DIR/trials, the study in OUTPUT_DIR/study.db, the result in OUTPUT_DIR/search.json.")
    cfg, search = parse_config([attack.config_class, SearchArguments], argv, prog="immunize attack",
                               description=description)
    if search.search:
        check_search(cfg, search)
        return cfg, search
    if changed := search.changed():
        raise ImmunizeError(f"--{changed[0]}: a search option; add --search to run a search")
    from immunize.attacks.grid import expand_grid

    expand_grid(cfg)  # builds every point's config: a bad value anywhere in the grid fails before anything runs
    return cfg, search


def parse(argv: list[str]):
    """The validated attack config of ``argv`` (its search options checked too)."""
    return parse_command(argv)[0]


def main(argv: list[str]) -> int:
    cfg, search = parse_command(argv)
    if search.search:
        from immunize.attacks.search import RESULT_FILE, run_search

        result = run_search(cfg, search, report=print)
        print(f"\n{result['summary']} (result: {cfg.output_dir}/{RESULT_FILE})")
        return 0
    from immunize.attacks import run_attacks
    from immunize.attacks.runner import describe

    results = run_attacks(cfg, report=print)
    print(f"\n{len(results)} run(s) in {cfg.output_dir} (index: attacks.jsonl)")
    for result in results:
        print(f"  {result.run_id}  {result.status}: {describe(result)}")
    return 0
