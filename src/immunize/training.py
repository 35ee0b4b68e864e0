"""Plumbing shared by every trainer (defences, attacks, trainability fine-tunes).

- ``ImmunizeTrainingArguments``: a ``TrainingArguments`` subclass with the model/data options
  every method needs; each method subclasses it with its own fields and paper defaults.
- ``tokenize_pairs``: (prompt, answer) → features with answer-only labels.
- ``FiniteLossGuard``: a non-finite loss stops the run before it can be checkpointed, so the last
  checkpoint on disk is always a good one.
- ``run_training``: resume from the last checkpoint after a kill; checkpoint by time as well as by
  steps, and on a SIGTERM (a scheduler's pre-emption) save at the end of the step and stop.
  Saving, identity, markers and model cards belong to the one method runner,
  ``immunize.method_runner``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from immunize.config import check_at_least, check_numbers
from immunize.errors import ImmunizeError, Interrupted
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
    save_every_seconds: float = field(
        default=120, metadata={"help": "also checkpoint when this long has passed since the last one (0: never); "
                                       "spaced to at least 10x the last save's duration"})
    save_total_limit: int | None = field(default=1, metadata={"help": "checkpoints kept on disk"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep dataset columns (ours are used)"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer"})

    def __post_init__(self):
        check_format(self.prompt_format)
        if self.max_length < 8:
            raise ImmunizeError(f"--max_length {self.max_length}: too short for a prompt and an answer")
        if self.num_samples is not None and self.num_samples <= 0:
            raise ImmunizeError(f"--num_samples {self.num_samples}: must be positive")
        # Checked before anything runs: Trainer takes 0 here without a word (and trains nothing).
        check_numbers(self)
        check_at_least(self, 1, "per_device_train_batch_size", "per_device_eval_batch_size",
                       "gradient_accumulation_steps", "lora_r", "lora_alpha")
        check_at_least(self, 0, "save_every_seconds")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ImmunizeError(f"--num_train_epochs {self.num_train_epochs:g}: must be positive (or set --max_steps)")
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
    """Train, resuming from the newest checkpoint in ``output_dir`` if a previous run was killed.

    A SIGTERM ends the run with ``Interrupted`` once its checkpoint is saved; nothing after
    training (the final model, the completion marker) runs, so the re-run resumes and finishes it.
    """
    output_dir = trainer.args.output_dir
    last = resumable_checkpoint(output_dir)
    if last:
        log.warning("resuming from %s", last)
    with checkpointing(trainer) as policy:
        result = trainer.train(resume_from_checkpoint=last)
    if policy.signal is not None:
        raise interrupted(policy.signal, trainer.state.global_step, output_dir)
    return result


def resumable_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in ``output_dir``; those a kill cut short are removed.

    ``Trainer`` writes ``trainer_state.json`` last, so a checkpoint without a readable one was being
    saved when its process died. It cannot be resumed, and left in place it would outrank the good
    ones in the Trainer's rotation (which keeps the highest step numbers).
    """
    numbered = [(int(p.name.removeprefix("checkpoint-")), p) for p in Path(output_dir).glob("checkpoint-*")
                if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    for _, checkpoint in sorted(numbered, reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            return str(checkpoint)
        except (OSError, ValueError):
            log.warning("removing %s: its save was cut short", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


class CheckpointPolicy(TrainerCallback):
    """Checkpoints beyond ``save_steps``, so that a killed run loses little.

    - Every ``save_every_seconds``, but never sooner than ten times the last save took: saving then
      costs at most about a tenth of the run, on a tiny model or a 7B one alike.
    - At the end of the step in which a signal arrived (``signal`` is set by ``checkpointing``),
      then training stops.
    - Each checkpoint step and the last step are logging steps too: the log history a checkpoint
      carries then holds the loss of every step before it, which ``run_loss`` needs after a resume.
    """

    def __init__(self, every_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.every_seconds = every_seconds
        self.clock = clock
        self.signal: signal.Signals | None = None
        self.last_save = clock()
        self.save_cost = 0.0
        self.save_started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_save = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        due = bool(self.every_seconds) and now - self.last_save >= max(self.every_seconds, 10 * self.save_cost)
        stop = self.signal is not None
        # Clocks and signals differ between processes; a save is collective, so all ranks must agree.
        due, stop = _any_rank(args, due, stop)
        if due:
            control.should_save = True
        if stop:
            control.should_save = control.should_training_stop = True
            self.signal = self.signal or signal.SIGTERM
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        if control.should_save:
            self.save_started = now
        return control

    def on_save(self, args, state, control, **kwargs):
        now = self.clock()
        if self.save_started is not None:
            self.save_cost, self.save_started = now - self.save_started, None
        self.last_save = now


def _any_rank(args, *flags: bool) -> tuple[bool, ...]:
    """Each flag true if it is true on any process of the job (as is, in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    values = torch.tensor([float(f) for f in flags], device=args.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


@contextmanager
def checkpointing(trainer: Trainer) -> Iterator[CheckpointPolicy]:
    """``CheckpointPolicy`` on ``trainer``, with SIGTERM handed to it instead of killing the process
    mid-step; the callback and the previous handler are back as they were afterwards."""
    policy = CheckpointPolicy(trainer.args.save_every_seconds)
    trainer.add_callback(policy)
    # Python sets signal handlers from the main thread only; elsewhere SIGTERM keeps its default.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main else None

    def on_signal(signum, frame):
        policy.signal = signal.Signals(signum)

    if in_main:
        signal.signal(signal.SIGTERM, on_signal)
    try:
        yield policy
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        trainer.remove_callback(policy)


def interrupted(signum: signal.Signals, step: int, output_dir: str) -> Interrupted:
    """The one line for a run stopped by ``signum``: where it stopped and what a re-run resumes from."""
    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    saved = ("checkpoint saved" if last and Path(last).name == f"checkpoint-{step}"
             else f"last checkpoint: {last or 'none'}")
    return Interrupted(f"interrupted ({signum.name}) at step {step}; {saved}; re-run the same command to resume",
                       signum)


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
