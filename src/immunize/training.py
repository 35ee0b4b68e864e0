"""Plumbing shared by every trainer (defences, attacks, trainability fine-tunes).

- ``ImmunizeTrainingArguments``: a ``TrainingArguments`` subclass with the model/data options
  every method needs; each method subclasses it with its own fields and paper defaults.
- ``tokenize_pairs``: (prompt, answer) → features with answer-only labels.
- ``FiniteLossGuard``: a non-finite loss stops the run before it can be checkpointed, so the last
  checkpoint on disk is always a good one.
- ``run_training``: resume from the last checkpoint after a kill. Saving, identity, markers and
  model cards belong to the one method runner, ``immunize.method_runner``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from immunize.errors import ImmunizeError
from immunize.prompts import check_format, encode

log = logging.getLogger(__name__)

@dataclass
class ImmunizeTrainingArguments(TrainingArguments):
    """Options common to every immunize trainer; subclasses add their own and set paper defaults."""

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "alias, local dir, .gguf file or hub id"})
    data_root: str | None = field(default=None, metadata={"help": "local data root (default ../shared/data)"})
    prompt_format: str = field(default="chat",
                               metadata={"help": "chat (tokenizer template) or plain (Question/Answer)"})
    max_length: int = field(default=256, metadata={"help": "tokens per example (prompt + answer)"})
    num_samples: int | None = field(default=None, metadata={"help": "use the first N training examples (all if unset)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the checkpoint"})
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear",
                                     metadata={"help": "comma list of module names, or all-linear"})
    merge_lora: bool = field(default=True, metadata={"help": "save LoRA merged into the base weights"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep intermediate checkpoints after success"})

    # Defaults that suit this project better than Trainer's: frequent logs,
    # columns kept (our datasets are lists of feature dicts), one rolling checkpoint for resume.
    output_dir: str = field(default="runs/train", metadata={"help": "where checkpoints and the final model go"})
    logging_steps: float = field(default=1, metadata={"help": "log every N steps"})
    save_steps: float = field(default=50, metadata={"help": "checkpoint every N steps (for resume)"})
    save_total_limit: int | None = field(default=1, metadata={"help": "checkpoints kept on disk"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep dataset columns (ours are used)"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer"})

    def __post_init__(self):
        check_format(self.prompt_format)
        if self.max_length < 8:
            raise ImmunizeError(f"--max_length {self.max_length}: too short for a prompt and an answer")
        if self.num_samples is not None and self.num_samples <= 0:
            raise ImmunizeError(f"--num_samples {self.num_samples}: must be positive")
        super().__post_init__()


def tokenize_pairs(tokenizer, pairs: Iterable[tuple[str, str]], fmt: str, max_length: int) -> list[dict]:
    """Encode (prompt, answer) pairs; drop those whose answer was truncated away entirely."""
    features = []
    for prompt, answer in pairs:
        enc = encode(tokenizer, prompt, answer, fmt, max_length)
        if enc.n_answer_tokens:
            features.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return features


def take(items: Sequence, n: int | None, what: str) -> list:
    if n is None:
        return list(items)
    if n > len(items):
        raise ImmunizeError(f"--num_samples {n}: only {len(items)} {what} available")
    return list(items[:n])


def check_finite(loss: torch.Tensor, step: int, output_dir: str) -> None:
    """Stop on NaN/inf before the optimizer or a checkpoint sees it."""
    if not torch.isfinite(loss.detach()).all():
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        raise ImmunizeError(
            f"non-finite loss ({loss.detach().float().item()}) at step {step}; stopped. "
            f"Last good checkpoint: {last or 'none yet'}. Lower the learning rate or check the data."
        )


class GuardedTrainer(Trainer):
    """``Trainer`` that refuses to step on a non-finite loss (answer-only SFT needs nothing more:
    labels are already -100 outside the answers, and the model shifts them once)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        check_finite(result[0] if return_outputs else result, self.state.global_step, self.args.output_dir)
        return result


def load_training_model(args: ImmunizeTrainingArguments):
    """Load model + tokenizer on the CPU in the run's dtype; Trainer/accelerate place them."""
    from immunize.models import choose_device, choose_dtype, load_model, load_tokenizer

    dtype = choose_dtype(args.dtype, choose_device("cpu" if args.use_cpu else None))
    model = load_model(args.model, device="cpu", dtype=dtype, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    if args.use_lora:
        model = add_lora(model, args)
    return model, tokenizer


def add_lora(model, args: ImmunizeTrainingArguments):
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = args.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def run_training(trainer: Trainer) -> Any:
    """Train, resuming from the newest checkpoint in ``output_dir`` if a previous run was killed."""
    output_dir = trainer.args.output_dir
    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if last:
        log.warning("resuming from %s", last)
    return trainer.train(resume_from_checkpoint=last)


class StepTimer:
    """Wall time and throughput of a training run, for closing notes and reports."""

    def __init__(self):
        self.start = time.perf_counter()

    def summary(self, steps: int, tokens: int | None = None) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        out = {"wall_seconds": round(elapsed, 2), "steps": steps,
               "seconds_per_step": round(elapsed / steps, 3) if steps else math.nan}
        if tokens:
            out["tokens_per_second"] = round(tokens / elapsed, 1)
        return out
