"""Trainability: does the model still learn a benign task as well as before the defence?

For each data-to-text task (ViGGO, E2E) a copy of the model is fine-tuned for a fixed small
budget (steps × batch, learning rate, seed) on ``Question: <meaning representation>`` →
``Answer: <text>`` pairs (the plain format, answer-only loss, ``immunize.training``), then
generates greedily for a fixed subset of test meaning representations, scored with ROUGE-1/2/L
F1 against all of that representation's references (``rouge_score``, stemmed). The same is
done, same budget and seed, for a reference model (``--reference_model``, e.g. the undefended
base); its results are cached under the cache directory by its fingerprint, so a reference is
fine-tuned once per configuration, and the differences come with paired bootstrap intervals.
ROUGE before fine-tuning is reported too: the gain is what the budget bought.
"""

from __future__ import annotations

import copy
import gc
import logging
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from immunize.config import fingerprint
from immunize.data import load_data_to_text
from immunize.distributed import from_main, is_main, world_size
from immunize.errors import ImmunizeError
from immunize.evaluation.config import fixed_subset, split_list
from immunize.evaluation.registry import Section, SectionResult
from immunize.evaluation.stats import summarize
from immunize.generation import generate
from immunize.io import atomic_write_json, read_json
from immunize.paths import cache_dir

log = logging.getLogger(__name__)

TRAINABILITY_TASKS = ("viggo", "e2e")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def load_task(task: str, *, root, train_examples: int, eval_samples: int | None) -> dict[str, Any]:
    """A fixed training subset (one pass at the budget) and test MRs with all their references."""
    if task not in TRAINABILITY_TASKS:
        raise ImmunizeError(f"--trainability_tasks: unknown task {task!r} (use {', '.join(TRAINABILITY_TASKS)})")
    train = load_data_to_text(task, "train", root=root)
    if len(train) < train_examples:
        raise ImmunizeError(
            f"--trainability_steps × --trainability_batch_size = {train_examples} examples, but "
            f"{task} has only {len(train)} training rows"
        )
    chosen = fixed_subset(train, train_examples, key=lambda r: r.mr + "\n" + r.ref,
                          option="trainability_steps", source=f"{task} train")
    references: dict[str, list[str]] = {}
    for row in load_data_to_text(task, "test", root=root):
        references.setdefault(row.mr, []).append(row.ref)
    test_mrs = fixed_subset(list(references), eval_samples, key=lambda mr: mr, option="trainability_eval_samples",
                            source=f"{task} test (distinct meaning representations)")
    return {"train": [[r.mr, r.ref] for r in chosen], "test": [[mr, references[mr]] for mr in test_mrs]}


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Per-example ROUGE F1 against the best-matching reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = {name: np.zeros(len(predictions)) for name in ROUGE_TYPES}
    for i, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
        scores = scorer.score_multi(list(refs), prediction)
        for name in ROUGE_TYPES:
            out[name][i] = scores[name].fmeasure
    return out


def _predict(model, tokenizer, test, *, max_new_tokens: int, batch_size: int) -> list[str]:
    generations = generate(
        model,
        tokenizer,
        [mr for mr, _ in test],
        fmt="plain",
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        across_ranks=True,
    )
    return [g.text for g in generations]


def finetune_and_score(
    model,
    tokenizer,
    data: dict[str, Any],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    max_new_tokens: int,
    seed: int,
    generation_batch_size: int = 32,
) -> dict[str, Any]:
    """Fine-tune a copy of ``model`` on ``data["train"]``; ROUGE on ``data["test"]`` before and after.

    ``batch_size`` is the global batch: in a launched job every rank fine-tunes its copy together
    (DDP), each with ``batch_size / ranks`` examples a step, so the budget does not depend on the
    number of processes."""
    from transformers.trainer_callback import PrinterCallback

    from immunize.prompts import CausalLMCollator
    from immunize.training import GuardedTrainer, ImmunizeTrainingArguments, tokenize_pairs

    ranks = world_size()
    if batch_size % ranks:
        raise ImmunizeError(f"--trainability_batch_size {batch_size}: must divide among the {ranks} processes")
    test = data["test"]
    refs = [r for _, r in test]
    before = _predict(model, tokenizer, test, max_new_tokens=max_new_tokens, batch_size=generation_batch_size)
    features = tokenize_pairs(tokenizer, [tuple(p) for p in data["train"]], "plain", max_length)
    if not features:
        raise ImmunizeError("--trainability_max_length: every training example was truncated away")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    student = copy.deepcopy(model)  # the model under evaluation stays untouched
    try:
        with tempfile.TemporaryDirectory(prefix="immunize-trainability-") as workdir:
            args = ImmunizeTrainingArguments(
                output_dir=workdir,
                max_steps=steps,
                per_device_train_batch_size=batch_size // ranks,
                learning_rate=learning_rate,
                lr_scheduler_type="constant",
                warmup_steps=0,
                seed=seed,
                data_seed=seed,
                save_strategy="no",
                logging_steps=1,
                report_to="none",
                disable_tqdm=True,
                use_cpu=device.type == "cpu",
                prompt_format="plain",
                max_length=max_length,
            )
            trainer = GuardedTrainer(
                model=student, args=args, train_dataset=features, data_collator=CausalLMCollator(pad)
            )
            # The per-step losses go into the result; printing every step's log dict is noise.
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
            del trainer
        after = _predict(student, tokenizer, test, max_new_tokens=max_new_tokens, batch_size=generation_batch_size)
    finally:
        del student
        gc.collect()
    return {
        "before": before,
        "after": after,
        "rouge_before": rouge_scores(before, refs),
        "rouge_after": rouge_scores(after, refs),
        "train_losses": losses,
        "train_examples": len(features),
    }


def _serializable(run: dict[str, Any]) -> dict[str, Any]:
    return {
        **run,
        "rouge_before": {k: v.tolist() for k, v in run["rouge_before"].items()},
        "rouge_after": {k: v.tolist() for k, v in run["rouge_after"].items()},
    }


def _from_json(run: dict[str, Any]) -> dict[str, Any]:
    return {
        **run,
        "rouge_before": {k: np.asarray(v) for k, v in run["rouge_before"].items()},
        "rouge_after": {k: np.asarray(v) for k, v in run["rouge_after"].items()},
    }


def _budget(cfg) -> dict[str, Any]:
    return {
        "steps": cfg.trainability_steps,
        "batch_size": cfg.trainability_batch_size,
        "learning_rate": cfg.trainability_learning_rate,
        "max_length": cfg.trainability_max_length,
        "max_new_tokens": cfg.trainability_max_new_tokens,
        "generation_batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }


class Trainability(Section):
    options = (
        "trainability_tasks",
        "trainability_steps",
        "trainability_batch_size",
        "trainability_learning_rate",
        "trainability_max_length",
        "trainability_eval_samples",
        "trainability_max_new_tokens",
        "batch_size",
        "bootstrap_resamples",
        "seed",
    )
    headline = tuple(
        f"{task}_{r}{suffix}" for task in TRAINABILITY_TASKS for r in ROUGE_TYPES for suffix in ("", "_vs_reference")
    )

    def inputs(self, ctx):
        cfg = ctx.config
        tasks = split_list(cfg.trainability_tasks)
        if not tasks:
            raise ImmunizeError("--trainability_tasks: empty (use viggo, e2e)")
        examples = cfg.trainability_steps * cfg.trainability_batch_size
        return {
            task: load_task(
                task, root=ctx.data_root, train_examples=examples, eval_samples=cfg.trainability_eval_samples
            )
            for task in tasks
        }

    def extra_key(self, ctx):
        return {"reference": self._reference_fingerprint(ctx)}

    @staticmethod
    def _reference_fingerprint(ctx) -> str | None:
        if not ctx.config.reference_model:
            return None
        from immunize.models import model_fingerprint

        return model_fingerprint(ctx.config.reference_model)

    def _reference_runs(self, ctx, inputs) -> dict[str, dict[str, Any]] | None:
        """The reference model's runs: from the cache, or fine-tuned now (and cached)."""
        cfg = ctx.config
        reference_fp = self._reference_fingerprint(ctx)
        if reference_fp is None:
            return None
        runs: dict[str, dict[str, Any]] = {}
        reference = None
        try:
            for task, data in inputs.items():
                key = fingerprint({"model": reference_fp, "task": task, "data": data, "budget": _budget(cfg)})
                path = cache_dir() / "evaluation" / "trainability" / f"{key}.json"
                # The main process's cache decides for every rank (all fine-tune together, or none).
                cached = from_main(read_json(path) if path.is_file() else None)
                if cached is not None:
                    ctx.say(f"[trainability] reference {task}: reusing {path}")
                    runs[task] = _from_json(cached)
                    continue
                if reference is None:
                    from immunize.models import load_model_and_tokenizer

                    ctx.say(f"[trainability] loading reference model {cfg.reference_model}")
                    reference = load_model_and_tokenizer(
                        cfg.reference_model,
                        device=cfg.device,
                        dtype=cfg.dtype,
                        trust_remote_code=cfg.trust_remote_code,
                    )
                ctx.say(f"[trainability] reference {task}: fine-tuning {cfg.trainability_steps} steps")
                runs[task] = self._finetune(ctx, *reference, data)
                if is_main():
                    atomic_write_json(path, _serializable(runs[task]))
        finally:
            del reference
            gc.collect()
        return runs

    @staticmethod
    def _finetune(ctx, model, tokenizer, data):
        cfg = ctx.config
        return finetune_and_score(
            model,
            tokenizer,
            data,
            steps=cfg.trainability_steps,
            batch_size=cfg.trainability_batch_size,
            learning_rate=cfg.trainability_learning_rate,
            max_length=cfg.trainability_max_length,
            max_new_tokens=cfg.trainability_max_new_tokens,
            seed=cfg.seed,
            generation_batch_size=cfg.batch_size,
        )

    def run(self, ctx, inputs):
        cfg = ctx.config
        same_as_reference = cfg.reference_model and self._reference_fingerprint(ctx) == ctx.model_fingerprint
        runs = {}
        for task, data in inputs.items():
            ctx.say(f"[trainability] {task}: fine-tuning {cfg.trainability_steps} steps")
            runs[task] = self._finetune(ctx, ctx.model, ctx.tokenizer, data)
        references = runs if same_as_reference else self._reference_runs(ctx, inputs)

        def summary(values: np.ndarray) -> dict[str, Any]:
            return summarize(values, resamples=cfg.bootstrap_resamples, seed=cfg.seed)

        metrics: dict[str, Any] = {}
        breakdown: dict[str, Any] = {}
        rows: list[dict] = []
        for task, run in runs.items():
            ref_run = references[task] if references else None
            task_breakdown: dict[str, Any] = {
                "train_examples": run["train_examples"],
                "train_loss_first": run["train_losses"][0] if run["train_losses"] else None,
                "train_loss_last": run["train_losses"][-1] if run["train_losses"] else None,
                "train_losses": run["train_losses"],
            }
            for r in ROUGE_TYPES:
                after, before = run["rouge_after"][r], run["rouge_before"][r]
                metrics[f"{task}_{r}"] = summary(after)
                task_breakdown[f"{r}_before"] = summary(before)
                task_breakdown[f"{r}_gain"] = summary(after - before)
                if ref_run is not None:
                    metrics[f"{task}_{r}_vs_reference"] = summary(after - ref_run["rouge_after"][r])
                    task_breakdown[f"reference_{r}"] = summary(ref_run["rouge_after"][r])
                    task_breakdown[f"reference_{r}_gain"] = summary(
                        ref_run["rouge_after"][r] - ref_run["rouge_before"][r]
                    )
            if ref_run is not None:
                task_breakdown["reference_train_losses"] = ref_run["train_losses"]
            breakdown[task] = task_breakdown
            for i, (mr, refs) in enumerate(inputs[task]["test"]):
                row = {
                    "task": task,
                    "index": i,
                    "mr": mr,
                    "references": refs,
                    "before": run["before"][i],
                    "after": run["after"][i],
                    **{r: float(run["rouge_after"][r][i]) for r in ROUGE_TYPES},
                }
                if ref_run is not None:
                    row["reference_after"] = ref_run["after"][i]
                    row.update({f"reference_{r}": float(ref_run["rouge_after"][r][i]) for r in ROUGE_TYPES})
                rows.append(row)
        details = {
            "budget": _budget(cfg),
            "reference_model": cfg.reference_model,
            "reference_fingerprint": self._reference_fingerprint(ctx),
            "rouge": "F1, stemmed, best reference",
        }
        return SectionResult(metrics=metrics, breakdown=breakdown, rows=rows, details=details)
