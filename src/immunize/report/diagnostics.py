"""What each defence's training did, term by term: ``results.json["training"]`` and its report table.

The method runner copies the first and the last training log (``trainer.state.log_history``) of a
trained defence into its completion marker (``first_log``, ``last_log``). ``training_logs`` keeps
their numbers for ``results.json``; ``training_tables`` lays them out for the report: per trained
defence, the loss, its terms (RepNoise: stability, noise, ascent, the harmful CE at the output) and
the gradient norm of each term's weighted contribution (``grad_norm_<term>_last|layers|all``, see
``immunize.defences.repnoise``), first and last logged step side by side. Other defences' own log
values (Vaccine's, security vectors') are shown the same way, after the known ones.

A defence trained on (harmful, refusal) pairs also records in its marker how its refusals were made
(``data.paired_refusals``, ``immunize.data.paired_refusals``: the source, how many it kept, what the
rest fell back to, the on-topic score); ``training_from_markers`` copies that summary beside the
logs and ``refusal_facts`` words it for the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOGS = ("first_log", "last_log")
REFUSALS = "paired_refusals"
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
    "grad_norm": "‖∇ loss‖ of the whole step over every trained parameter (before any clipping)",
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


def paired_refusals(marker: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The summary of how a defence marker's paired refusals were made (``None``: it made none)."""
    summary = ((marker or {}).get("data") or {}).get(REFUSALS)
    return dict(summary) if isinstance(summary, Mapping) else None


def training_from_markers(models: Mapping[str, str | Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """``results.json["training"]`` for the defended models ``{label: checkpoint dir}``: each one's
    first and last training logs and the summary of its paired refusals, where it has them."""
    from immunize.method_runner import is_complete

    found = {}
    for label, path in models.items():
        marker = is_complete(path)
        refusals = paired_refusals(marker)
        entry = {**(training_logs(marker) or {}), **({REFUSALS: refusals} if refusals else {})}
        if entry:
            found[label] = entry
    return found


@dataclass(frozen=True)
class TrainingTable:
    defence: str
    first_step: str
    last_step: str
    rows: list[tuple[str, str, str]]  # (label, first value, last value), formatted
    refusals: list[tuple[str, str]]  # (what, plain text) of its paired refusals; empty: none recorded


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
        tables.append(TrainingTable(defence, fmt(first.get("step")), fmt(last.get("step")), rows,
                                    refusal_facts(logs.get(REFUSALS))))
    return tables


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "—"


def refusal_facts(summary: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """A paired-refusals summary as (what, plain text) lines: source and fallback, prompts, kept,
    fell back, dropped, how the generated ones were made and judged, the on-topic score."""
    if not summary:
        return []
    source = str(summary.get("source", "?"))
    fallback = [str(step) for step in summary.get("fallback") or []]
    facts = [("Source", source + (f", falling back to {' then '.join(fallback)}" if fallback else "")),
             ("Prompts", _count(summary.get("prompts")))]
    fraction = summary.get("kept_fraction")
    share = f" ({fraction:.1%})" if _number(fraction) else ""
    facts.append(("Kept", f"{_count(summary.get('kept'))}{share} from {source}"))
    fell = {str(k): v for k, v in (summary.get("fell_back") or {}).items() if k != "drop"}
    facts.append(("Fell back", ", ".join(f"{_count(n)} to {step}" for step, n in fell.items()) or "none"))
    facts.append(("Dropped", _count(summary.get("dropped"))))
    generation = summary.get("generation") or {}
    for mode in ("own", "instructed"):
        if isinstance(made := generation.get(mode), Mapping):
            facts.append((f"Generated ({mode})", (
                f"{_count(made.get('generated'))} generated, {_count(made.get('from_cache'))} from the cache, "
                f"{_count(made.get('cut_at_max_new_tokens'))} cut at {_count(generation.get('max_new_tokens'))} "
                f"tokens, {_count(made.get('empty'))} empty; {_count(made.get('judged_refusals'))} judged "
                f"refusals (opening ≥ {fmt(made.get('threshold'))}, no later window complying)")))
    if isinstance(judge := summary.get("judge"), Mapping):
        instead = (f"; instead of {judge.get('requested')}: {judge['fallback_reason']}"
                   if judge.get("fallback_reason") else "")
        facts.append(("Refusal judge", f"{judge.get('name', '?')} (threshold {fmt(judge.get('threshold'))}){instead}"))
    on_topic = summary.get("on_topic")
    if isinstance(on_topic, Mapping):
        difference = on_topic.get("difference")
        facts.append(("On-topic score", (
            f"paired cosine {fmt(on_topic.get('paired'))}, shuffled {fmt(on_topic.get('shuffled'))}, "
            f"difference {f'{difference:+.4g}' if _number(difference) else '—'} "
            f"({_count(on_topic.get('pairs'))} pairs; encoder {on_topic.get('encoder', '?')})")))
    else:
        facts.append(("On-topic score", "not measured"))
    return facts
