"""Attacks: fine-tune a (defended) model back into a harmful one, the way an adversary would.

A registry of attacks (``ATTACKS``, one line each; ``get_attack``), budget grids with stable run ids,
and resistance curves (``ResistanceCurveCallback`` + ``StepScorer``). ``run_attacks`` runs a
config end to end; ``run_search`` searches the worst-case budget under a utility bound
(``immunize.attacks.search``); ``immunize attack`` is their command line.
"""

from immunize.attacks.arguments import AttackArguments, ReversedPreferenceArguments, ToxicityAttackArguments
from immunize.attacks.base import Attack
from immunize.attacks.curve import (
    CURVE_FILE,
    KeywordRefusalScorer,
    ResistanceCurveCallback,
    StepScorer,
    read_curve,
)
from immunize.attacks.data import AttackData
from immunize.attacks.grid import expand_grid, parse_grid, run_id
from immunize.attacks.registry import ATTACKS, attack_names, available_attacks, get_attack
from immunize.attacks.runner import PlannedRun, RunResult, plan_runs, run_attacks
from immunize.attacks.search import SearchArguments, run_search, validation_slice

__all__ = [
    "ATTACKS",
    "CURVE_FILE",
    "Attack",
    "AttackArguments",
    "AttackData",
    "KeywordRefusalScorer",
    "PlannedRun",
    "ResistanceCurveCallback",
    "ReversedPreferenceArguments",
    "RunResult",
    "SearchArguments",
    "StepScorer",
    "ToxicityAttackArguments",
    "attack_names",
    "available_attacks",
    "expand_grid",
    "get_attack",
    "parse_grid",
    "plan_runs",
    "read_curve",
    "run_attacks",
    "run_id",
    "run_search",
    "validation_slice",
]
