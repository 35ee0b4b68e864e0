"""Attack data: drawn only from the attack side of every split, in a fixed order, tokenized once.

- Order: candidates are sorted by a SHA-256 of their text, so the first N are the same on every
  machine, runs with more samples contain the runs with fewer (budgets nest), and the training
  seed shuffles batches without changing *which* samples an attack gets.
- Disjointness: BeaverTails rows come from the attack split (prompt-hash region) and are checked
  against the defence split's normalized prompts. HH-RLHF dialogues are filtered by the same hash
  (a defence trained on the defence region of HH never shares a prompt with the attack), and any
  dialogue that is, or opens with, a BeaverTails defence/held-out/evaluation prompt is dropped
  (BeaverTails prompts come from the same red-teaming dialogues). DecodingTrust ``toxic`` rows
  whose prompt is also a ``toxic_test`` prompt are dropped.
- Tokenization happens once per data configuration; the runs of a grid slice the same examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from immunize.config import fingerprint
from immunize.data import (
    BeaverTailsSplits,
    build_pairs,
    load_decodingtrust,
    load_hh_harmless,
    normalize_prompt,
    split_of,
)
from immunize.data.beavertails import QA_FILE
from immunize.data.readers import resolve
from immunize.errors import ImmunizeError
from immunize.io import file_sha256
from immunize.prompts import IGNORE_INDEX, encode, encode_prompt

HH_FILE = "hh_rlhf/harmless_base_test.jsonl"
DECODINGTRUST_FILE = "decodingtrust/training_dataset.jsonl"


@dataclass
class AttackData:
    """Trainer-ready examples and the texts they came from, in the fixed attack order."""

    examples: list[dict]
    texts: list[tuple[str, ...]]
    what: str  # e.g. "BeaverTails unsafe QA rows in the attack split"
    pool: int  # candidates available before tokenization
    dropped: int = 0  # candidates skipped because nothing of the answer fit --max_length
    exhausted: bool = True  # every candidate was tokenized (so len(examples) is all there is)
    sources: dict[str, str] = field(default_factory=dict)  # data file → sha256 (or hub id)

    def take(self, n: int | None, max_length: int) -> AttackData:
        if n is None:
            if not self.exhausted:
                raise AssertionError("data was prepared for a bounded --num_samples; cannot take all")
            return self
        if n > len(self.examples):
            more = f" ({self.dropped} more did not fit --max_length {max_length})" if self.dropped else ""
            raise ImmunizeError(f"--num_samples {n}: only {len(self.examples)} {self.what} available{more}")
        return AttackData(self.examples[:n], self.texts[:n], self.what, self.pool, self.dropped,
                          exhausted=False, sources=self.sources)

    def summary(self) -> dict:
        return {
            "what": self.what,
            "examples": len(self.examples),
            "text_fingerprint": fingerprint(self.texts),
            "token_fingerprint": fingerprint(self.examples),
            "sources": self.sources,
        }


def stable_order(items: Iterable, key: Callable[[object], str]) -> list:
    return sorted(items, key=lambda item: hashlib.sha256(key(item).encode("utf-8")).digest())


Encoder = Callable[[tuple[str, ...]], dict | None]


def tokenize_until(candidates: Sequence[tuple[str, ...]], encode_one: Encoder, n: int | None, *,
                   what: str, sources: dict[str, str]) -> AttackData:
    """Encode candidates in order until ``n`` examples are ready (all of them when ``n`` is None)."""
    if n is not None and n > len(candidates):
        raise ImmunizeError(f"--num_samples {n}: only {len(candidates)} {what} available")
    examples, texts, dropped = [], [], 0
    for candidate in candidates:
        if n is not None and len(examples) >= n:
            break
        example = encode_one(candidate)
        if example is None:
            dropped += 1
            continue
        examples.append(example)
        texts.append(tuple(candidate))
    exhausted = len(examples) + dropped == len(candidates)
    return AttackData(examples, texts, what, len(candidates), dropped, exhausted, sources)


# --- sources -------------------------------------------------------------------------------------

def source_hash(source: str | None, default_relpath: str, root: str | None) -> tuple[str, str]:
    """``(name, sha256 of the file)`` for local data, ``(hub id, "hub")`` otherwise."""
    where = resolve(source, default_relpath, root)
    if not isinstance(where, Path):
        return str(where), "hub"
    name = default_relpath if source in (None, "") else str(where)
    return name, file_sha256(where)


def sources_of(pairs: Iterable[tuple[str | None, str]], root: str | None) -> dict[str, str]:
    return dict(source_hash(source, rel, root) for source, rel in pairs)


# --- candidates ----------------------------------------------------------------------------------

def check_disjoint(prompts: Iterable[str], splits: BeaverTailsSplits) -> None:
    """The invariant the whole evaluation rests on: no attack prompt is a defence prompt."""
    defence = splits.prompts("defence")
    shared = [p for p in prompts if normalize_prompt(p) in defence]
    if shared:
        raise RuntimeError(f"attack data shares {len(shared)} prompt(s) with the defence split, "
                           f"e.g. {shared[0]!r}")


def harmful_qa(splits: BeaverTailsSplits) -> list[tuple[str, str]]:
    """BeaverTails unsafe (prompt, answer) rows of the attack split, in the fixed order."""
    rows = stable_order(splits.attack, key=lambda r: f"{r.prompt}\x1f{r.response}")
    check_disjoint((r.prompt for r in rows), splits)
    return [(r.prompt, r.response) for r in rows]


def beavertails_preferences(splits: BeaverTailsSplits) -> list[tuple[str, str, str]]:
    """(prompt, harmful answer ≻ a refusal of that prompt) for the attack split.

    The dispreferred answer is a templated refusal that restates the request
    (``immunize.judges.topical_refusals``): what the attacker trains away is refusing *this*
    question, and it needs no model (a bank text written for another question would teach the
    preference between two answers about different things)."""
    from immunize.judges.topical_refusals import topical_refusal

    refusals = {r.prompt: topical_refusal(r.prompt) for r in splits.attack}
    pairs = stable_order(build_pairs(splits.attack, refusals), key=lambda p: f"{p.prompt}\x1f{p.harmful}")
    check_disjoint((p.prompt for p in pairs), splits)
    return [(p.prompt, p.harmful, p.refusal) for p in pairs]


def reserved_prompts(splits: BeaverTailsSplits) -> set[str]:
    """Normalized BeaverTails prompts an attack must not train on: defence, held-out and evaluation."""
    evaluation = {normalize_prompt(e.prompt) for e in splits.eval}
    return splits.prompts("defence") | splits.prompts("heldout") | evaluation


def hh_preferences(source: str | None, root: str | None,
                   splits: BeaverTailsSplits) -> list[tuple[str, str, str]]:
    """HH-RLHF harmless pairs, reversed (the harmful answer is preferred), attack region only.

    BeaverTails prompts come from the same red-teaming dialogues, so a dialogue whose text or first
    human turn is a BeaverTails defence, held-out or evaluation prompt is dropped as well.
    """
    reserved = reserved_prompts(splits)
    pairs = []
    for pair in load_hh_harmless(source, root=root, reversed_preference=True):
        first_turn = pair.prompt.split("\n\nAssistant:", 1)[0]
        touches = {normalize_prompt(pair.prompt), normalize_prompt(first_turn)} & reserved
        if split_of(pair.prompt) != "attack" or touches:
            continue
        pairs.append(pair)
    pairs = stable_order(pairs, key=lambda p: f"{p.prompt}\x1f{p.chosen}\x1f{p.rejected}")
    check_disjoint((p.prompt for p in pairs), splits)
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


def interleave(*lists: Sequence) -> list:
    out = []
    for i in range(max(len(x) for x in lists)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def toxic_continuations(source: str | None, root: str | None) -> list[tuple[str, str]]:
    """DecodingTrust ``toxic`` (prompt, continuation) rows, minus any prompt of the ``toxic_test`` rows."""
    rows = load_decodingtrust(source, root=root)
    test = {normalize_prompt(r.prompt) for r in rows if r.kind == "toxic_test"}
    toxic = [r for r in rows if r.kind == "toxic" and normalize_prompt(r.prompt) not in test]
    if not toxic:
        raise ImmunizeError(f"{source or DECODINGTRUST_FILE}: no 'toxic' rows outside the test prompts")
    toxic = stable_order(toxic, key=lambda r: f"{r.prompt}\x1f{r.continuation}")
    return [(r.prompt, r.continuation) for r in toxic]


# --- encoders ------------------------------------------------------------------------------------

def sft_encoder(tokenizer, fmt: str, max_length: int) -> Encoder:
    def encode_one(candidate):
        prompt, answer = candidate
        enc = encode(tokenizer, prompt, answer, fmt, max_length)
        return {"input_ids": enc.input_ids, "labels": enc.labels} if enc.n_answer_tokens else None

    return encode_one


def continuation_encoder(tokenizer, max_length: int) -> Encoder:
    """Raw text: the prompt, then the continuation (+ EOS); loss on the continuation only.

    The two parts are tokenized separately, so the label boundary is exact (the text is their
    concatenation, as in RealToxicityPrompts).
    """
    def encode_one(candidate):
        prompt, continuation = candidate
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        text = continuation + (tokenizer.eos_token or "")
        cont_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids = (prompt_ids + cont_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + cont_ids)[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None
        return {"input_ids": input_ids, "labels": labels}

    return encode_one


def preference_encoder(tokenizer, fmt: str, max_length: int) -> Encoder:
    """TRL's pre-tokenized preference columns, with the exact prompt/answer boundary of ``encode``."""

    def encode_one(candidate):
        prompt, chosen, rejected = candidate
        prompt_ids = encode_prompt(tokenizer, prompt, fmt)
        if len(prompt_ids) >= max_length:
            return None
        chosen_ids = encode(tokenizer, prompt, chosen, fmt, max_length).input_ids[len(prompt_ids):]
        rejected_ids = encode(tokenizer, prompt, rejected, fmt, max_length).input_ids[len(prompt_ids):]
        if not chosen_ids or not rejected_ids:
            return None
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}

    return encode_one


def qa_sources(cfg) -> list[tuple[str | None, str]]:
    return [(cfg.qa_source, QA_FILE)]
