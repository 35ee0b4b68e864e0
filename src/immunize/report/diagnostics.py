"""What each defence's training did, term by term: ``results.json["training"]`` and its report table.

The method runner copies the first and the last training log (``trainer.state.log_history``) of a
trained defence into its completion marker (``first_log``, ``last_log``). ``training_logs`` keeps
their numbers for ``results.json``; ``training_tables`` lays them out for the report: per trained
defence, the loss, its terms (RepNoise: stability, noise, ascent, the harmful CE at the output) and
the gradient norm of each term's weighted contribution (``grad_norm_<term>_last|layers|all``, see
``immunize.defences.repnoise``), first and last logged step side by side. Other defences' own log
values (Vaccine's, security vectors') are shown the same way, after the known ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOGS = ("first_log", "last_log")
# Trainer bookkeeping, not what the defence's loss did.
BOOKKEEPING = frozenset({"epoch", "step", "learning_rate", "num_input_tokens_seen"})
TERMS = {"stability": "stability: CE of the refusals", "noise": "noise: MMD to Gaussian noise (before β)",
         "ascent": "ascent: mean logit-lens CE of the harmful answers (before α)"}
GRAD_PLACES = {"last": "at the last decoder layer", "layers": "summed over decoder layers (Σ‖g_l‖)",
               "all": "over all decoder layers (‖g‖)"}
LABELS = {
    "loss": "loss",
    **TERMS,
    "harmful_ce": "harmful CE read at the output layer",
    **{f"grad_norm_{term}_{place}": f"‖∇ {weight}‖ {where}"
       for term, weight in (("stability", "stability"), ("noise", "β·noise"), ("ascent", "−α·f(ascent)"))
       for place, where in GRAD_PLACES.items()},
    "grad_norm_total": "‖∇ loss‖ of the whole step over every trained parameter",
    "grad_norm": "‖∇ loss‖ over every trained parameter (before clipping)",
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def training_logs(marker: Mapping[str, Any] | None) -> dict[str, dict[str, float]] | None:
    """The numbers of a defence marker's first and last training logs (``None``: it did not train)."""
    if not marker:
        return None
    out = {key: {k: v for k, v in log.items() if _number(v)}
           for key in LOGS if isinstance(log := marker.get(key), Mapping)}
    return out or None


def training_from_markers(models: Mapping[str, str | Path]) -> dict[str, dict[str, dict[str, float]]]:
    """``results.json["training"]`` for the defended models ``{label: checkpoint dir}``."""
    from immunize.method_runner import is_complete

    found = {label: training_logs(is_complete(path)) for label, path in models.items()}
    return {label: logs for label, logs in found.items() if logs}


@dataclass(frozen=True)
class TrainingTable:
    defence: str
    first_step: str
    last_step: str
    rows: list[tuple[str, str, str]]  # (label, first value, last value), formatted


def fmt(value: Any) -> str:
    """Four significant digits (gradient norms span orders of magnitude); "—" when absent."""
    return f"{value:.4g}" if _number(value) else "—"


def training_tables(results: Mapping[str, Any]) -> list[TrainingTable]:
    """One table per defence with training logs, in the order of ``results["defences"]``."""
    training = results.get("training") or {}
    order = [d for d in results.get("defences", []) if d in training]
    order += [d for d in training if d not in order]
    tables = []
    for defence in order:
        logs = training[defence] or {}
        first, last = (logs.get(key) or {} for key in LOGS)
        keys = [k for k in (*first, *last) if k not in BOOKKEEPING]
        known = [k for k in LABELS if k in keys]
        others = sorted(set(keys) - set(LABELS))
        rows = [(LABELS.get(k, k), fmt(first.get(k)), fmt(last.get(k))) for k in (*known, *others)]
        tables.append(TrainingTable(defence, fmt(first.get("step")), fmt(last.get("step")), rows))
    return tables
