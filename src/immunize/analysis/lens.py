"""Logit lens: how much each layer already "knows" the harmful answer.

Each layer's hidden state is read out through the model's own final norm and LM head, and we
record the probability given to the next answer token. RepNoise's ascent term pushes this down at
every layer; an attack that restores harmfulness pushes it back up, usually from the top layers.
Only answer positions are read out, a chunk of positions at a time, so memory stays at
``chunk_size × vocab`` however long the answers, however many layers. The readout (one
vocabulary-sized matmul per answer token per layer) dominates the cost, so ``answer_tokens`` can
limit it to the opening of each answer, where a model commits to complying or refusing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from immunize.analysis.activations import batches, eval_mode, hidden_states, prediction_mask, readout
from immunize.errors import ImmunizeError


@torch.no_grad()
def logit_lens(model, tokenizer, pairs: Sequence[tuple[str, str]], fmt: str = "chat", *,
               max_length: int = 256, batch_size: int = 8, chunk_size: int = 256,
               answer_tokens: int | None = None) -> list[float]:
    """Mean probability of the answer tokens when read out from each layer.

    Returns L+1 floats: index 0 reads the embedding output, index k the output of decoder layer k
    (the last one equals the model's own next-token probabilities). The mean is over all answer
    tokens of all pairs (token-weighted), predicted with the usual one-token shift: the state at
    position t is scored on token t+1, for every t+1 that carries a label (the first
    ``answer_tokens`` of them in each pair, when given).
    """
    if answer_tokens is not None and answer_tokens < 1:
        raise ImmunizeError(f"answer_tokens {answer_tokens}: must be positive")
    apply_head = readout(model)
    totals: list[float] | None = None
    count = 0
    with eval_mode(model):
        for batch in batches(tokenizer, pairs, fmt, max_length=max_length, batch_size=batch_size):
            states = hidden_states(model, batch)
            mask, targets = prediction_mask(batch["labels"])
            if answer_tokens is not None:
                mask &= mask.cumsum(dim=1) <= answer_tokens
            mask = mask.to(states[0].device)
            targets = targets.to(states[0].device)[mask]
            if totals is None:
                totals = [0.0] * len(states)
            for layer, state in enumerate(states):
                rows = state[:, :-1][mask]
                for start in range(0, rows.shape[0], chunk_size):
                    logits = apply_head(rows[start:start + chunk_size]).float()
                    target = targets[start:start + chunk_size].unsqueeze(-1)
                    prob = logits.log_softmax(dim=-1).gather(-1, target).exp()
                    totals[layer] += float(prob.sum(dtype=torch.float64))
            count += int(mask.sum())
    if not totals or count == 0:
        return []
    return [total / count for total in totals]
