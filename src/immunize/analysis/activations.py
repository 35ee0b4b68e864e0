"""Hidden states of every layer on (prompt, answer) pairs, and the model's own readout (norm + head).

Hugging Face's ``output_hidden_states`` returns L+1 states, but the last one has already been
through the final norm (verified for Llama, Gemma, GPT-2, GPT-NeoX, OPT and Phi), while the others
have not. Reading the last one out through the norm again would double-norm it, and mixing normed
and raw states would skew a PCA. So the last entry is replaced by the final norm's *input*,
captured by a forward hook that lives only for the duration of one forward pass: every returned
state is the raw residual stream, and ``readout`` maps any of them to logits exactly as the model does.
Module paths come from the per-architecture table in ``immunize.hooks``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from immunize.errors import ImmunizeError
from immunize.hooks import HookSet, resolve_hook_points, unwrap_model
from immunize.prompts import IGNORE_INDEX, CausalLMCollator, check_format, encode


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def readout(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h ↦ logits`` for a raw residual-stream state ``h``, exactly as the model computes its logits:
    final norm and pre-head modules (``immunize.hooks`` table), LM head, Gemma-2-style soft-capping."""
    points = resolve_hook_points(model)
    softcap = getattr(unwrap_model(model).config, "final_logit_softcapping", None)

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        logits = points.lm_head(points.head_input(hidden))
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


def batches(tokenizer, pairs: Sequence[tuple[str, str]], fmt: str, *, max_length: int,
            batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches with answer-only labels; a pair whose answer was truncated away is an error."""
    check_format(fmt)
    if batch_size < 1:
        raise ImmunizeError(f"batch_size {batch_size}: must be positive")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = CausalLMCollator(pad_token_id=pad if pad is not None else 0)
    features = []
    for index, (prompt, answer) in enumerate(pairs):
        enc = encode(tokenizer, prompt, answer, fmt, max_length)
        if not enc.n_answer_tokens:
            raise ImmunizeError(f"pair {index}: no answer token left within max_length {max_length}")
        features.append({"input_ids": enc.input_ids, "labels": enc.labels})
    for start in range(0, len(features), batch_size):
        yield collate(features[start:start + batch_size])


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for the analysis, the caller's train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def hidden_states(model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Raw residual-stream states ``[embeddings, layer 1, …, layer L]``, each ``(batch, seq, hidden)``."""
    device = model_device(model)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    final_norm = resolve_hook_points(model).final_norm
    captured: dict[str, torch.Tensor] = {}

    def keep_input(_module, args, _output):
        captured["input"] = args[0]

    with HookSet() as hooks:
        if final_norm is not None:
            hooks.forward(final_norm, keep_input)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    states = list(out.hidden_states)
    if "input" in captured:
        if captured["input"].shape != states[-1].shape:
            raise ImmunizeError(f"{type(unwrap_model(model)).__name__}: the final norm's input has shape "
                                f"{tuple(captured['input'].shape)}, expected {tuple(states[-1].shape)}")
        states[-1] = captured["input"]
    return states


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions of the answer tokens themselves (for pooling their representations)."""
    return labels != IGNORE_INDEX


def prediction_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask over positions 0..T-2, targets)``: position t predicts token t+1 (the one shift)."""
    targets = labels[:, 1:]
    return targets != IGNORE_INDEX, targets
