"""Result files: a versioned JSON document per section, written atomically, reused by key.

Layout of an output directory::

    <output_dir>/<section>.json                one result per section (schema below)
    <output_dir>/generations/<section>.jsonl   per-example records (answers with their scores)
    <output_dir>/summary.json                  headline numbers of every section, and their keys
    <output_dir>/config.yaml, provenance.json  the resolved config and the environment

The per-example file is written before the section's JSON, and the JSON is the completion
marker: a section whose JSON exists with the same key is finished and is not recomputed.
``example_outcomes`` reads a metric's per-example outcomes out of those records, keyed by what
identifies an example across models (the prompt, the question, the meaning representation), so
two models' results can be compared pair by pair (``immunize.evaluation.stats.paired_bootstrap``).

Schema ``immunize.evaluation`` version 1 (``<section>.json``):

- ``schema``, ``schema_version``: ``"immunize.evaluation"``, ``1``;
- ``section``: harmfulness, overrefusal, toxicity, capability, perplexity or trainability;
- ``key``: 16 hex digits, the hash of (schema version, section, model fingerprint, judge names
  and fingerprints, ``config``, ``inputs_fingerprint``, section extras such as the reference
  model's fingerprint); equal keys mean the same evaluation;
- ``model``: ``{"name", "fingerprint"}`` (``immunize.models.model_fingerprint``, or
  ``weights:<hash>`` of an in-memory model's tensors);
- ``judges``: per role, ``{"name", "fingerprint", "threshold", "requested", "fallback_reason"}``;
- ``config``: the options that define the section (sizes, formats, seed, ...);
- ``inputs_fingerprint``: hash of the exact prompts/documents evaluated;
- ``metrics``: ``{name: {"value", "ci95": [low, high], "n"}}`` (seeded percentile bootstrap);
- ``breakdown``: per category/source/subject/task, same metric shape;
- ``details``: section-specific extras (generation lengths, harness output, training losses);
- ``generations``: path of the per-example JSONL relative to the output directory, or null;
- ``created``, ``seconds`` (wall), ``cpu_seconds`` (all threads), ``git_revision``, ``versions``: provenance.

A reader should check ``schema_version``; fields are only ever added within a version.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from immunize.config import fingerprint, git_revision, package_versions
from immunize.io import atomic_write_json, atomic_write_jsonl, read_jsonl

SCHEMA = "immunize.evaluation"
SCHEMA_VERSION = 1


def section_key(
    *,
    section: str,
    model_fingerprint: str,
    judges: dict[str, str],
    options: dict[str, Any],
    inputs_fingerprint: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """The identity of one evaluation: same key, same result (up to floating-point noise)."""
    return fingerprint(
        {
            "schema_version": SCHEMA_VERSION,
            "section": section,
            "model": model_fingerprint,
            "judges": judges,
            "options": options,
            "inputs": inputs_fingerprint,
            "extra": extra or {},
        }
    )


def result_path(output_dir: str | Path, section: str) -> Path:
    return Path(output_dir) / f"{section}.json"


def generations_path(output_dir: str | Path, section: str) -> Path:
    return Path(output_dir) / "generations" / f"{section}.jsonl"


def load_matching(output_dir: str | Path, section: str, key: str) -> dict | None:
    """The stored result of ``section`` if it has ``key`` and the current schema; else None."""
    path = result_path(output_dir, section)
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: recompute and replace it
    if not isinstance(stored, dict) or stored.get("schema_version") != SCHEMA_VERSION or stored.get("key") != key:
        return None
    rows = stored.get("generations")
    if rows and not (Path(output_dir) / rows).is_file():
        return None
    return stored


def write_result(
    output_dir: str | Path,
    section: str,
    *,
    key: str,
    model: dict[str, Any],
    judges: dict[str, Any],
    options: dict[str, Any],
    inputs_fingerprint: str,
    metrics: dict[str, Any],
    breakdown: dict[str, Any],
    details: dict[str, Any],
    rows: list[dict] | None,
    seconds: float,
    cpu_seconds: float | None = None,
) -> dict[str, Any]:
    output_dir = Path(output_dir)
    relative = None
    if rows is not None:
        path = generations_path(output_dir, section)
        atomic_write_jsonl(path, rows)
        relative = str(path.relative_to(output_dir))
    document = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "section": section,
        "key": key,
        "model": model,
        "judges": judges,
        "config": options,
        "inputs_fingerprint": inputs_fingerprint,
        "metrics": metrics,
        "breakdown": breakdown,
        "details": details,
        "generations": relative,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2) if cpu_seconds is not None else None,
        "git_revision": git_revision(),
        "versions": package_versions(),
    }
    atomic_write_json(result_path(output_dir, section), document)
    return document


def read_rows(output_dir: str | Path | None, document: dict | None) -> list[dict]:
    """The per-example records of a stored section result (``[]`` when it kept none)."""
    relative = (document or {}).get("generations")
    if not relative or output_dir is None:
        return []
    path = Path(output_dir) / relative
    return read_jsonl(path) if path.is_file() else []


def _question(row: dict) -> str:
    # lm-eval's doc_id is the question's index in its (fixed, materialized) task data.
    return f"{row['subject']}/{row['doc_id']}" if row.get("subject") else str(row["doc_id"])


def example_outcomes(section: str, metric: str, rows: Sequence[dict]) -> list[list] | None:
    """One ``[key, outcome]`` per example of ``metric`` (a metric of ``section``), in row order;
    None when the rows hold none (e.g. a result stored without per-example records).

    Outcomes are on the scale the verdict compares: harmfulness and toxicity scores, refusals and
    per-question accuracy as 0/1, ROUGE F1 per meaning representation; for perplexity the
    per-text loss in nats per answer token (log-perplexity) with the text's answer tokens as a
    third element, the weight that makes the mean of the losses the log of the token-weighted
    perplexity.
    """
    if section == "harmfulness" and metric == "harmfulness":
        out = [[r["prompt"], float(r["harmfulness"])] for r in rows]
    elif section == "toxicity" and metric == "toxicity":
        out = [[r["prompt"], float(r["toxicity"])] for r in rows]
    elif section == "overrefusal" and metric == "refusal_rate":
        out = [[r["prompt"], float(r["refused"])] for r in rows]
    elif section == "perplexity" and metric == "perplexity":
        out = [[r["prompt"], r["nll"] / r["answer_tokens"], int(r["answer_tokens"])] for r in rows]
    elif section == "capability":
        out = [[_question(r), float(r["acc"])] for r in rows if r.get("task") == metric]
    elif section == "trainability":
        task, _, rouge = metric.rpartition("_")
        out = [[r["mr"], float(r[rouge])] for r in rows if r.get("task") == task]
    else:
        raise ValueError(f"no per-example outcomes for metric {metric!r} of section {section!r}")
    return out or None
