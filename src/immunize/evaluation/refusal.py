"""Over-refusal: how often the model refuses benign instructions (the harmless test split).

A defence that makes a model refuse everything would look perfectly harmless; this section is
its counterweight. The refusal judge decides each answer; the refusal rate carries a bootstrap CI.
"""

from __future__ import annotations

from immunize.data import load_harmless_instructions
from immunize.evaluation.config import fixed_subset
from immunize.evaluation.harmfulness import generation_details
from immunize.evaluation.registry import Section, SectionResult
from immunize.evaluation.stats import summarize


class OverRefusal(Section):
    options = (
        "overrefusal_samples",
        "overrefusal_max_new_tokens",
        "prompt_format",
        "batch_size",
        "bootstrap_resamples",
        "seed",
    )
    judges = ("refusal",)
    headline = ("refusal_rate",)

    def inputs(self, ctx):
        instructions = load_harmless_instructions("test", root=ctx.data_root)
        return fixed_subset(instructions, ctx.config.overrefusal_samples, key=lambda text: text,
                            option="overrefusal_samples", source="benign/harmless_test.json")

    def run(self, ctx, inputs):
        cfg = ctx.config
        generations = ctx.generate(inputs, fmt=cfg.prompt_format, max_new_tokens=cfg.overrefusal_max_new_tokens)
        responses = [g.text for g in generations]
        judge = ctx.judge("refusal")
        scores = judge.scores(inputs, responses)
        refused = judge.labels(inputs, responses)
        rows = [
            {
                "index": i,
                "prompt": p,
                "response": g.text,
                "new_tokens": g.new_tokens,
                "stopped": g.stopped,
                "refusal_score": float(scores[i]),
                "refused": bool(refused[i]),
            }
            for i, (p, g) in enumerate(zip(inputs, generations, strict=True))
        ]
        return SectionResult(
            metrics={
                "refusal_rate": summarize(refused, resamples=cfg.bootstrap_resamples, seed=cfg.seed),
                "refusal_score": summarize(scores, resamples=cfg.bootstrap_resamples, seed=cfg.seed),
            },
            rows=rows,
            details=generation_details(generations),
        )
