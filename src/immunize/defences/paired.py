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

The pairs themselves (``build_defence_pairs``, ``paired_defence_data``, shared by every defence
that trains on pairs or on their refusal half) come from the defence split only; each question's
refusal is made by ``immunize.data.paired_refusals`` as the ``--refusals`` options of
``RefusalArguments`` say (by default the model's own answer, judged a refusal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from immunize.data import HarmfulPair
from immunize.data.paired_refusals import (
    FALLBACKS,
    GATE_THRESHOLD,
    SOURCES,
    ModelSpec,
    Refusals,
    RefusalSettings,
    parse_fallback,
)
from immunize.defences.base import DefenceArguments, DefenceData
from immunize.errors import ImmunizeError
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


# ---- the pairs of the defence split ------------------------------------------------------------

@dataclass
class RefusalArguments(DefenceArguments):
    """Options of the defences that train on refusals of the defence split's harmful questions."""

    not_identity: ClassVar[frozenset[str]] = frozenset({"on_topic_encoder"})  # scores them, never changes them

    refusals: str = field(default="own", metadata={
        "help": f"where each question's refusal comes from ({', '.join(SOURCES)}): own = the model's own greedy "
                "answer to the plain question, kept when --refusal_judge says it refuses (the RepNoise paper's "
                "construction); instructed = its answer when told to refuse, judged the same way; topical = a "
                "template restating the request; bank = a human-written refusal of another unsafe request"})
    refusal_fallback: str = field(default="topical", metadata={
        "help": f"for own and instructed: what questions whose answer is no refusal get, a comma list of "
                f"{', '.join(FALLBACKS)} tried in order (drop: no pair); topical keeps every question on-topic "
                "and the pair count what --num_samples asks"})
    refusal_judge: str = field(default="refusal", metadata={"help": "judge deciding which answers are refusals"})
    refusal_judge_fallback: str | None = field(default="keyword-refusal", metadata={
        "help": "judge used (and recorded in the data summary) if --refusal_judge cannot be loaded"})
    refusal_threshold: float = field(default=GATE_THRESHOLD, metadata={
        "help": "an own/instructed answer is kept when the refusal judge scores its opening this high and no "
                "later window of it complies (the evaluation's refusal-gate rule, immunize.judges.gate)"})
    refusal_max_new_tokens: int = field(default=64, metadata={
        "help": "tokens a generated refusal may take (an answer cut there is trimmed to its last sentence)"})
    refusal_batch_size: int = field(default=16, metadata={"help": "prompts per generation batch"})
    on_topic_encoder: str = field(default="minilm", metadata={
        "help": "sentence encoder of the on-topic score in the data summary (none: no score)"})

    def __post_init__(self):
        self.refusal_settings()  # one-line errors naming the option, before anything loads
        super().__post_init__()

    @property
    def judges_used(self) -> frozenset[str]:
        # Own/instructed answers are kept by the refusal judge (its fallback is used only if it fails).
        settings = self.refusal_settings()
        return frozenset({settings.judge}) if settings.generates else frozenset()

    def refusal_settings(self) -> RefusalSettings:
        return RefusalSettings(
            source=self.refusals, fallback=parse_fallback(self.refusal_fallback, self.refusals),
            judge=self.refusal_judge, judge_fallback=self.refusal_judge_fallback or None,
            threshold=self.refusal_threshold, max_new_tokens=self.refusal_max_new_tokens,
            batch_size=self.refusal_batch_size,
            on_topic_encoder=None if self.on_topic_encoder == "none" else self.on_topic_encoder)


def refusals_for(cfg: RefusalArguments, prompts: Sequence[str]) -> Refusals:
    """The refusals of ``prompts`` as ``cfg`` asks, answered (for own/instructed) by ``cfg.model``."""
    from immunize.data.paired_refusals import build_refusals

    spec = ModelSpec(cfg.model, prompt_format=cfg.prompt_format, device="cpu" if cfg.use_cpu else None,
                     dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    return build_refusals(prompts, cfg.refusal_settings(), spec, cfg.data_root)


def build_defence_pairs(cfg: RefusalArguments):
    """Pairs from the defence split only (never the attack or evaluation prompts), first N rows if
    asked, each with the refusal of its own question; ``(pairs, splits, refusals)``."""
    from immunize.data import build_pairs, harmful_rows, load_splits
    from immunize.training import take

    splits = load_splits(root=cfg.data_root, held_out_categories=tuple(cfg.held_out_categories))
    rows = take(harmful_rows(splits.defence), cfg.num_samples, "defence pairs")
    refusals = refusals_for(cfg, [r.prompt for r in rows])
    pairs = build_pairs(rows, refusals.texts)
    if not pairs:
        raise ImmunizeError(f"--refusal_fallback {cfg.refusal_fallback}: no question of the {len(rows)} defence "
                            "rows kept a refusal; no pairs left (use a fallback other than drop)")
    return pairs, splits, refusals


def paired_defence_data(cfg: RefusalArguments, tokenizer) -> DefenceData:
    """Encoded (harmful, refusal) pairs of the defence split, for ``PairedCollator``; shared by the
    defences that train on pairs."""
    from immunize.config import fingerprint
    from immunize.data.beavertails import QA_FILE

    pairs, splits, refusals = build_defence_pairs(cfg)
    features, dropped = encode_pairs(tokenizer, pairs, cfg.prompt_format, cfg.max_length)
    if not features:
        raise ImmunizeError(f"no usable defence pairs at --max_length {cfg.max_length} (dropped: {dropped})")
    summary = {
        "pairs_sha256": fingerprint([[p.prompt, p.harmful, p.refusal, list(p.categories)] for p in pairs], 64),
        "features_sha256": fingerprint(features, 64),
        "pairs": len(pairs), "pairs_used": len(features), "pairs_dropped": dropped,
        "defence_split_rows": len(splits.defence),
        "held_out_categories": list(cfg.held_out_categories),
        "paired_refusals": refusals.summary,
    }
    return DefenceData(features=features, prompts=[p.prompt for p in pairs], summary=summary,
                       sources=[QA_FILE, *refusals.files])
