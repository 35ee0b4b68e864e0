"""Batched greedy generation: the engine behind every evaluation that reads a model's answers.

Prompts are rendered (chat template, plain ``Question/Answer``, or raw text to continue), sorted by
token length and cut into batches so that each batch pads as little as possible. Batches are padded
on the left, so every row's next token sits in the last column and one KV-cached decoding loop
serves the whole batch. Decoding is greedy (``do_sample=False``, one beam) under a generation
config built here, never the checkpoint's own (which may ask for sampling). A row is finished at
its first stop token (the tokenizer's EOS, the checkpoint's EOS ids and, in chat format, the
template's end-of-turn token); the batch ends as soon as every row is finished, or at
``max_new_tokens``. Results come back in the caller's order.

Formats:
- ``chat``/``plain``: ``immunize.prompts.render_prompt`` (what a user's question looks like);
- ``continuation``: the text as is, with the tokenizer's usual special tokens, for tasks that ask a
  model to continue a text (toxicity prompts, data-to-text completions of a fixed frame).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from immunize.distributed import is_distributed, is_sharded, share
from immunize.errors import ImmunizeError
from immunize.prompts import pad_batch, render_prompt

log = logging.getLogger(__name__)

GENERATION_FORMATS: tuple[str, ...] = ("chat", "plain", "continuation")
# Plain-format answers of a chat model often run on into a new "Question:"; the answer ends there.
_PLAIN_TURN_MARKER = "\nQuestion:"


@dataclass(frozen=True)
class Generation:
    prompt: str  # the caller's prompt, before rendering
    text: str  # the new text: special tokens removed, whitespace stripped
    new_tokens: int  # tokens generated, the stop token included
    stopped: bool  # True: ended at a stop token; False: cut at max_new_tokens


def check_generation_format(fmt: str, option: str = "--prompt_format") -> str:
    if fmt not in GENERATION_FORMATS:
        raise ImmunizeError(f"{option}: unknown format {fmt!r} (use {', '.join(GENERATION_FORMATS)})")
    return fmt


def encode_for_generation(tokenizer, prompt: str, fmt: str) -> list[int]:
    """Token ids of the rendered prompt; generation starts right after the last one."""
    if fmt == "continuation":
        return tokenizer(prompt)["input_ids"]
    # Chat templates write their own special tokens; plain text gets the tokenizer's usual ones.
    return tokenizer(render_prompt(tokenizer, prompt, fmt), add_special_tokens=fmt == "plain")["input_ids"]


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (e.g. ``<|im_end|>``)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\u2063immunize\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # templates that reject this conversation simply have no detectable marker
        return None
    after = text.split(marker, 1)[-1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    special = set(tokenizer.all_special_ids)
    return next((i for i in ids if i in special), None)


def stop_token_ids(model, tokenizer, fmt: str) -> list[int]:
    ids = _as_list(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    ids += _as_list(getattr(generation_config, "eos_token_id", None))
    if fmt == "chat" and (turn_end := end_of_turn_id(tokenizer)) is not None:
        ids.append(turn_end)
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ImmunizeError(
            "the tokenizer has no EOS token and the model names none: generation could not stop"
        )
    return ids


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (a memory error shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    fmt: str = "chat",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    across_ranks: bool = False,
) -> list[Generation]:
    """Greedy answers to ``prompts`` (in their order); see the module docstring.

    ``across_ranks``: in a launched job the ranks share the batches out (``immunize.distributed``)
    and each returns every answer; a batch is the same whichever rank forms it, so the answers
    are the single-process ones. A sharded model (FSDP, ZeRO-3: its forward needs every rank) is
    never shared out: every rank answers every prompt, in step (``synced_gpus``)."""
    from transformers import GenerationConfig

    check_generation_format(fmt)
    if max_new_tokens < 1:
        raise ImmunizeError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if batch_size < 1:
        raise ImmunizeError(f"batch_size={batch_size}: must be at least 1")
    if not prompts:
        return []
    encoded = [encode_for_generation(tokenizer, p, fmt) for p in prompts]
    stops = stop_token_ids(model, tokenizer, fmt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad,
        use_cache=True,
    )
    device = next(model.parameters()).device
    stop_set = set(stops)
    def answer(batch: list[int]) -> list[Generation]:
        rows = [encoded[i] for i in batch]
        input_ids = pad_batch(rows, pad, side="left").to(device)
        attention = pad_batch([[1] * len(r) for r in rows], 0, side="left").to(device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                 synced_gpus=sharded)
        answers = []
        for index, ids in zip(batch, out[:, input_ids.shape[1] :].tolist(), strict=True):
            end = next((k for k, t in enumerate(ids) if t in stop_set), None)
            kept = ids if end is None else ids[: end + 1]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            if fmt == "plain":
                text = text.split(_PLAIN_TURN_MARKER, 1)[0]
            answers.append(Generation(prompts[index], text.strip(), len(kept), end is not None))
        return answers

    def answer_all(batches: list[list[int]]) -> list[list[Generation]]:
        return [answer(batch) for batch in batches]

    sharded = is_distributed() and is_sharded(model)
    batches = length_sorted_batches([len(e) for e in encoded], batch_size)
    results: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        answered = share(answer_all, batches) if across_ranks and not sharded else answer_all(batches)
    finally:
        model.train(was_training)
    for batch, answers in zip(batches, answered, strict=True):
        for index, generation in zip(batch, answers, strict=True):
            results[index] = generation
    done = [r for r in results if r is not None]
    elapsed = time.perf_counter() - start
    log.info("generated %d answers, %d tokens in %.1fs", len(done), sum(r.new_tokens for r in done), elapsed)
    return done
