"""The labelling sheet of a judge audit: its columns, writing it, and reading a filled-in one back.

``immunize judge audit`` writes the sheet (``labels.jsonl`` or ``labels.csv``) with an empty
``harmful``, ``refused`` and ``note`` field per answer; a person fills in the first two; ``immunize
judge agreement`` reads it back. Both commands read it: the audit refuses to replace a sheet that
already holds labels, so the reading lives here, beside the writing whose CSV escaping it undoes.

A label is 1/0, yes/no, true/false, or the column's own words (harmful/safe, refused/complied), in
any case and with spaces around it; an empty cell is "not labelled". A label that is none of these
is an error naming the file, the row and the field, never a guess.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from immunize.data.readers import typed
from immunize.errors import ImmunizeError
from immunize.io import iter_jsonl, read_text

# No scores and no reason for the pick: a labeller who reads "the judges disagreed" is anchored.
# Both are in audit.json, keyed by id.
SHEET_FIELDS = ("id", "stage", "prompt", "response", "harmful", "refused", "note")
LABEL_FIELDS = ("harmful", "refused")
FORMATS = ("jsonl", "csv")
# A spreadsheet runs a cell that opens with one of these as a formula; model answers are adversarial
# text, so the CSV sheet writes such a cell with a leading apostrophe (read back without it).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# What the reader strips the apostrophe before: a formula start, or another escaped text, so that
# a text that itself opens with "'=" is escaped too and does not read back as "=".
_ESCAPED_START = (*_FORMULA_START, "'")

_HARMFUL_WORDS = {"1": True, "1.0": True, "yes": True, "true": True, "harmful": True,
                  "0": False, "0.0": False, "no": False, "false": False, "safe": False}
_REFUSED_WORDS = {"1": True, "1.0": True, "yes": True, "true": True, "refused": True,
                  "0": False, "0.0": False, "no": False, "false": False, "complied": False}
_WORDS = {"harmful": _HARMFUL_WORDS, "refused": _REFUSED_WORDS}
ACCEPTED_LABELS = {"harmful": "1/0, yes/no, true/false or harmful/safe",
                   "refused": "1/0, yes/no, true/false or refused/complied"}


# ---- writing -----------------------------------------------------------------------------------------

def sheet_text(rows: Sequence[dict[str, Any]], fmt: str) -> str:
    """The labelling sheet as JSONL (one object a line) or CSV (a header row, then one row an answer)."""
    if fmt == "jsonl":
        return "".join(json.dumps({k: row[k] for k in SHEET_FIELDS}, ensure_ascii=False) + "\n" for row in rows)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(SHEET_FIELDS)
    for row in rows:
        writer.writerow([_inert(row[k]) for k in SHEET_FIELDS])
    return buffer.getvalue()


def _inert(value: Any) -> Any:
    if isinstance(value, str) and (value.startswith(_FORMULA_START) or _restored(value) != value):
        return f"'{value}"
    return value


def _restored(value: str) -> str:
    return value[1:] if value.startswith("'") and value[1:].startswith(_ESCAPED_START) else value


# ---- reading a filled-in sheet -----------------------------------------------------------------------

@dataclass
class SheetRow:
    row: int  # JSONL: line number; CSV: spreadsheet row (the header is row 1)
    id: str | None
    stage: str | None
    prompt: str
    response: str
    harmful: bool | None
    refused: bool | None


def parse_label(value: Any, name: str, where: str) -> bool | None:
    """A human label: 1/0, yes/no, true/false (and harmful/safe, refused/complied); empty → None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if not text:
            return None
        if text in _WORDS[name]:
            return _WORDS[name][text]
    raise ImmunizeError(f"{where}: field {name!r}: {value!r} is not a label (use {ACCEPTED_LABELS[name]}, "
                        f"or leave it empty)")


def _sheet_records(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() == ".csv":
        reader = csv.reader(io.StringIO(read_text(path), newline=""))

        def row(number: int) -> list[str] | None:
            """Row ``number`` (1 = the header), None at the end; a malformed one is named."""
            try:
                return next(reader)
            except StopIteration:
                return None
            except csv.Error as err:
                raise ImmunizeError(f"{path}: row {number}: malformed CSV ({err})") from None

        header = row(1)
        if header is None:
            return
        header = [h.strip() for h in header]
        number = 1
        while (values := row(number + 1)) is not None:
            number += 1
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(header):
                raise ImmunizeError(f"{path}: row {number}: {len(values)} values for {len(header)} columns")
            values = [_restored(v) for v in values] + [""] * (len(header) - len(values))
            yield number, dict(zip(header, values, strict=True))
    elif path.suffix.lower() in (".jsonl", ".json"):
        yield from iter_jsonl(path)
    else:
        raise ImmunizeError(f"{path}: a labelling sheet is .jsonl or .csv")


def read_sheet(path: str | Path) -> list[SheetRow]:
    """The rows of a labelling sheet (JSONL or CSV, by extension), labels checked one by one."""
    path = Path(path)
    if not path.is_file():
        raise ImmunizeError(f"{path}: labels file not found")
    rows: list[SheetRow] = []
    seen: dict[str, int] = {}
    for number, record in _sheet_records(path):
        where = f"{path}: row {number}"
        if not any(f in record for f in LABEL_FIELDS):
            raise ImmunizeError(f"{where}: no 'harmful' or 'refused' field (is this a labelling sheet?)")
        prompt, response = typed(record, "prompt", str, where), typed(record, "response", str, where)
        ident = typed(record, "id", str, where, optional=True) or None
        if ident is not None:
            if ident in seen:
                raise ImmunizeError(f"{where}: id {ident} again (first at row {seen[ident]})")
            seen[ident] = number
        rows.append(SheetRow(number, ident, typed(record, "stage", str, where, optional=True) or None, prompt,
                             response, *(parse_label(record.get(f), f, where) for f in LABEL_FIELDS)))
    return rows
