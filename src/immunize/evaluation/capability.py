"""Capability (stability): MMLU and TruthfulQA MC1/MC2 through lm-evaluation-harness, in process.

The harness runs on the model already in memory (``HFLM(pretrained=model, tokenizer=...)``, no
second copy, no reload) and on task YAMLs that read the local data root (``immunize.tasks``), so
it needs no network. Per-question results (``log_samples``) give our own seeded bootstrap
intervals and the per-subject breakdown; MMLU accuracy is averaged over questions.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from immunize.errors import ImmunizeError
from immunize.evaluation.config import split_list
from immunize.evaluation.registry import Section, SectionResult
from immunize.evaluation.stats import summarize
from immunize.tasks import MaterializedTasks, materialize

log = logging.getLogger(__name__)


def run_lm_eval(
    model,
    tokenizer,
    tasks: MaterializedTasks,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``model`` for the materialized tasks; returns its raw output."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks.include_path), include_defaults=False)
    was_training = model.training
    try:
        # HFLM puts the model in eval mode; the caller's mode is restored below.
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        return simple_evaluate(
            model=lm,
            tasks=list(tasks.task_names.values()),
            limit=limit or None,
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)


def _sample_scores(samples: list[dict], task: str) -> tuple[list[int], list[float]]:
    ids, scores = [], []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        if "acc" not in sample:
            raise ImmunizeError(f"lm-eval task {task}: per-question results carry no 'acc'")
        ids.append(int(sample["doc_id"]))
        scores.append(float(sample["acc"]))
    return ids, scores


def summarize_capability(
    output: dict[str, Any], tasks: MaterializedTasks, *, resamples: int, seed: int
) -> SectionResult:
    samples: dict[str, list[dict]] = output.get("samples") or {}
    metrics: dict[str, Any] = {}
    breakdown: dict[str, Any] = {}
    rows: list[dict] = []
    for short, lm_name in tasks.task_names.items():
        if short == "mmlu":
            pooled: list[float] = []
            by_subject: dict[str, Any] = {}
            for subject in tasks.subjects:
                task = f"immunize_mmlu_{subject}"
                ids, scores = _sample_scores(samples.get(task, []), task)
                pooled += scores
                by_subject[subject] = summarize(scores, resamples=resamples, seed=seed)
                rows += [
                    {"task": "mmlu", "subject": subject, "doc_id": i, "acc": s}
                    for i, s in zip(ids, scores, strict=True)
                ]
            metrics["mmlu"] = summarize(pooled, resamples=resamples, seed=seed)
            breakdown["mmlu_by_subject"] = by_subject
            group = output.get("groups", {}).get(lm_name) or output.get("results", {}).get(lm_name, {})
            harness_value = group.get("acc,none")
            if harness_value is not None and pooled and abs(harness_value - np.mean(pooled)) > 1e-6:
                # Both are question-weighted means of the same per-question scores.
                log.warning(
                    "MMLU: harness aggregate %.6f differs from the pooled mean %.6f",
                    harness_value,
                    np.mean(pooled),
                )
        else:
            ids, scores = _sample_scores(samples.get(lm_name, []), lm_name)
            metrics[short] = summarize(scores, resamples=resamples, seed=seed)
            rows += [{"task": short, "doc_id": i, "acc": s} for i, s in zip(ids, scores, strict=True)]
    harness = {
        name: {k: v for k, v in values.items() if isinstance(v, (int, float, str))}
        for name, values in (output.get("results") or {}).items()
    }
    return SectionResult(
        metrics=metrics,
        breakdown=breakdown,
        rows=rows,
        details={
            "harness_results": harness,
            "n_shot": output.get("n-shot", {}),
            "lm_eval_version": output.get("lm_eval_version"),
        },
    )


class Capability(Section):
    options = (
        "capability_tasks",
        "mmlu_subjects",
        "mmlu_num_fewshot",
        "capability_limit",
        "capability_batch_size",
        "bootstrap_resamples",
        "seed",
    )
    headline = ("mmlu", "truthfulqa_mc1", "truthfulqa_mc2")
    # lm-evaluation-harness runs on the main process: its own distributed mode wants to be launched
    # around a model it loads itself, not handed an already-loaded one.
    main_only = True

    def inputs(self, ctx):
        cfg = ctx.config
        tasks = split_list(cfg.capability_tasks)
        if not tasks:
            raise ImmunizeError("--capability_tasks: empty (use mmlu, truthfulqa_mc1, truthfulqa_mc2)")
        self._tasks = materialize(
            tasks,
            root=ctx.data_root,
            subjects=split_list(cfg.mmlu_subjects),
            mmlu_num_fewshot=cfg.mmlu_num_fewshot,
        )
        return {
            "tasks": self._tasks.task_names,
            "subjects": self._tasks.subjects,
            "fingerprint": self._tasks.fingerprint,
        }

    def run(self, ctx, inputs):
        cfg = ctx.config
        output = run_lm_eval(
            ctx.model,
            ctx.tokenizer,
            self._tasks,
            limit=cfg.capability_limit,
            batch_size=cfg.capability_batch_size,
            seed=cfg.seed,
        )
        return summarize_capability(output, self._tasks, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
