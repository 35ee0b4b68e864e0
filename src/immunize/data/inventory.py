"""`immunize data`: what is in the data root, and whether every file parses row by row."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from immunize.data.readers import read_table, require
from immunize.errors import ImmunizeError
from immunize.io import file_sha256, read_json

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
DATA_SUFFIXES = {".jsonl", ".json", ".csv"}


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


def validate_file(root: Path, rel: str) -> int:
    """Return the row count; raise ``ImmunizeError`` naming the file and row of the first bad row."""
    rows = read_table(root / rel)
    fields = schema_for(rel)
    # CSV rows are numbered by file line (the header is line 1); JSON rows from 1.
    offset = 2 if rel.endswith(".csv") else 1
    for i, row in enumerate(rows):
        if fields:
            require(row, fields, f"{rel}: row {i + offset}")
    if rel == "beavertails/qa.jsonl":
        from immunize.data.beavertails import load_qa

        load_qa(root / rel)  # also checks the category dicts
    return len(rows)


def inventory(root: Path, *, verify_checksums: bool = True) -> list[FileReport]:
    manifest_path = root / "MANIFEST.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    files = sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES and p.name != "MANIFEST.json"
    )
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
