"""Perplexity of benign held-out answers: does the model still model ordinary helpful text?

Texts are alpaca_eval (instruction, answer) pairs whose instruction hashes into the held-out
split (``immunize.data.split_of``), the part no defence, attack or retain set draws from. The
answer is scored given its instruction in the evaluation's prompt format, exactly as training
would see it (``immunize.prompts.encode``: loss on answer tokens only). Perplexity is token-weighted
(``exp(total NLL / total answer tokens)``) with a bootstrap interval that resamples whole texts.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from immunize.data import load_benign_answers, split_of
from immunize.errors import ImmunizeError
from immunize.evaluation.config import fixed_subset
from immunize.evaluation.registry import Section, SectionResult
from immunize.evaluation.stats import ratio_bootstrap_ci, summarize
from immunize.generation import length_sorted_batches
from immunize.prompts import IGNORE_INDEX, CausalLMCollator, encode


def answer_nll(
    model, tokenizer, pairs: list[tuple[str, str]], *, fmt: str, max_length: int, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Per-text summed negative log-likelihood of the answer tokens, and their counts."""
    encoded = [encode(tokenizer, prompt, answer, fmt, max_length) for prompt, answer in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = CausalLMCollator(pad)
    device = next(model.parameters()).device
    nll = np.zeros(len(encoded))
    counts = np.zeros(len(encoded))
    was_training = model.training
    model.eval()
    try:
        for batch in length_sorted_batches([len(e.input_ids) for e in encoded], batch_size):
            features = collate([{"input_ids": encoded[i].input_ids, "labels": encoded[i].labels} for i in batch])
            features = {k: v.to(device) for k, v in features.items()}
            with torch.inference_mode():
                logits = model(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).logits
            labels = features["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
            )
            mask = labels != IGNORE_INDEX
            for row, index in enumerate(batch):
                nll[index] = float(losses[row][mask[row]].sum())
                counts[index] = float(mask[row].sum())
    finally:
        model.train(was_training)
    return nll, counts


class Perplexity(Section):
    options = ("perplexity_samples", "perplexity_max_length", "prompt_format", "bootstrap_resamples", "seed")
    headline = ("perplexity",)
    main_only = True  # a few hundred forward passes: not worth sharing out

    def inputs(self, ctx):
        rows = [
            r
            for r in load_benign_answers("alpaca_eval", root=ctx.data_root)
            if r.output and split_of(r.instruction) == "heldout"
        ]
        chosen = fixed_subset(rows, ctx.config.perplexity_samples, key=lambda r: r.instruction,
                              option="perplexity_samples", source="benign/alpaca_eval.json (held-out split)")
        return [[r.instruction, r.output] for r in chosen]

    def run(self, ctx, inputs):
        cfg = ctx.config
        nll, counts = answer_nll(
            ctx.model,
            ctx.tokenizer,
            [tuple(p) for p in inputs],
            fmt=cfg.prompt_format,
            max_length=cfg.perplexity_max_length,
        )
        keep = counts > 0
        if not keep.any():
            raise ImmunizeError("perplexity: no text kept an answer token (raise --perplexity_max_length)")
        rows = [
            {
                "index": i,
                "prompt": prompt,
                "answer_tokens": int(c),
                "nll": float(n),
                "perplexity": math.exp(n / c),
            }
            for i, ((prompt, _), n, c) in enumerate(zip(inputs, nll, counts, strict=True))
            if c > 0
        ]
        nll, counts = nll[keep], counts[keep]
        ci = ratio_bootstrap_ci(nll, counts, resamples=cfg.bootstrap_resamples, seed=cfg.seed, transform=np.exp)
        mean_nll = float(nll.sum() / counts.sum())
        per_text = nll / counts
        return SectionResult(
            metrics={
                "perplexity": {
                    "value": math.exp(mean_nll),
                    "ci95": list(ci) if ci else None,
                    "n": int(keep.sum()),
                },
                "nll_per_token": {
                    "value": mean_nll,
                    "ci95": [math.log(ci[0]), math.log(ci[1])] if ci else None,
                    "n": int(keep.sum()),
                },
                "per_text_nll": summarize(per_text, resamples=cfg.bootstrap_resamples, seed=cfg.seed),
            },
            rows=rows,
            details={"answer_tokens": int(counts.sum()), "texts_without_answer_tokens": int((~keep).sum())},
        )
