"""`immunize defend`: run a registered defence on a model; writes a standard safetensors checkpoint."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

HELP = "defend a model against harmful fine-tuning (--defence NAME; --help lists them) into a safetensors checkpoint"


@dataclass
class DefenceChoice:
    defence: str = field(default="", metadata={"help": "the defence to run (see `immunize defend --help`)"})


def _chosen_defence(argv: list[str]) -> str | None:
    """``--defence`` from the flags, else the ``defence`` key of ``--config``."""
    from immunize.config import load_yaml

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--defence")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.defence:
        return known.defence
    if known.config:
        value = load_yaml(known.config).get("defence")
        return str(value) if value else None
    return None


def _usage() -> str:
    from immunize.defences import available_defences

    lines = ["usage: immunize defend --defence NAME [options]   (add --help for that defence's options)",
             "       immunize defend --config recipe.yaml", "", "defences:"]
    lines += [f"  {name:<18} {text}" for name, text in available_defences().items()]
    return "\n".join(lines)


def parse(argv: list[str]):
    """``(defence name, validated config)`` of ``argv``; ``None`` when only the usage was asked for."""
    from immunize.config import parse_config
    from immunize.defences import DEFENCES, available_defences, check_fixed, config_class
    from immunize.errors import ImmunizeError

    name = _chosen_defence(argv)
    if name is None:
        if any(arg in ("-h", "--help") for arg in argv):
            return None
        raise ImmunizeError(f"choose a defence with --defence (known: {', '.join(available_defences())})")
    entry = DEFENCES.entry(name)
    _, cfg = parse_config([DefenceChoice, config_class(name)], argv,
                          prog=f"immunize defend --defence {name}", description=entry.help)
    check_fixed(name, cfg)
    return name, cfg


def main(argv: list[str]) -> int:
    from immunize.method_runner import run_defence

    parsed = parse(argv)
    if parsed is None:
        print(_usage())
        return 0
    name, cfg = parsed
    out = run_defence(name, cfg)
    print(f"immunize defend: {name} finished; model in {out}")
    return 0
