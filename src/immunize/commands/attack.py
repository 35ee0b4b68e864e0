"""`immunize attack`: fine-tune a (defended) model back into a harmful one under stated budgets."""

from __future__ import annotations

import argparse

from immunize.config import load_yaml, parse_config

HELP = "attack a model under stated budgets (harmful SFT/LoRA, reversed-preference DPO, toxicity; --grid)"


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


def parse(argv: list[str]):
    """The validated attack config of ``argv`` (flags over ``--config``), without running anything."""
    from immunize.attacks import available_attacks, get_attack
    from immunize.attacks.arguments import GRID_HELP

    attack = get_attack(_attack_name(argv))
    catalogue = "; ".join(f"{name}: {summary}" for name, summary in available_attacks().items())
    description = (f"{HELP}. Attacks (--attack NAME --help shows an attack's own options): {catalogue}. "
                   f"Grid: {GRID_HELP}. Runs go to OUTPUT_DIR/RUN_ID; finished runs are skipped, "
                   "interrupted ones resume.")
    (cfg,) = parse_config([attack.config_class], argv, prog="immunize attack", description=description)
    from immunize.attacks.grid import expand_grid

    expand_grid(cfg)  # builds every point's config: a bad value anywhere in the grid fails before anything runs
    return cfg


def main(argv: list[str]) -> int:
    from immunize.attacks import run_attacks
    from immunize.attacks.runner import describe

    cfg = parse(argv)
    results = run_attacks(cfg, report=print)
    print(f"\n{len(results)} run(s) in {cfg.output_dir} (index: attacks.jsonl)")
    for result in results:
        print(f"  {result.run_id}  {result.status}: {describe(result)}")
    return 0
