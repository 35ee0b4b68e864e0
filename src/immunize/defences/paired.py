"""Paired (harmful, refusal) training examples and their batches.

A pair is one question answered twice: harmfully and with a refusal. Both are tokenized with
answer-only labels (``immunize.prompts.encode``), so they share the prompt tokens exactly. The
*harmful mask* M marks the harmful answer's tokens from the first token where the two sequences
diverge onwards:

- tokens before the divergence (prompt, chat markup, a shared answer opening) have the same
  history and the same next token in both sequences, so training the refusal up and the harmful
  answer down there would fight itself; they are left out;
- the first diverging token is *in* M: its history is shared, but its target differs, and it is
  the most informative harmful token of all (the original code's two shifts dropped it);
- every later harmful token has a history that differs from the refusal's, so it is in M even if
  the same token id happens to sit at the same position in the refusal.

M is computed from sequence lengths and label positions, never from token ids, so no token id
(padding included) is special. The "no mask" ablation marks every token of the harmful sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from immunize.data import HarmfulPair
from immunize.prompts import IGNORE_INDEX, encode


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    """The first index where ``a`` and ``b`` differ (``len`` of the shorter if one prefixes the other)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def encode_pairs(tokenizer, pairs: Sequence[HarmfulPair], fmt: str,
                 max_length: int) -> tuple[list[dict], dict]:
    """Features for ``PairedCollator``; pairs with nothing to train on are dropped and counted."""
    features, dropped = [], {"answer_truncated_away": 0, "no_diverging_harmful_token": 0}
    for pair in pairs:
        harmful = encode(tokenizer, pair.prompt, pair.harmful, fmt, max_length)
        refusal = encode(tokenizer, pair.prompt, pair.refusal, fmt, max_length)
        if not harmful.n_answer_tokens or not refusal.n_answer_tokens:
            dropped["answer_truncated_away"] += 1
            continue
        start = first_divergence(harmful.input_ids, refusal.input_ids)
        if start >= len(harmful.input_ids):  # the harmful text is a prefix of the refusal
            dropped["no_diverging_harmful_token"] += 1
            continue
        features.append({
            "harmful_input_ids": harmful.input_ids, "harmful_labels": harmful.labels,
            "refusal_input_ids": refusal.input_ids, "refusal_labels": refusal.labels,
            "divergence": start,
        })
    return features, dropped


def harmful_mask(feature: dict, *, all_tokens: bool = False) -> list[bool]:
    """M for one pair, over the harmful sequence's positions (see the module docstring)."""
    labels = feature["harmful_labels"]
    if all_tokens:
        return [True] * len(labels)
    start = feature["divergence"]
    return [t >= start and label != IGNORE_INDEX for t, label in enumerate(labels)]


def _pad(rows: Sequence[Sequence], value, width: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.tensor(list(row), dtype=dtype)
    return out


@dataclass
class PairedCollator:
    """Right-pads B pairs into one batch of 2B rows: the harmful sequences, then the refusals.

    Keys: ``input_ids`` and ``attention_mask`` (2B, W); ``refusal_labels`` (B, W), the refusals'
    answer tokens, -100 elsewhere; ``harmful_targets`` (B, W), the harmful tokens under M, -100
    elsewhere; ``harmful_mask`` (B, W) bool, M itself. Labels are unshifted: the loss shifts once.
    """

    pad_token_id: int
    all_tokens: bool = False  # the "no mask" ablation

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        harmful = [f["harmful_input_ids"] for f in features]
        refusal = [f["refusal_input_ids"] for f in features]
        width = max(len(s) for s in (*harmful, *refusal))
        masks = [harmful_mask(f, all_tokens=self.all_tokens) for f in features]
        targets = [[tok if m else IGNORE_INDEX for tok, m in zip(ids, mask, strict=True)]
                   for ids, mask in zip(harmful, masks, strict=True)]
        return {
            "input_ids": _pad([*harmful, *refusal], self.pad_token_id, width, torch.long),
            "attention_mask": _pad([[1] * len(s) for s in (*harmful, *refusal)], 0, width, torch.long),
            "refusal_labels": _pad([f["refusal_labels"] for f in features], IGNORE_INDEX, width, torch.long),
            "harmful_targets": _pad(targets, IGNORE_INDEX, width, torch.long),
            "harmful_mask": _pad(masks, False, width, torch.bool),
        }
