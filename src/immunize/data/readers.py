"""Read local tables (JSONL, JSON, CSV) or Hugging Face hub datasets with the same schema.

Every malformed row raises an ``ImmunizeError`` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from immunize.errors import ImmunizeError
from immunize.io import read_jsonl
from immunize.paths import data_root

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# CSV fields in this data hold whole model completions; the default 128 KiB limit is too small.
csv.field_size_limit(1 << 24)


def read_table(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ImmunizeError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            # Some ".json" files are JSON Lines (the GSM8K copy, for one).
            return read_jsonl(path)
        if isinstance(data, dict):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ImmunizeError(f"{path}: expected a JSON list of objects")
        return data
    if path.suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = []
            for row in reader:
                if None in row:
                    raise ImmunizeError(f"{path}:{reader.line_num}: more fields than the header has")
                rows.append(row)
            return rows
    raise ImmunizeError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json or .csv)")


def resolve(source: str | Path | None, default_relpath: str, root: str | Path | None = None) -> Path | str:
    """``None`` → the default file under the data root; an existing path → itself; else a hub id."""
    if source is None or source == "":
        return data_root(root) / default_relpath
    path = Path(source).expanduser()
    if path.exists():
        return path
    if isinstance(source, str) and _HUB_ID.match(source):
        return source
    raise ImmunizeError(f"dataset {source!r}: no such file, and not an owner/name hub id")


def load_rows(source: str | Path | None, default_relpath: str, *, root=None, split: str = "train") -> list[dict]:
    where = resolve(source, default_relpath, root)
    if isinstance(where, Path):
        return read_table(where)
    from datasets import load_dataset

    try:
        return [dict(r) for r in load_dataset(where, split=split)]
    except Exception as err:  # the hub client raises many types; the user needs one line
        raise ImmunizeError(f"dataset {where!r} (split {split}): could not load from the hub ({err})") from None


def require(row: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise ImmunizeError(f"{where}: missing field(s) {', '.join(missing)}")
