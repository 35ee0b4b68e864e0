"""Prompt formats, tokenization with answer-only loss masks, and padding.

Two formats:
- ``chat``: the tokenizer's chat template (user turn, then the assistant's answer);
- ``plain``: ``Question: {q}\\nAnswer: {a}``, the format of the RepNoise paper.

The prompt part and the answer part are tokenized separately and concatenated, so the boundary
of the loss mask is exact: labels are ``-100`` on every prompt token and on padding, and equal to
the input ids on the answer tokens (shifting happens once, inside the loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from immunize.errors import ImmunizeError

PromptFormat = Literal["chat", "plain"]
FORMATS: tuple[str, ...] = ("chat", "plain")
IGNORE_INDEX = -100


def check_format(fmt: str) -> PromptFormat:
    if fmt not in FORMATS:
        raise ImmunizeError(f"--prompt-format: unknown format {fmt!r} (use {' or '.join(FORMATS)})")
    return fmt  # type: ignore[return-value]


def render_prompt(tokenizer, prompt: str, fmt: PromptFormat) -> str:
    """The text a model sees before it answers (ends where generation starts)."""
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ImmunizeError("--prompt-format chat: the tokenizer has no chat template; use --prompt-format plain")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {prompt}\nAnswer:"


def _answer_suffix(tokenizer, prompt: str, answer: str, fmt: PromptFormat, prefix: str) -> str:
    if fmt == "chat":
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(prefix):
            raise ImmunizeError("the chat template renders the prompt differently with and without an answer; "
                                "use --prompt-format plain")
        return full[len(prefix):]
    return " " + answer + (tokenizer.eos_token or "")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_answer_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode(tokenizer, prompt: str, answer: str, fmt: PromptFormat, max_length: int) -> Encoded:
    """Tokenize one (prompt, answer) pair; labels cover only the answer (truncated to ``max_length``)."""
    prefix = render_prompt(tokenizer, prompt, fmt)
    suffix = _answer_suffix(tokenizer, prompt, answer, fmt, prefix)
    # Chat templates write their own special tokens; the plain format gets the tokenizer's usual BOS.
    prompt_ids = tokenizer(prefix, add_special_tokens=fmt == "plain")["input_ids"]
    answer_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + list(answer_ids))[:max_length]
    return Encoded(input_ids=input_ids, labels=labels)


def encode_prompt(tokenizer, prompt: str, fmt: PromptFormat) -> list[int]:
    return tokenizer(render_prompt(tokenizer, prompt, fmt), add_special_tokens=fmt == "plain")["input_ids"]


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_value: int, *, side: Literal["right", "left"] = "right"
) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if not seq:
            continue
        if side == "right":
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        else:
            out[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
    return out


@dataclass
class CausalLMCollator:
    """Right-pads ``input_ids``/``labels`` features; padding is masked in attention and labels."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        batch = {
            "input_ids": pad_batch(ids, self.pad_token_id),
            "attention_mask": pad_batch([[1] * len(s) for s in ids], 0),
            "labels": pad_batch([f["labels"] for f in features], IGNORE_INDEX),
        }
        return batch
