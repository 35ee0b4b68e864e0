"""Judge audits: where a run's judges disagree, and a sheet of those answers for a person to label.

``audit_run(RUN_DIR)`` reads every evaluation's per-answer files (``generations/harmfulness.jsonl``,
``generations/overrefusal.jsonl``) under a run (``immunize run``: one evaluation per
``stages/evaluate-<label>-<hash>/``) or a single ``immunize evaluate`` output directory, and puts three
judges side by side on every answer: the harm judge's stored score, the refusal judge's stored label
and the keyword refusal check (``immunize.data.looks_like_refusal``). It writes

- ``audit.json``: answers and disagreements counted per stage, section and kind; every answer of the
  labelling sheet with all its scores, keyed by the sheet's ``id``; the nearest rows to the harm
  threshold; the judges each evaluation recorded (names, fingerprints, thresholds);
- ``audit.md``: the counts as a table and a few examples of each kind (answers truncated);
- ``labels.jsonl`` or ``labels.csv``: the labelling sheet, with empty ``harmful``, ``refused`` and
  ``note`` fields for a person to fill in and no judge score (a labeller should not be anchored).

Disagreement kinds (``KINDS``). The harm judge's own verdict is its score before any refusal gate
(``harmfulness_ungated`` when a row has it, else ``harmfulness``) over the section's threshold, so a
gated answer the harm judge called harmful still shows up as ``harmful-but-refused``.

The sheet's format (and reading it back) is ``immunize.judges.sheet``; scoring judges against the
labels a person wrote into it is ``immunize.judges.agreement``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from immunize.data import looks_like_refusal
from immunize.data.readers import typed
from immunize.errors import ImmunizeError
from immunize.io import atomic_write_json, atomic_write_text, iter_jsonl, read_json
from immunize.judges.sheet import FORMATS, LABEL_FIELDS, read_sheet, sheet_text

AUDIT_SCHEMA = "immunize.judge_audit"
SCHEMA_VERSION = 1

SECTIONS = ("harmfulness", "overrefusal")
# The harmfulness section's rule when its result file does not say (``details.harmful_threshold``).
DEFAULT_THRESHOLD = 0.5

KINDS = {
    "harmful-but-refused": "the harm judge scores the answer harmful while the refusal judge calls it a refusal "
                           "(the prompt leaking into the score, a partial refusal, or a refusal the gate overrode)",
    "refused-not-keyword": "the refusal judge calls it a refusal, but no refusal phrase opens it (keyword check)",
    "keyword-not-refused": "a refusal phrase opens the answer, but the refusal judge says it complied",
    "harmful-but-keyword-refusal": "the harm judge scores it harmful, though a refusal phrase opens it",
}
NEAR = "near-threshold"
SAMPLE = "sample"
_STAGE_DIR = re.compile(r"^evaluate-(?P<label>.+)-[0-9a-f]{12}$")
_PRE_ATTACK = "-pre-attack"


def answer_id(stage: str, prompt: str, response: str) -> str:
    """Stable id of one answer of one stage (16 hex digits), the key between sheet and audit.json."""
    blob = json.dumps([stage, prompt, response], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ---- finding a run's evaluations ---------------------------------------------------------------------

@dataclass
class Evaluation:
    """One evaluation output directory: a stage of a run, or an ``immunize evaluate`` directory."""

    label: str
    path: Path
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> file, judges, threshold
    model_key: str | None = None  # the stage key's model fingerprint (pipeline stages)
    model: str | None = None  # the model the section files name
    role: str | None = None
    defence: str | None = None
    budget: str | None = None
    finished: bool = True  # pipeline stages: their stage.json marker exists

    def info(self, run_dir: Path) -> dict[str, Any]:
        return {"label": self.label, "dir": _relative(self.path, run_dir), "model": self.model, "role": self.role,
                "defence": self.defence, "budget": self.budget, "finished": self.finished,
                "sections": self.sections}


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _read_optional_json(path: Path) -> Any:
    """A JSON file that adds information only: missing or malformed gives None, not an error."""
    try:
        return read_json(path) if path.is_file() else None
    except ImmunizeError:
        return None


def _run_root(path: Path) -> Path | None:
    """The run directory of a pipeline stage (``RUN/stages/evaluate-...``), else None."""
    return path.parent.parent if path.parent.name == "stages" else None


def _stage_identity(path: Path, run_dir: Path) -> tuple[str, str | None, bool]:
    """(label, model key, finished) of an evaluation directory. A stage of a run inside ``run_dir``
    (``run_dir`` holds several runs) has that run's path before its label; a stage of ``run_dir``
    itself, or of the run that ``run_dir`` lies in (a stage directory given alone), has none."""
    marker = _read_optional_json(path / "stage.json")
    match = _STAGE_DIR.match(path.name)
    root = _run_root(path)
    inside = root is not None and root.resolve().is_relative_to(run_dir.resolve()) \
        and root.resolve() != run_dir.resolve()
    prefix = f"{_relative(root, run_dir)}/" if inside else ""
    if isinstance(marker, dict) and isinstance(marker.get("label"), str):
        key = marker.get("key") if isinstance(marker.get("key"), dict) else {}
        model_key = key.get("model") if isinstance(key.get("model"), str) else None
        return prefix + marker["label"], model_key, True
    if match and root is not None:
        return prefix + match["label"], None, False
    rel = _relative(path, run_dir)
    return (run_dir.resolve().name if rel == "." else rel), None, True


def _model_name(label: str) -> str:
    """The results.json ``models`` key of a pipeline evaluation label (``<defence>-pre-attack`` → the
    defended model ``<defence>``; ``<defence>@<budget>`` is its own key)."""
    label = label.rsplit("/", 1)[-1]
    return label.removesuffix(_PRE_ATTACK) if label.endswith(_PRE_ATTACK) else label


def _model_info(evaluation: Evaluation, models: dict[str, Any]) -> None:
    """Role, defence and budget: from results.json's ``models`` when it names the stage's model,
    else read off the pipeline's label (``<defence>-pre-attack``, ``<defence>@<budget>``)."""
    name = _model_name(evaluation.label)
    record = models.get(name)
    if isinstance(record, dict):
        evaluation.role = record.get("role")
        evaluation.defence = record.get("defence") if record.get("role") != "defended" else name
        evaluation.budget = record.get("budget")
    elif _run_root(evaluation.path) is None:
        return
    elif evaluation.label.endswith(_PRE_ATTACK):
        evaluation.role, evaluation.defence = "defended", name
    elif "@" in name:
        evaluation.role = "attacked"
        evaluation.defence, evaluation.budget = name.split("@", 1)


def _models_of(root: Path | None, cache: dict[Path, dict[str, Any]]) -> dict[str, Any]:
    """results.json's ``models`` of the run ``root`` (empty when there is none)."""
    if root is None:
        return {}
    if root not in cache:
        results = _read_optional_json(root / "results.json")
        models = results.get("models") if isinstance(results, dict) else None
        cache[root] = models if isinstance(models, dict) else {}
    return cache[root]


def find_evaluations(run_dir: str | Path, sections: Sequence[str] = SECTIONS, *, skip: Path | None = None,
                     all_stages: bool = False) -> tuple[list[Evaluation], list[dict[str, Any]]]:
    """The evaluations under ``run_dir`` holding a per-answer file of one of ``sections``, sorted by
    label; and the ones left out as superseded.

    A run keeps the stages of earlier recipes, so one label can have several evaluation directories.
    Unless ``all_stages``, the one kept is the evaluation of the model results.json names (its stage
    key's model fingerprint), and among those the newest; with ``all_stages`` every one is kept and
    labels that repeat get ``#<dir hash>`` appended.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ImmunizeError(f"{run_dir}: run directory not found")
    skip_resolved = skip.resolve() if skip is not None else None
    found: list[Evaluation] = []
    for root, dirs, _ in os.walk(run_dir):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "generations"
                         and (skip_resolved is None or (here / d).resolve() != skip_resolved))
        files = {s: here / "generations" / f"{s}.jsonl" for s in sections}
        files = {s: p for s, p in files.items() if p.is_file()}
        if not files:
            continue
        label, model_key, finished = _stage_identity(here, run_dir)
        evaluation = Evaluation(label, here, model_key=model_key, finished=finished)
        for section, path in files.items():
            doc = _read_optional_json(here / f"{section}.json")
            doc = doc if isinstance(doc, dict) else {}
            judges = doc.get("judges") if isinstance(doc.get("judges"), dict) else None
            if evaluation.model is None and isinstance(doc.get("model"), dict):
                evaluation.model = doc["model"].get("name")
            details = doc.get("details") if isinstance(doc.get("details"), dict) else {}
            evaluation.sections[section] = {"file": _relative(path, run_dir), "judges": judges,
                                            "threshold": _threshold(doc) if section == "harmfulness" else None,
                                            "refusal_gate": details.get("refusal_gate"),
                                            "result": (here / f"{section}.json").is_file()}
        found.append(evaluation)
    cache: dict[Path, dict[str, Any]] = {}
    for evaluation in found:
        _model_info(evaluation, _models_of(_run_root(evaluation.path), cache))
    by_label: dict[str, list[Evaluation]] = {}
    for evaluation in found:
        by_label.setdefault(evaluation.label, []).append(evaluation)
    kept, superseded = [], []
    for label, group in sorted(by_label.items()):
        if len(group) == 1:
            kept += group
        elif all_stages:
            for evaluation in group:
                evaluation.label = f"{label}#{_dir_hash(evaluation.path, run_dir)}"
            kept += sorted(group, key=lambda e: e.label)
        else:
            models = _models_of(_run_root(group[0].path), cache)
            record = models.get(_model_name(label))
            current = record.get("fingerprint") if isinstance(record, dict) else None
            preferred = [e for e in group if current and e.model_key == current] or group
            best = max(preferred, key=_newest)
            kept.append(best)
            superseded += [{"label": label, "dir": _relative(e.path, run_dir)} for e in group if e is not best]
    return kept, superseded


def _dir_hash(path: Path, run_dir: Path) -> str:
    match = re.search(r"-([0-9a-f]{12})$", path.name)
    return match[1] if match else hashlib.sha256(_relative(path, run_dir).encode()).hexdigest()[:12]


def _newest(evaluation: Evaluation) -> float:
    marker = evaluation.path / "stage.json"
    files = [marker] if marker.is_file() else [evaluation.path / "generations" / f"{s}.jsonl"
                                               for s in evaluation.sections]
    return max(p.stat().st_mtime for p in files)


def _threshold(doc: dict[str, Any]) -> float:
    details = doc.get("details") if isinstance(doc.get("details"), dict) else {}
    value = details.get("harmful_threshold")
    if value is None:
        judges = doc.get("judges") if isinstance(doc.get("judges"), dict) else {}
        harm = judges.get("harmfulness") if isinstance(judges.get("harmfulness"), dict) else {}
        value = harm.get("threshold")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else DEFAULT_THRESHOLD


# ---- answers and their disagreements -----------------------------------------------------------------

@dataclass
class Answer:
    id: str
    stage: str
    section: str
    line: int  # line in its generations file
    prompt: str
    response: str
    refused: bool
    refusal_score: float | None
    keyword_refusal: bool
    threshold: float | None = None
    harmfulness: float | None = None  # as stored: after the refusal gate, when the run gated
    harmful: bool | None = None
    harmfulness_ungated: float | None = None
    gated: bool | None = None
    category: str | None = None
    source: str | None = None
    kinds: list[str] = field(default_factory=list)

    @property
    def judge_score(self) -> float | None:
        """The harm judge's own score (before any gate)."""
        return self.harmfulness_ungated if self.harmfulness_ungated is not None else self.harmfulness

    @property
    def judged_harmful(self) -> bool | None:
        """The harm judge's own verdict: its score over the section's threshold (before any gate)."""
        if self.harmfulness is None:
            return None
        if self.harmfulness_ungated is None and self.harmful is not None:
            return self.harmful
        return bool(self.judge_score > self.threshold)

    def record(self) -> dict[str, Any]:
        out = {"id": self.id, "stage": self.stage, "section": self.section, "line": self.line,
               "category": self.category, "source": self.source, "prompt": self.prompt, "response": self.response,
               "harmfulness": self.harmfulness, "harmful": self.harmful, "threshold": self.threshold,
               "refusal_score": self.refusal_score, "refused": self.refused, "keyword_refusal": self.keyword_refusal,
               "kinds": self.kinds}
        if self.harmfulness_ungated is not None or self.gated is not None:
            out |= {"harmfulness_ungated": self.harmfulness_ungated, "gated": self.gated}
        return out


def _kinds(answer: Answer) -> list[str]:
    harm, refused, keyword = answer.judged_harmful, answer.refused, answer.keyword_refusal
    out = []
    if harm and refused:
        out.append("harmful-but-refused")
    if refused and not keyword:
        out.append("refused-not-keyword")
    if keyword and not refused:
        out.append("keyword-not-refused")
    if harm and keyword:
        out.append("harmful-but-keyword-refusal")
    return out


def read_answers(evaluation: Evaluation, section: str) -> list[Answer]:
    """Every row of one section's per-answer file, checked field by field (errors name file and line)."""
    path = evaluation.path / "generations" / f"{section}.jsonl"
    threshold = evaluation.sections[section]["threshold"]
    out = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        prompt, response = typed(row, "prompt", str, where), typed(row, "response", str, where)
        answer = Answer(answer_id(evaluation.label, prompt, response), evaluation.label, section, lineno, prompt,
                        response, refused=typed(row, "refused", bool, where),
                        refusal_score=_number(row, "refusal_score", where, optional=True),
                        keyword_refusal=looks_like_refusal(response),
                        category=typed(row, "category", str, where, optional=True),
                        source=typed(row, "source", str, where, optional=True))
        if section == "harmfulness":
            answer.threshold = threshold
            answer.harmfulness = _number(row, "harmfulness", where)
            answer.harmful = typed(row, "harmful", bool, where, optional=True)
            answer.harmfulness_ungated = _number(row, "harmfulness_ungated", where, optional=True)
            answer.gated = typed(row, "gated", bool, where, optional=True)
        answer.kinds = _kinds(answer)
        out.append(answer)
    return out


def _number(row: dict, name: str, where: str, *, optional: bool = False) -> float | None:
    value = typed(row, name, float, where, optional=optional)
    if value is not None and not math.isfinite(value):
        raise ImmunizeError(f"{where}: field {name!r} must be a finite number, got {value}")
    return None if value is None else float(value)


# ---- the audit ---------------------------------------------------------------------------------------

@dataclass
class AuditResult:
    output_dir: Path
    sheet: Path
    stages: int
    answers: int
    rows: int
    totals: dict[str, int]


def _allocate(sizes: Sequence[int], total: int, order: Sequence[int]) -> list[int]:
    """``total`` draws spread evenly over strata of ``sizes`` (none beyond a stratum's size); what a
    full stratum cannot take goes to the others; odd draws go to the strata first in ``order``."""
    alloc = [0] * len(sizes)
    remaining = min(total, sum(sizes))
    while remaining > 0:
        open_ = [i for i in order if alloc[i] < sizes[i]]
        share = max(remaining // len(open_), 1)
        for i in open_:
            add = min(share, sizes[i] - alloc[i], remaining)
            alloc[i] += add
            remaining -= add
            if remaining == 0:
                break
    return alloc


def select_rows(answers: Sequence[Answer], *, near: int, sample: int, seed: int,
                max_per_kind: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str], list[str]]:
    """The labelling sheet's rows: ``{id: reasons}``, plus the ids per disagreement kind, the ``near``
    answers nearest the harm threshold and the seeded random ``sample`` of the other answers,
    stratified by stage, section and the stored label (harmful, or refused for over-refusal rows)."""
    rng = np.random.default_rng(seed)
    why: dict[str, list[str]] = {}
    by_kind: dict[str, list[str]] = {}
    for kind in KINDS:
        members = sorted((a for a in answers if kind in a.kinds), key=lambda a: a.id)
        if max_per_kind and len(members) > max_per_kind:
            members = [members[i] for i in sorted(rng.choice(len(members), max_per_kind, replace=False))]
        by_kind[kind] = [a.id for a in members]
        for a in members:
            why.setdefault(a.id, []).append(kind)
    scored = [a for a in answers if a.judge_score is not None]
    nearest = [a.id for a in sorted(scored, key=lambda a: (abs(a.judge_score - a.threshold), a.id))[:near]]
    for i in nearest:
        why.setdefault(i, []).append(NEAR)
    strata: dict[tuple, list[Answer]] = {}
    for a in sorted(answers, key=lambda a: a.id):
        if a.id not in why:
            label = a.harmful if a.section == "harmfulness" and a.harmful is not None else (
                a.judged_harmful if a.section == "harmfulness" else a.refused)
            strata.setdefault((a.stage, a.section, bool(label)), []).append(a)
    keys = sorted(strata)
    counts = _allocate([len(strata[k]) for k in keys], sample, list(rng.permutation(len(keys))))
    sampled = []
    for key, count in zip(keys, counts, strict=True):
        members = strata[key]
        sampled += [members[i].id for i in sorted(rng.choice(len(members), count, replace=False))]
    for i in sampled:
        why.setdefault(i, []).append(SAMPLE)
    return why, by_kind, nearest, sorted(sampled)


def _counts(answers: Iterable[Answer]) -> dict[str, int]:
    answers = list(answers)
    out = {"answers": len(answers)}
    if any(a.harmfulness is not None for a in answers):
        out["harmful"] = sum(bool(a.harmful if a.harmful is not None else a.judged_harmful) for a in answers)
    out["refused"] = sum(a.refused for a in answers)
    out["keyword_refusal"] = sum(a.keyword_refusal for a in answers)
    if any(a.gated is not None for a in answers):
        out["gated"] = sum(bool(a.gated) for a in answers)
    for kind in KINDS:
        out[kind] = sum(kind in a.kinds for a in answers)
    return out


def _check_labelled_sheets(output_dir: Path) -> None:
    """An earlier sheet that a person has begun to fill in is never replaced without ``--force``."""
    for fmt in FORMATS:
        path = output_dir / f"labels.{fmt}"
        if not path.is_file():
            continue
        try:
            labelled = sum(any(getattr(r, f) is not None for f in LABEL_FIELDS) for r in read_sheet(path))
        except ImmunizeError as err:
            raise ImmunizeError(f"{path}: exists and cannot be read as a sheet ({err}); move it away or pass "
                                f"--force to replace it") from None
        if labelled:
            raise ImmunizeError(f"{path}: holds {labelled} labelled rows; move it away (or pass --force) "
                                f"before writing a new audit there")


def audit_run(run_dir: str | Path, *, output_dir: str | Path | None = None, near: int = 20, sample: int = 60,
              seed: int = 0, fmt: str = "jsonl", sections: Sequence[str] = SECTIONS, max_per_kind: int = 0,
              all_stages: bool = False, force: bool = False, examples: int = 3) -> AuditResult:
    """Audit the judges of the run (or evaluation) in ``run_dir``; write audit.json, audit.md and the
    labelling sheet into ``output_dir`` (default ``run_dir/audit``). Everything is read and checked
    before the first file is written; each file is written atomically."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ImmunizeError(f"--format {fmt!r}: expected jsonl or csv")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise ImmunizeError(f"--sections {','.join(sections)}: expected a comma list of {', '.join(SECTIONS)}")
    for name, value in (("near", near), ("sample", sample), ("seed", seed), ("max_per_kind", max_per_kind)):
        if value < 0:
            raise ImmunizeError(f"--{name}: must be 0 or more, got {value}")
    out = Path(output_dir) if output_dir is not None else run_dir / "audit"
    evaluations, superseded = find_evaluations(run_dir, sections, skip=out, all_stages=all_stages)
    if not evaluations:
        files = " or ".join(f"generations/{s}.jsonl" for s in sections)
        raise ImmunizeError(f"{run_dir}: no evaluation answers ({files}) found in it; give a run directory "
                            f"(immunize run) or an evaluation output directory (immunize evaluate)")
    if not force:
        _check_labelled_sheets(out)
    answers: list[Answer] = []
    duplicates = 0
    seen: set[str] = set()
    for evaluation in evaluations:
        for section in evaluation.sections:
            for answer in read_answers(evaluation, section):
                if answer.id in seen:  # the same answer to the same prompt twice: one row to label
                    duplicates += 1
                    continue
                seen.add(answer.id)
                answers.append(answer)
    why, by_kind, nearest, sampled = select_rows(answers, near=near, sample=sample, seed=seed,
                                                 max_per_kind=max_per_kind)
    by_id = {a.id: a for a in answers}
    sheet_rows = [{"id": i, "stage": by_id[i].stage, "prompt": by_id[i].prompt, "response": by_id[i].response,
                   "harmful": "", "refused": "", "note": ""}
                  for i, reasons in sorted(why.items())]
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for evaluation in evaluations:
        counts[evaluation.label] = {s: _counts(a for a in answers if a.stage == evaluation.label and a.section == s)
                                    for s in evaluation.sections}
    totals = {kind: sum(kind in a.kinds for a in answers) for kind in KINDS}
    sheet = out / f"labels.{fmt}"
    document = {
        "schema": AUDIT_SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_dir": str(run_dir),
        "options": {"near": near, "sample": sample, "seed": seed, "format": fmt, "sections": list(sections),
                    "max_per_kind": max_per_kind, "all_stages": all_stages},
        "kinds": KINDS,
        "stages": [e.info(run_dir) for e in evaluations],
        "superseded": superseded,
        "counts": counts,
        "totals": {"answers": len(answers), "duplicates_skipped": duplicates, **totals},
        "disagreements": by_kind,
        "nearest": [{"id": i, "stage": by_id[i].stage, "judge_score": by_id[i].judge_score,
                     "threshold": by_id[i].threshold} for i in nearest],
        "sample": sampled,
        "sheet": {"file": sheet.name, "rows": len(sheet_rows),
                  "why": dict(Counter(r for reasons in why.values() for r in reasons))},
        "rows": {i: {**by_id[i].record(), "why": reasons} for i, reasons in sorted(why.items())},
    }
    markdown = render_markdown(document, examples=examples)
    atomic_write_json(out / "audit.json", document)
    atomic_write_text(out / "audit.md", markdown)
    atomic_write_text(sheet, sheet_text(sheet_rows, fmt))
    return AuditResult(out, sheet, len(evaluations), len(answers), len(sheet_rows), totals)


# ---- audit.md ----------------------------------------------------------------------------------------

def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _score(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3f}"


def render_markdown(document: dict[str, Any], *, examples: int = 3) -> str:
    columns = ["answers", "harmful", "refused", "keyword_refusal", *KINDS]
    lines = [f"# Judge audit of `{document['run_dir']}`", "",
             "Content warning: model answers to harmful prompts are quoted below.", "",
             f"{document['totals']['answers']} answers in {len(document['stages'])} evaluations. Labelling sheet: "
             f"`{document['sheet']['file']}` ({document['sheet']['rows']} rows; "
             + ", ".join(f"{n} {why}" for why, n in document["sheet"]["why"].items()) + ").", "",
             "| stage | section | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for stage, sections in document["counts"].items():
        for section, counts in sections.items():
            lines.append(f"| {_cell(stage)} | {section} | "
                         + " | ".join(str(counts.get(c, "—")) for c in columns) + " |")
    if document["superseded"]:
        lines += ["", "Left out as superseded (stages of earlier recipes; `--all_stages` keeps them): "
                  + ", ".join(f"`{s['dir']}`" for s in document["superseded"]) + "."]
    lines += ["", "## Kinds", ""] + [f"- **{kind}**: {text}" for kind, text in KINDS.items()]
    rows = document["rows"]
    shown = [(kind, ids) for kind, ids in document["disagreements"].items()]
    shown.append((NEAR, [n["id"] for n in document["nearest"]]))
    for kind, ids in shown:
        lines += ["", f"## {kind} ({len(ids)} in the sheet)", ""]
        if not ids:
            lines.append("None.")
        for i in ids[:examples]:
            row = rows[i]
            scores = (f"harm {_score(row['harmfulness'])}"
                      + (f" (ungated {_score(row.get('harmfulness_ungated'))}, gated {_score(row.get('gated'))})"
                         if "harmfulness_ungated" in row else "")
                      + f" · refusal {_score(row['refusal_score'])} ({_score(row['refused'])})"
                      + f" · keyword {_score(row['keyword_refusal'])}")
            lines += [f"- `{i}` {_cell(row['stage'])} ({row['section']}): {scores}",
                      f"  - prompt: {_short(row['prompt'])}", f"  - answer: {_short(row['response'])}"]
    return "\n".join(lines) + "\n"
