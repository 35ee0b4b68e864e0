"""Disjoint defence / attack / evaluation splits by a stable hash of the normalized prompt.

A prompt's split depends only on its text, so every response to the same question lands in the
same split, splits are identical on every machine and Python version, and adding data never moves
an existing prompt. Evaluation prompts are deduplicated against every training prompt.

Category splits (for generalization): the defence sees only rows whose categories all lie in A;
attack and evaluation see only rows whose categories all lie in B; rows that touch both are
dropped, so nothing of B leaks into the defence.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from immunize.data.beavertails import CATEGORIES, EvalPrompt, QARow, load_eval_prompts, load_qa
from immunize.errors import ImmunizeError

# Fractions of hash space; the gap above "attack" is held out (judges' and users' own checks).
SPLIT_BOUNDS: dict[str, tuple[float, float]] = {
    "defence": (0.0, 0.45),
    "attack": (0.45, 0.9),
    "heldout": (0.9, 1.0),
}


def normalize_prompt(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def prompt_position(text: str) -> float:
    """A prompt's place in [0, 1): the first 52 bits of SHA-256 of its normalized form."""
    digest = hashlib.sha256(normalize_prompt(text).encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") >> 12) / float(1 << 52)


def split_of(text: str) -> str:
    pos = prompt_position(text)
    for name, (lo, hi) in SPLIT_BOUNDS.items():
        if lo <= pos < hi:
            return name
    raise AssertionError(pos)


@dataclass(frozen=True)
class CategorySplit:
    """Defend on categories ``defence``; attack and evaluate on ``held_out``."""

    defence: tuple[str, ...]
    held_out: tuple[str, ...]

    def __post_init__(self):
        for name in (*self.defence, *self.held_out):
            if name not in CATEGORIES:
                raise ImmunizeError(f"category split: unknown category {name!r} (known: {', '.join(CATEGORIES)})")
        if overlap := set(self.defence) & set(self.held_out):
            raise ImmunizeError(f"category split: {sorted(overlap)} on both sides")
        if not self.defence or not self.held_out:
            raise ImmunizeError("category split: both sides need at least one category")

    @classmethod
    def from_held_out(cls, held_out: Sequence[str]) -> CategorySplit:
        return cls(defence=tuple(c for c in CATEGORIES if c not in held_out), held_out=tuple(held_out))

    def side(self, categories: Iterable[str]) -> str | None:
        cats = set(categories)
        if not cats:
            return None
        if cats <= set(self.defence):
            return "defence"
        if cats <= set(self.held_out):
            return "held_out"
        return None


@dataclass
class BeaverTailsSplits:
    defence: list[QARow]
    attack: list[QARow]
    heldout: list[QARow]
    eval: list[EvalPrompt]
    category_split: CategorySplit | None = None
    dropped: dict[str, int] = field(default_factory=dict)

    def prompts(self, name: str) -> set[str]:
        rows = getattr(self, name)
        return {normalize_prompt(r.prompt) for r in rows}


def build_splits(
    qa: Sequence[QARow],
    eval_prompts: Sequence[EvalPrompt],
    *,
    category_split: CategorySplit | None = None,
    harmful_only: bool = True,
) -> BeaverTailsSplits:
    parts: dict[str, list[QARow]] = {name: [] for name in SPLIT_BOUNDS}
    dropped = {"safe": 0, "mixed_categories": 0, "eval_overlaps_training": 0, "eval_duplicate": 0,
               "other_side": 0, "eval_other_side": 0}
    for row in qa:
        if harmful_only and row.is_safe:
            dropped["safe"] += 1
            continue
        name = split_of(row.prompt)
        if category_split is not None:
            side = category_split.side(row.categories)
            wanted = "defence" if name == "defence" else "held_out"
            if side != wanted:
                dropped["mixed_categories" if side is None else "other_side"] += 1
                continue
        parts[name].append(row)

    # Evaluation prompts never repeat a training prompt (of any split, safe rows included).
    training = {normalize_prompt(r.prompt) for r in qa}
    seen: set[str] = set()
    evaluation = []
    for item in eval_prompts:
        key = normalize_prompt(item.prompt)
        if key in training:
            dropped["eval_overlaps_training"] += 1
            continue
        if key in seen:
            dropped["eval_duplicate"] += 1
            continue
        if category_split is not None and item.category not in category_split.held_out:
            dropped["eval_other_side"] += 1
            continue
        seen.add(key)
        evaluation.append(item)

    splits = BeaverTailsSplits(
        defence=parts["defence"], attack=parts["attack"], heldout=parts["heldout"], eval=evaluation,
        category_split=category_split, dropped=dropped,
    )
    for name in ("defence", "attack", "eval"):
        if not getattr(splits, name):
            raise ImmunizeError(f"split {name!r} is empty after filtering (category split: {category_split})")
    return splits


def load_splits(*, root=None, qa_source=None, eval_source=None, held_out_categories: Sequence[str] = ()):
    category_split = CategorySplit.from_held_out(held_out_categories) if held_out_categories else None
    return build_splits(
        load_qa(qa_source, root=root), load_eval_prompts(eval_source, root=root), category_split=category_split
    )
