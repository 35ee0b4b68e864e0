"""Read local tables (JSONL, JSON, CSV) or Hugging Face hub datasets with the same schema.

Every malformed row raises an ``ImmunizeError`` naming the file and line; a field of the wrong JSON
type is an error too (``typed``), never cast; a table without rows is an error.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from immunize.errors import ImmunizeError
from immunize.io import read_jsonl, read_text
from immunize.paths import data_root

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# CSV fields in this data hold whole model completions; the default 128 KiB limit is too small.
csv.field_size_limit(1 << 24)


def read_table(path: str | Path) -> list[dict]:
    """The rows of a data file; an empty one is an error (no use of a data file wants zero rows)."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise ImmunizeError(f"{path}: holds no rows")
    return rows


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ImmunizeError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        text = read_text(path)
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
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
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
        rows = [dict(r) for r in load_dataset(where, split=split)]
    except Exception as err:  # the hub client raises many types; the user needs one line
        raise ImmunizeError(f"dataset {where!r} (split {split}): could not load from the hub ({err})") from None
    if not rows:
        raise ImmunizeError(f"dataset {where!r} (split {split}): holds no rows")
    return rows


def require(row: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise ImmunizeError(f"{where}: missing field(s) {', '.join(missing)}")


# How a message names each accepted type: as JSON names it, the language of the data files.
_JSON_KINDS = {str: "a string", bool: "true or false", float: "a number", dict: "an object", list: "a list"}


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)  # JSON escapes newlines: one line
    return text if len(text) <= 60 else text[:57] + "..."


def check_type(value, kind: type, what: str, where: str):
    """``value`` if it is a JSON value of ``kind`` (a key of ``_JSON_KINDS``), else an error naming
    ``what`` (e.g. "field 'prompt'") at ``where``. An integer is a number; true/false is not."""
    # bool is a subclass of int in Python, not a number in JSON.
    accepted = (int, float) if kind is float else kind
    if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
        raise ImmunizeError(f"{where}: {what} must be {_JSON_KINDS[kind]}, got {_shown(value)}")
    return value


def typed(row: dict, name: str, kind: type, where: str, *, optional: bool = False):
    """``row[name]``, checked to be a JSON value of ``kind`` (str, bool, float, dict or list).

    Never a cast: ``bool("false")`` is True and ``str(12)`` is "12", so a wrongly typed field would
    change a result without a word. ``optional``: a missing or null field gives None.
    """
    if row.get(name) is None:
        if optional:
            return None
        require(row, (name,), where)
    return check_type(row[name], kind, f"field {name!r}", where)
