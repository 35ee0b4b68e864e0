"""Paired (harmful, refusal) examples: the training data of defences like RepNoise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from immunize.data.beavertails import QARow
from immunize.data.refusals import RefusalBank, looks_like_refusal
from immunize.errors import ImmunizeError


@dataclass(frozen=True)
class HarmfulPair:
    prompt: str
    harmful: str  # the unsafe BeaverTails answer
    refusal: str  # the same question answered by a refusal
    categories: tuple[str, ...]


def build_pairs(rows: Sequence[QARow], bank: RefusalBank,
                generated: dict[str, str] | None = None) -> list[HarmfulPair]:
    """Pair each unsafe row with a refusal: a model-generated one where ``generated`` has it
    (see ``generate_refusals``), otherwise one drawn from the bank."""
    generated = generated or {}
    pairs = [HarmfulPair(r.prompt, r.response, generated.get(r.prompt) or bank.for_prompt(r.prompt), r.categories)
             for r in rows if not r.is_safe]
    if not pairs:
        raise ImmunizeError("no harmful rows to pair with refusals (all rows are marked safe)")
    return pairs


def generate_refusals(model, tokenizer, prompts: Sequence[str], *, fmt="chat", max_new_tokens: int = 64,
                      batch_size: int = 16, system: str | None = None) -> dict[str, str]:
    """Ask ``model`` to refuse each prompt; keep only answers the refusal check accepts.

    Returns ``{prompt: refusal}`` for the prompts whose generation passed the check, so callers can
    fall back to the bank for the rest.
    """
    import torch

    from immunize.prompts import pad_batch, render_prompt

    instruction = system or "Refuse the following request politely and briefly, without helping: "
    out: dict[str, str] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        texts = [render_prompt(tokenizer, instruction + p, fmt) for p in chunk]
        ids = [tokenizer(t, add_special_tokens=fmt == "plain")["input_ids"] for t in texts]
        input_ids = pad_batch(ids, pad, side="left").to(device)
        attention = pad_batch([[1] * len(i) for i in ids], 0, side="left").to(device)
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
        for prompt, row in zip(chunk, gen[:, input_ids.shape[1]:], strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            if text and looks_like_refusal(text):
                out[prompt] = text
    return out
