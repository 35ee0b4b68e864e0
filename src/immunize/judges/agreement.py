"""How well judges agree with a person's labels on the sheet of a judge audit.

``judge_agreement(LABELS)`` reads a labelling sheet that ``immunize judge audit`` wrote and a person
filled in (``labels.jsonl`` or ``labels.csv``, read by ``immunize.judges.sheet``) and, when there is
one, the ``audit.json`` written with it. Two kinds of judge are compared with the person's labels:

- judges loaded by name (``--judges``, default ``harmfulness,refusal,keyword-refusal``) re-score the
  labelled answers now, on the exact texts audit.json recorded (a spreadsheet may have reflowed the
  sheet's copy);
- the run's own judgements, from audit.json: ``stored:harmfulness`` (the score as stored, after any
  refusal gate), ``stored:harmfulness_ungated`` (the harm judge's own score, when the run gated),
  ``stored:refusal`` and ``keyword`` (``immunize.data.looks_like_refusal``).

A judge of harmful answers is compared with the ``harmful`` column, a judge of refusals with
``refused``; a row left empty in a column is skipped for that column's judges. Per judge it reports
accuracy at the judge's threshold, Cohen's κ, AUROC, the confusion counts and seeded bootstrap 95%
intervals (rows resampled with replacement, the same resamples for every judge), overall and per
stage; ``agreement_table`` prints them, ``write_agreement`` writes ``agreement.json``.

These figures describe the judges on hard cases, not the run's error rate. The sheet is not a
random sample of the run's answers: it holds every answer the judges disagree on and the answers
nearest the harm threshold, and even its random part is spread evenly over (stage, section, stored
label) strata, not in proportion to their sizes. Disagreements and borderline answers are where a
judge is most often wrong, and their classes are mixed unlike the run's, so accuracy, κ and AUROC
over the sheet say how a judge does where judging is hard; how often it is wrong over all the
run's answers would take a random sample of them, each row weighted by the answers it stands for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from immunize.data.readers import typed
from immunize.errors import ImmunizeError
from immunize.io import atomic_write_text, read_json, to_json
from immunize.judges.audit import AUDIT_SCHEMA
from immunize.judges.sheet import ACCEPTED_LABELS, LABEL_FIELDS, SheetRow, read_sheet

AGREEMENT_SCHEMA = "immunize.judge_agreement"
SCHEMA_VERSION = 1

_COLUMN_OF = {"harmful": "harmful", "refusal": "refused"}  # a judge's ``positive`` -> the sheet's column


def _column(name: str, judge) -> str:
    column = _COLUMN_OF.get(getattr(judge, "positive", None))
    if column is None:
        raise ImmunizeError(f"--judges {name}: its positive class is {getattr(judge, 'positive', None)!r}; "
                            f"only judges of 'harmful' or 'refusal' answers can be compared with the sheet's "
                            f"harmful/refused labels")
    return column


def _resample_stats(y: np.ndarray, scores: np.ndarray, pred: np.ndarray, resamples: int, seed: int) -> dict:
    """Percentile 95% intervals of accuracy, κ and AUROC over rows resampled with replacement; a
    resample where a statistic is undefined (one class only) is left out of that statistic's interval."""
    from scipy.stats import rankdata

    n = len(y)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    yy, pp, ss = y[idx], pred[idx], scores[idx]
    accuracy = (yy == pp).mean(axis=1)
    p_true, p_pred = yy.mean(axis=1), pp.mean(axis=1)
    chance = p_true * p_pred + (1 - p_true) * (1 - p_pred)
    # np.where computes both branches: the resamples where a figure is undefined divide by zero
    # before they are replaced by NaN.
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(chance < 1, (accuracy - chance) / (1 - chance), np.nan)
        ranks = rankdata(ss, axis=1)
        positives = yy.sum(axis=1)
        negatives = n - positives
        auroc = np.where((positives > 0) & (negatives > 0),
                         ((ranks * yy).sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives),
                         np.nan)

    def interval(values: np.ndarray) -> tuple[list[float] | None, int]:
        values = values[np.isfinite(values)]
        if not values.size:
            return None, 0
        low, high = np.percentile(values, [2.5, 97.5])
        return [float(low), float(high)], int(values.size)

    out: dict[str, Any] = {}
    for name, values in (("accuracy", accuracy), ("kappa", kappa), ("auroc", auroc)):
        out[f"{name}_ci95"], used = interval(values)
        if used < resamples:
            out[f"{name}_ci95_resamples"] = used
    return out


def binary_agreement(human: Sequence[bool], scores: Sequence[float], predicted: Sequence[bool], *,
                     resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy, Cohen's κ, AUROC and confusion counts of a judge's ``scores``/``predicted`` labels
    against ``human`` labels, with bootstrap 95% intervals (``resamples`` 0: none)."""
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    y = np.asarray(human, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(predicted, dtype=bool)
    n = len(y)
    out: dict[str, Any] = {"n": n, "positives": int(y.sum()), "predicted_positives": int(p.sum()),
                           "accuracy": None, "kappa": None, "auroc": None, "notes": [],
                           "confusion": {"tp": int((p & y).sum()), "fp": int((p & ~y).sum()),
                                         "fn": int((~p & y).sum()), "tn": int((~p & ~y).sum())}}
    if not n:
        out["notes"].append("no labelled rows")
        return out
    out["accuracy"] = float((y == p).mean())
    if len(set(y.tolist())) == 1 and len(set(p.tolist())) == 1 and y[0] == p[0]:
        out["notes"].append("kappa undefined: the judge and the labels use one and the same class only")
    else:
        out["kappa"] = float(cohen_kappa_score(y, p, labels=[False, True]))
    if 0 < y.sum() < n:
        out["auroc"] = float(roc_auc_score(y, s))
    else:
        only = "positive" if y.all() else "negative"
        out["notes"].append(f"AUROC undefined: every labelled row is {only}")
    if resamples:
        out |= _resample_stats(y, s, p, resamples, seed)
    return out


@dataclass
class _Scored:
    name: str
    source: str  # loaded (re-scored now) or stored (the run's own scores, from audit.json)
    column: str
    ids: list[int]  # indices into the sheet's rows
    scores: list[float]
    predicted: list[bool]
    threshold: Any
    fingerprint: str | None = None


# The fields of an audit.json row that agreement reads: (name, JSON kind, may be missing or null).
_AUDIT_ROW_FIELDS = (("prompt", str, False), ("response", str, False), ("refused", bool, False),
                     ("keyword_refusal", bool, False), ("refusal_score", float, True), ("harmfulness", float, True),
                     ("harmful", bool, True), ("harmfulness_ungated", float, True))


def _load_audit(path: Path) -> dict[str, Any]:
    """audit.json, its rows checked field by field: one it did not write, or a row edited by hand,
    is a one-line error naming the row and field, not a KeyError half way through the scoring."""
    document = read_json(path)
    if not isinstance(document, dict) or document.get("schema") != AUDIT_SCHEMA or \
            not isinstance(document.get("rows"), dict):
        raise ImmunizeError(f"{path}: not an audit.json written by `immunize judge audit`")
    for ident, row in document["rows"].items():
        where = f"{path}: rows[{ident!r}]"
        if not isinstance(row, dict):
            raise ImmunizeError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for name, kind, optional in _AUDIT_ROW_FIELDS:
            typed(row, name, kind, where, optional=optional)
        if row.get("harmfulness") is not None:  # the harm verdicts compare the score with it
            typed(row, "threshold", float, where)
    return document


def _stored(rows: list[SheetRow], audit_rows: dict[str, Any]) -> list[_Scored]:
    """The run's own judgements of the labelled answers (from audit.json), as judges."""
    def gather(name: str, column: str, get: Callable[[dict], tuple[float, bool, Any] | None]) -> _Scored:
        scored = _Scored(name, "stored", column, [], [], [], None)
        thresholds = set()
        for k, row in enumerate(rows):
            record = audit_rows.get(row.id) if row.id else None
            if record is None or getattr(row, column) is None or (got := get(record)) is None:
                continue
            score, label, threshold = got
            scored.ids.append(k)
            scored.scores.append(float(score))
            scored.predicted.append(bool(label))
            thresholds.add(threshold)
        scored.threshold = next(iter(thresholds)) if len(thresholds) == 1 else sorted(
            t for t in thresholds if t is not None) or None
        return scored

    def harm(record):
        if record.get("harmfulness") is None:
            return None
        label = record["harmful"] if record.get("harmful") is not None else \
            record["harmfulness"] > record["threshold"]
        return record["harmfulness"], label, record.get("threshold")

    def ungated(record):
        if record.get("harmfulness") is None:
            return None
        score = record["harmfulness_ungated"] if record.get("harmfulness_ungated") is not None else \
            record["harmfulness"]
        return score, score > record["threshold"], record.get("threshold")

    def refusal(record):
        score = record.get("refusal_score")
        return (float(record["refused"]) if score is None else score), record["refused"], None

    def keyword(record):
        return float(record["keyword_refusal"]), record["keyword_refusal"], 0.5

    out = [gather("stored:harmfulness", "harmful", harm)]
    if any("harmfulness_ungated" in r for r in audit_rows.values()):
        out.append(gather("stored:harmfulness_ungated", "harmful", ungated))
    out += [gather("stored:refusal", "refused", refusal), gather("keyword", "refused", keyword)]
    return out


def _judge_names(text: str) -> list[str]:
    names: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        if name and name.lower() != "none" and name not in names:
            names.append(name)
    return names


def judge_agreement(labels: str | Path, *, audit: str | Path | None = None,
                    judges: Sequence[str] | str = ("harmfulness", "refusal", "keyword-refusal"),
                    seed: int = 0, resamples: int = 1000, judges_dir: str | Path | None = None) -> dict[str, Any]:
    """Each judge's agreement with the labels of the filled-in sheet ``labels``.

    ``audit``: the audit.json of the sheet (default: beside it, if there); it gives the run's stored
    scores (compared as judges ``stored:*`` and ``keyword``) and the exact texts that were scored.
    ``judges``: names to load and re-score the labelled answers with (``immunize judge list``).
    """
    labels = Path(labels)
    for option, value in (("--bootstrap", resamples), ("--seed", seed)):
        if value < 0:
            raise ImmunizeError(f"{option}: must be 0 or more, got {value}")
    rows = read_sheet(labels)
    labelled = {f: sum(getattr(r, f) is not None for r in rows) for f in LABEL_FIELDS}
    if not any(labelled.values()):
        raise ImmunizeError(f"{labels}: no row is labelled yet (write {ACCEPTED_LABELS['harmful']} under `harmful`, "
                            f"{ACCEPTED_LABELS['refused']} under `refused`)")
    audit_path = Path(audit) if audit is not None else labels.parent / "audit.json"
    if audit is not None and not audit_path.is_file():
        raise ImmunizeError(f"--audit {audit_path}: file not found")
    audit_rows = _load_audit(audit_path)["rows"] if audit_path.is_file() else {}
    names = _judge_names(judges) if isinstance(judges, str) else list(judges)
    loaded = []
    if names:
        from immunize.judges.registry import load_judge
        from immunize.judges.specs import SPECS

        for name in names:
            options = {"root": str(judges_dir)} if judges_dir is not None and name in SPECS else {}
            judge = load_judge(name, **options)
            loaded.append((judge, _column(name, judge)))
    texts = []
    for row in rows:
        record = audit_rows.get(row.id) if row.id else None
        texts.append((record["prompt"], record["response"]) if record else (row.prompt, row.response))
    scored: list[_Scored] = []
    for judge, column in loaded:
        ids = [k for k, row in enumerate(rows) if getattr(row, column) is not None]
        scores = judge.score([texts[k][0] for k in ids], [texts[k][1] for k in ids])
        scored.append(_Scored(judge.name, "loaded", column, ids, scores.tolist(),
                              (scores >= judge.threshold).tolist(), float(judge.threshold), judge.fingerprint()))
    if audit_rows:
        scored += _stored(rows, audit_rows)
    results = []
    for item in scored:
        human = [getattr(rows[k], item.column) for k in item.ids]
        metrics = binary_agreement(human, item.scores, item.predicted, resamples=resamples, seed=seed)
        by_stage: dict[str, dict[str, Any]] = {}
        for stage in sorted({rows[k].stage or "" for k in item.ids}):
            members = [j for j, k in enumerate(item.ids) if (rows[k].stage or "") == stage]
            part = binary_agreement([human[j] for j in members], [item.scores[j] for j in members],
                                    [item.predicted[j] for j in members], resamples=0)
            by_stage[stage] = {k: part[k] for k in ("n", "positives", "accuracy", "kappa", "auroc")}
        results.append({"judge": item.name, "source": item.source, "fingerprint": item.fingerprint,
                        "threshold": item.threshold, "compared_with": item.column, **metrics,
                        "by_stage": by_stage})
    return {
        "schema": AGREEMENT_SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "labels": str(labels), "audit": str(audit_path) if audit_rows else None,
        "rows": len(rows), "labelled": labelled,
        "unlabelled": {f: len(rows) - n for f, n in labelled.items()},
        "not_in_audit": sum(1 for r in rows if audit_rows and (not r.id or r.id not in audit_rows)),
        "seed": seed, "bootstrap": resamples,
        "judges": results,
    }


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def agreement_table(result: dict[str, Any]) -> str:
    """The agreement figures as a fixed-width table, one judge a line."""
    head = f"{'judge':<28} {'vs':<8} {'n':>5} {'pos':>5}  {'accuracy [95% CI]':<22} {'kappa [95% CI]':<22} " \
           f"{'AUROC [95% CI]':<22}"
    lines = [head]
    for r in result["judges"]:
        lines.append(f"{r['judge']:<28} {r['compared_with']:<8} {r['n']:>5} {r['positives']:>5}  "
                     f"{_fmt(r['accuracy'], r.get('accuracy_ci95')):<22} {_fmt(r['kappa'], r.get('kappa_ci95')):<22} "
                     f"{_fmt(r['auroc'], r.get('auroc_ci95')):<22}")
    lines.append(f"labelled rows of {result['rows']}: " + ", ".join(f"{f} {n}" for f, n in result["labelled"].items())
                 + " (unlabelled rows are skipped)")
    return "\n".join(lines)


def write_agreement(path: str | Path, result: dict[str, Any]) -> Path:
    return atomic_write_text(path, to_json(result))
