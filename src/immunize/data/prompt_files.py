"""Harmful prompts from a table of one's own: a local file or a Hugging Face hub dataset.

The schema is BeaverTails' evaluation prompts': a ``prompt`` column (required, a non-empty string
in every row) and an optional ``category`` column (one category per row, a string; names may hold
commas, as BeaverTails' own do, so a cell is never split). A local ``.jsonl``, ``.json`` (a list of
objects) or ``.csv`` file is read by ``immunize.data.readers``; anything else that is not an
existing path is a hub id, ``owner/name`` or ``owner/name:split`` (split ``test`` by default; any
split ``datasets`` reads, ``test[:200]`` too).

Rows are numbered as the data loaders number them: a CSV's header is row 1, so its first prompt is
row 2; JSON Lines and JSON rows count from 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from immunize.data.readers import _HUB_ID, read_table, typed
from immunize.data.splits import normalize_prompt
from immunize.errors import ImmunizeError
from immunize.io import file_sha256

FILE_SUFFIXES = (".jsonl", ".json", ".csv")
DEFAULT_SPLIT = "test"


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    category: str | None  # None: the row has no category (missing, null or an empty cell)


@dataclass(frozen=True)
class PromptSource:
    """Where a prompt table lives: ``path`` for a local file, else ``hub`` and ``split``."""

    text: str  # as the user gave it
    path: Path | None = None
    hub: str | None = None
    split: str = DEFAULT_SPLIT

    @property
    def label(self) -> str:
        """A short name for reports: the file's name, or ``hub:split``."""
        return self.path.name if self.path is not None else f"{self.hub}:{self.split}"

    def identity(self) -> dict[str, str]:
        """What a result computed from this table depends on: a file's content hash, so a changed file
        is evaluated again; a hub dataset's id and split (its content enters through the prompts)."""
        if self.path is not None:
            return {"file": str(self.path), "sha256": file_sha256(self.path)}
        return {"hub": str(self.hub), "split": self.split}


def prompt_source(text: str, option: str) -> PromptSource:
    """A local file (an existing path, or any name ending in a table suffix) or a hub id[:split]."""
    if not text or not text.strip():
        raise ImmunizeError(f"{option}: empty; give a .jsonl, .json or .csv file or an owner/name[:split] hub id")
    path = Path(text).expanduser()
    if path.exists() or path.suffix in FILE_SUFFIXES:
        if path.suffix not in FILE_SUFFIXES:
            raise ImmunizeError(f"{option} {text!r}: unsupported file type {path.suffix!r} "
                                f"(use {', '.join(FILE_SUFFIXES)})")
        return PromptSource(text, path=path)
    hub, colon, split = text.partition(":")
    if not _HUB_ID.match(hub) or (colon and not split.strip()):
        raise ImmunizeError(f"{option} {text!r}: no such file, and not an owner/name[:split] hub id")
    return PromptSource(text, hub=hub, split=split or DEFAULT_SPLIT)


def _hub_rows(source: PromptSource, option: str) -> list[dict]:
    from datasets import load_dataset

    try:
        rows = [dict(r) for r in load_dataset(source.hub, split=source.split)]
    except Exception as err:  # the hub client raises many types (offline: ConnectionError); one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ImmunizeError(f"{option} {source.text!r}: could not load hub dataset {source.hub!r} split "
                            f"{source.split!r} ({reason})") from None
    if not rows:
        raise ImmunizeError(f"{option} {source.text!r}: hub dataset split {source.split!r} holds no rows")
    return rows


def load_prompt_rows(source: PromptSource, option: str) -> list[PromptRow]:
    """Every row of the table, checked; a missing column, an empty or non-string cell is an error
    naming the file (or hub id) and row."""
    rows = read_table(source.path) if source.path is not None else _hub_rows(source, option)
    if not any("prompt" in row for row in rows):
        raise ImmunizeError(f"{source.text}: no 'prompt' column (columns: {', '.join(map(str, rows[0])) or 'none'})")
    first = 2 if source.path is not None and source.path.suffix == ".csv" else 1
    out = []
    for i, raw in enumerate(rows):
        where = f"{source.text}: row {i + first}"
        prompt = typed(raw, "prompt", str, where).strip()
        if not prompt:
            raise ImmunizeError(f"{where}: field 'prompt' is empty")
        category = (typed(raw, "category", str, where, optional=True) or "").strip()
        out.append(PromptRow(prompt, category or None))
    return out


def drop_seen(rows: Sequence[PromptRow], reserved: Mapping[str, set[str]]) -> tuple[list[PromptRow], dict[str, int]]:
    """The rows whose normalized prompt is in no ``reserved`` set and not repeated earlier in the table.

    Counted per reason: ``overlaps_<name>`` for the first reserved set (in the mapping's order) that
    holds the prompt, else ``duplicate``. Normalized as the data splits normalize
    (``immunize.data.splits.normalize_prompt``: case, punctuation and spacing do not count).
    """
    dropped = {**{f"overlaps_{name}": 0 for name in reserved}, "duplicate": 0}
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = normalize_prompt(row.prompt)
        reason = next((f"overlaps_{name}" for name, prompts in reserved.items() if key in prompts), None)
        if reason is None and key in seen:
            reason = "duplicate"
        if reason is not None:
            dropped[reason] += 1
            continue
        seen.add(key)
        kept.append(row)
    return kept, dropped
