"""`immunize data`: what is in the data root, and whether every file parses row by row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from immunize.data.beavertails import load_eval_prompts, load_qa
from immunize.data.corpora import (
    first_turns,
    load_benign_answers,
    load_decodingtrust,
    load_harmless_instructions,
    load_hh_harmless,
    load_toxicity_prompts,
)
from immunize.data.readers import read_table, require
from immunize.errors import ImmunizeError
from immunize.io import file_sha256, read_json
from immunize.paths import DATA_SUFFIXES

# File pattern → fields every row must carry. The first match wins.
SCHEMAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("beavertails/qa.jsonl", ("prompt", "response", "category", "is_safe")),
    ("beavertails/eval_prompts.jsonl", ("prompt", "category")),
    ("decodingtrust/training_dataset.jsonl", ("type", "prompt", "continuation")),
    ("decodingtrust/*", ("prompt", "continuation")),
    ("hh_rlhf/*", ("chosen", "rejected")),
    ("refusals/xstest_*", ("prompt", "type", "completion", "final_label")),
    ("refusals/adv_training_behaviors_*", ("Behavior", "Safe_Response")),
    ("harmful_prompts/advbench_behaviors.csv", ("Behavior",)),
    ("harmful_prompts/*.jsonl", ("messages",)),
    ("benign/harmless_*.json", ("instruction",)),
    ("benign/alpaca_eval.json", ("instruction", "output")),
    ("benign/*.jsonl", ("messages",)),
    ("tasks/*", ("mr", "ref")),
    ("capability/mmlu/*", ("question", "answer", "choices")),
    ("capability/truthfulqa/TruthfulQA.csv", ("Question", "Best Answer")),
    ("capability/truthfulqa/mc_task.json", ("question", "mc1_targets", "mc2_targets")),
    ("capability/gsm8k/*", ("question", "answer")),
)


def _chat_rows(path: Path) -> None:
    for i, row in enumerate(read_table(path)):
        first_turns(row, f"{path}: row {i + 1}")


def _mmlu_rows(path: Path) -> None:
    from immunize.tasks import check_mmlu_row

    for i, row in enumerate(read_table(path)):
        check_mmlu_row(row, f"{path}: row {i + 1}")


def _truthfulqa(path: Path) -> None:
    from immunize.tasks import convert_truthfulqa

    convert_truthfulqa(path)


# File pattern → the reader a command uses for it, run on the file: `immunize data` then finds what
# that reader would (field types, nested structure, known categories), not only missing fields.
# Loaders take the file as their source; the dataset name or split they are given only picks a
# default file. CSV fields are always strings, so the field check above covers CSV files.
LOADERS: tuple[tuple[str, Callable[[Path], object]], ...] = (
    ("beavertails/qa.jsonl", load_qa),
    ("beavertails/eval_prompts.jsonl", load_eval_prompts),
    ("decodingtrust/training_dataset.jsonl", load_decodingtrust),
    ("decodingtrust/toxic_prompts.jsonl", lambda path: load_toxicity_prompts("toxic", path)),
    ("decodingtrust/nontoxic_prompts.jsonl", lambda path: load_toxicity_prompts("nontoxic", path)),
    ("hh_rlhf/harmless_base_test.jsonl", load_hh_harmless),
    ("harmful_prompts/*.jsonl", _chat_rows),
    ("benign/harmless_*.json", lambda path: load_harmless_instructions("test", path)),
    ("benign/*", lambda path: load_benign_answers("alpaca_eval", path)),
    ("capability/mmlu/*", _mmlu_rows),
    ("capability/truthfulqa/mc_task.json", _truthfulqa),
)


@dataclass
class FileReport:
    path: str
    rows: int | None
    licence: str
    ok: bool
    message: str = ""
    checksum_matches: bool | None = None


def schema_for(rel: str) -> tuple[str, ...] | None:
    for pattern, fields in SCHEMAS:
        if fnmatch(rel, pattern):
            return fields
    return None


def loader_for(rel: str) -> Callable[[Path], object] | None:
    return next((loader for pattern, loader in LOADERS if fnmatch(rel, pattern)), None)


def validate_file(root: Path, rel: str) -> int:
    """Return the row count; raise ``ImmunizeError`` naming the file and row of the first bad row."""
    rows = read_table(root / rel)
    fields = schema_for(rel)
    # CSV rows are numbered by file line (the header is line 1); JSON rows from 1.
    offset = 2 if rel.endswith(".csv") else 1
    for i, row in enumerate(rows):
        if fields:
            require(row, fields, f"{rel}: row {i + offset}")
    if loader := loader_for(rel):
        loader(root / rel)
    return len(rows)


def read_manifest(root: Path) -> dict[str, dict]:
    """``MANIFEST.json`` (file → its bytes, rows, licence, sha256), or {} if the root has none."""
    path = root / "MANIFEST.json"
    if not path.is_file():
        return {}
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not all(isinstance(e, dict) for e in manifest.values()):
        raise ImmunizeError(f"{path}: expected a JSON object of file path → entry object")
    return manifest


def inventory(root: Path, *, verify_checksums: bool = True) -> list[FileReport]:
    manifest = read_manifest(root)
    files = sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES and p.name != "MANIFEST.json"
    )
    if not files and not manifest:
        raise ImmunizeError(f"data root {root}: holds no data files ({', '.join(DATA_SUFFIXES)}) "
                            "and no MANIFEST.json listing any")
    reports = []
    for rel in files:
        entry = manifest.get(rel, {})
        licence = entry.get("licence", "unknown (not in MANIFEST.json)")
        try:
            rows = validate_file(root, rel)
        except ImmunizeError as err:
            reports.append(FileReport(rel, None, licence, False, str(err)))
            continue
        report = FileReport(rel, rows, licence, True)
        if verify_checksums and entry.get("sha256"):
            digest = file_sha256(root / rel)
            report.checksum_matches = digest == entry["sha256"]
            if not report.checksum_matches:
                report.message = "differs from MANIFEST.json sha256"
        reports.append(report)
    for rel in sorted(set(manifest) - set(files)):
        reports.append(FileReport(rel, None, manifest[rel].get("licence", "?"), False,
                                  f"{rel}: listed in MANIFEST.json but missing"))
    return reports


def grouped(reports: list[FileReport]) -> list[tuple[str, int | None, str, str]]:
    """Collapse MMLU's 171 files into one line per split; keep everything else per file."""
    rows: list[tuple[str, int | None, str, str]] = []
    mmlu: dict[str, list[FileReport]] = {}
    for r in reports:
        if r.path.startswith("capability/mmlu/"):
            mmlu.setdefault(Path(r.path).name, []).append(r)
            continue
        rows.append((r.path, r.rows, r.licence, "ok" if r.ok and not r.message else r.message))
    for split, items in sorted(mmlu.items()):
        bad = [r.message for r in items if not r.ok or r.message]
        total = None if any(r.rows is None for r in items) else sum(r.rows or 0 for r in items)
        rows.append((f"capability/mmlu/*/{split} ({len(items)} subjects)", total, items[0].licence,
                     bad[0] if bad else "ok"))
    return rows
