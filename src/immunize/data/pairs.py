"""Paired (harmful, refusal) examples: the training data of defences like RepNoise.

A pair answers one question twice, harmfully and with a refusal *of that question*. Where the
refusals come from (the model's own, generated when told to refuse, templated, or a human-written
bank) is ``immunize.data.paired_refusals``; here a row meets the refusal of its own prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from immunize.data.beavertails import QARow
from immunize.errors import ImmunizeError


@dataclass(frozen=True)
class HarmfulPair:
    prompt: str
    harmful: str  # the unsafe BeaverTails answer
    refusal: str  # the same question answered by a refusal
    categories: tuple[str, ...]


def harmful_rows(rows: Sequence[QARow]) -> list[QARow]:
    """The unsafe rows (the ones a pair can be made of); none is a one-line error."""
    unsafe = [r for r in rows if not r.is_safe]
    if not unsafe:
        raise ImmunizeError("no harmful rows to pair with refusals (all rows are marked safe)")
    return unsafe


def build_pairs(rows: Sequence[QARow], refusals: Mapping[str, str]) -> list[HarmfulPair]:
    """Pair each unsafe row with ``refusals[row.prompt]``, the refusal of its own question. Rows
    whose prompt has no refusal (a builder dropped it; its summary counts them) are left out."""
    return [HarmfulPair(r.prompt, r.response, refusals[r.prompt], r.categories)
            for r in harmful_rows(rows) if r.prompt in refusals]
