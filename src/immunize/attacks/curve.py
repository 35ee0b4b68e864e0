"""Resistance curves: score the model every k steps of an attack (and at step 0 and the end).

A scorer is anything with a ``name`` and ``__call__(model, tokenizer) -> dict[str, float]``
(``StepScorer``); the callback puts the model in eval mode under ``torch.no_grad`` for it, with a
defence's attack-time adapter off (``immunize.attack_adapters``), and back in train mode after, and
appends ``{"step": s, "epoch": e, **metrics}`` to ``curve.jsonl`` in the run folder. The file is
rewritten atomically, and a resumed run first drops the rows after the checkpoint it resumes from,
so the curve never holds a step twice.

``KeywordRefusalScorer`` is the cheap built-in: the keyword refusal rate of greedy answers to
held-out evaluation prompts, and the mean log-likelihood of held-out harmful answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from transformers import GenerationConfig, TrainerCallback

from immunize.attack_adapters import adapter_disabled
from immunize.data import looks_like_refusal
from immunize.distributed import is_distributed, is_sharded
from immunize.errors import ImmunizeError
from immunize.io import atomic_write_jsonl, iter_jsonl
from immunize.prompts import IGNORE_INDEX, PromptFormat, encode, pad_batch, render_prompt

log = logging.getLogger(__name__)

CURVE_FILE = "curve.jsonl"
CURVE_MODELS = "curve-models"


@runtime_checkable
class StepScorer(Protocol):
    name: str

    def __call__(self, model, tokenizer) -> dict[str, float]: ...


def read_curve(path: str | Path) -> list[dict]:
    """Rows of a ``curve.jsonl`` (a run folder or the file itself); empty if there is none yet."""
    path = Path(path)
    if path.is_dir():
        path = path / CURVE_FILE
    return [row for _, row in iter_jsonl(path)] if path.is_file() else []


class ResistanceCurveCallback(TrainerCallback):
    """Run ``scorers`` at step 0, every ``every_steps`` optimizer steps and at the end of training.

    ``first_row``: step 0's row measured by another run on the same model (the runner passes it
    between budgets); it is recorded instead of scoring step 0 again, unless curve models are saved.

    Every process scores (sharded models need all ranks for a forward pass); the main process writes.
    """

    def __init__(self, scorers: Sequence[StepScorer], every_steps: int, *, tokenizer=None,
                 save_models: bool = False, path: str | Path | None = None, first_row: dict | None = None):
        if not scorers:
            raise ValueError("ResistanceCurveCallback needs at least one scorer")
        names = [s.name for s in scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"scorer names must be unique, got {names}")
        self.scorers = list(scorers)
        self.every_steps = every_steps
        self.tokenizer = tokenizer
        self.save_models = save_models
        self.path = Path(path) if path is not None else None
        # Step 0's scores, already measured on the same model by a run of another budget: reused as is.
        self.first_row = first_row
        self.rows: list[dict] = []

    def _file(self, args) -> Path:
        return self.path or Path(args.output_dir) / CURVE_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        # Rows after the resumed step came from a trajectory the checkpoint no longer has.
        existing = read_curve(self._file(args))
        self.rows = [r for r in existing if r["step"] <= state.global_step]
        if len(self.rows) != len(existing) and state.is_world_process_zero:
            atomic_write_jsonl(self._file(args), self.rows)
        if state.global_step == 0 and not any(r["step"] == 0 for r in self.rows):
            if self.first_row is not None and not self.save_models:
                self._record(args, dict(self.first_row), state.is_world_process_zero)
            else:
                self._score(args, state, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0:
            self._score(args, state, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self._score(args, state, **kwargs)

    def _score(self, args, state, model=None, processing_class=None, **_):
        step = state.global_step
        if any(r["step"] == step for r in self.rows):
            return
        tokenizer = self.tokenizer or processing_class
        was_training = model.training
        model.eval()
        try:
            # Scored as evaluations will see the model: without a defence's attack-time adapter.
            with torch.no_grad(), adapter_disabled(model):
                metrics: dict[str, float] = {}
                for scorer in self.scorers:
                    values = scorer(model, tokenizer)
                    clash = set(values) & (set(metrics) | {"step", "epoch"})
                    if clash:
                        raise ImmunizeError(f"curve scorer {scorer.name!r} reports {sorted(clash)}, "
                                            "already reported by another scorer")
                    metrics.update({k: float(v) for k, v in values.items()})
        finally:
            model.train(was_training)
        row = {"step": step, "epoch": round(float(state.epoch or 0.0), 4), **metrics}
        self._record(args, row, state.is_world_process_zero)
        if state.is_world_process_zero and self.save_models:
            target = self._file(args).parent / CURVE_MODELS / f"step-{step}"
            model.save_pretrained(target, safe_serialization=True)
            tokenizer.save_pretrained(target)

    def _record(self, args, row: dict, main: bool) -> None:
        self.rows.append(row)
        log.info("curve %s", json.dumps(row))
        if main:
            atomic_write_jsonl(self._file(args), self.rows)


def _device(model) -> torch.device:
    return next(model.parameters()).device


class KeywordRefusalScorer:
    """Cheap harmfulness proxy: keyword refusals on greedy answers, and harmful-answer log-likelihood.

    ``keyword_refusal_rate``: share of ``prompts`` whose greedy answer (``max_new_tokens``) reads as
    a refusal (``immunize.data.looks_like_refusal``); ``keyword_compliance`` = 1 − that. (Named
    apart from a judge's ``refusal_rate``, so both scorers can share a curve.)
    ``harmful_loglik``: mean log-probability per answer token of the ``harmful`` (prompt, answer)
    pairs: it rises toward 0 as an attack teaches the model harmful answers.
    """

    name = "keyword"

    def __init__(self, prompts: Sequence[str], harmful: Sequence[tuple[str, str]], *,
                 fmt: PromptFormat = "chat", max_new_tokens: int = 32, batch_size: int = 16,
                 max_length: int = 256):
        if not prompts and not harmful:
            raise ValueError("KeywordRefusalScorer needs prompts or harmful answers")
        self.prompts = list(prompts)
        self.harmful = list(harmful)
        self.fmt = fmt
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_length = max_length

    def __call__(self, model, tokenizer) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.prompts:
            refusals = [looks_like_refusal(a) for a in self.generate(model, tokenizer)]
            out["keyword_refusal_rate"] = sum(refusals) / len(refusals)
            out["keyword_compliance"] = 1.0 - out["keyword_refusal_rate"]
        if self.harmful:
            out["harmful_loglik"] = self.loglik(model, tokenizer)
        return out

    def generate(self, model, tokenizer) -> list[str]:
        """Greedy answers, batched with left padding."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else tokenizer.eos_token_id
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad,
                                  eos_token_id=eos, use_cache=True)
        answers, device = [], _device(model)
        # Every rank generates every prompt; a sharded model's ranks must take each step together.
        in_step = is_distributed() and is_sharded(model)
        for start in range(0, len(self.prompts), self.batch_size):
            chunk = self.prompts[start:start + self.batch_size]
            texts = [render_prompt(tokenizer, p, self.fmt) for p in chunk]
            ids = [tokenizer(t, add_special_tokens=self.fmt == "plain")["input_ids"] for t in texts]
            input_ids = pad_batch(ids, pad, side="left").to(device)
            attention = pad_batch([[1] * len(i) for i in ids], 0, side="left").to(device)
            generated = model.generate(input_ids=input_ids, attention_mask=attention,
                                       generation_config=config, synced_gpus=in_step)
            answers.extend(tokenizer.decode(row, skip_special_tokens=True).strip()
                           for row in generated[:, input_ids.shape[1]:])
        return answers

    def loglik(self, model, tokenizer) -> float:
        """Mean log-probability per answer token (answer-only labels, one shift, padding masked)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        encoded = [encode(tokenizer, p, a, self.fmt, self.max_length) for p, a in self.harmful]
        encoded = [e for e in encoded if e.n_answer_tokens]
        if not encoded:
            raise ImmunizeError("curve: no harmful answer fits --max_length; raise it")
        total, count = 0.0, 0
        # Full-vocabulary logits are the memory peak here; a quarter of the generation batch keeps them small.
        step = max(1, self.batch_size // 4)
        for start in range(0, len(encoded), step):
            chunk = encoded[start:start + step]
            input_ids = pad_batch([e.input_ids for e in chunk], pad).to(_device(model))
            attention = pad_batch([[1] * len(e.input_ids) for e in chunk], 0).to(_device(model))
            labels = pad_batch([e.labels for e in chunk], IGNORE_INDEX).to(_device(model))
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
            targets = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                    ignore_index=IGNORE_INDEX, reduction="sum")
            total -= nll.item()
            count += int((targets != IGNORE_INDEX).sum())
        return total / count

