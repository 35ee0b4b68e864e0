"""Run evaluation sections against one model, reusing results that are already on disk.

``evaluate`` is the entry point for the CLI and for pipelines: it takes a model name (loaded
lazily, only if some section has to run) or an already-loaded model, runs the selected sections in
order, and writes one result per section plus ``summary.json``.

In a launched job every rank calls ``evaluate`` with the same arguments and loads the model on its
own device. Sections run on every rank (generation and judging are shared out across the ranks,
``immunize.distributed``), except those marked ``main_only`` (lm-evaluation-harness, perplexity),
which the main process runs alone; the main process writes every file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from immunize.config import config_to_dict, fingerprint, write_provenance
from immunize.distributed import from_main, is_main, on_main, wait
from immunize.errors import ImmunizeError
from immunize.evaluation.config import EvaluationConfig, resolve_suite, split_list
from immunize.evaluation.judging import Judge, LoadedJudge, load_role
from immunize.evaluation.registry import Section, get_section, section_names
from immunize.evaluation.results import (
    SCHEMA,
    SCHEMA_VERSION,
    load_matching,
    result_path,
    section_key,
    write_result,
)
from immunize.generation import Generation, generate
from immunize.io import atomic_write_json
from immunize.paths import data_root

log = logging.getLogger(__name__)

# Judge role → (config option naming the judge, option naming its fallback).
JUDGE_ROLES: dict[str, tuple[str, str]] = {
    "harmfulness": ("harmfulness_judge", "harmfulness_judge_fallback"),
    "refusal": ("refusal_judge", "refusal_judge_fallback"),
    "toxicity": ("toxicity_judge", "toxicity_judge_fallback"),
}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A content hash of an in-memory model's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return "weights:" + digest.hexdigest()[:16]


class EvaluationContext:
    """What a section needs: the config, the model (loaded on first use), judges, data, output."""

    def __init__(
        self,
        config: EvaluationConfig,
        output_dir: str | Path,
        *,
        model=None,
        tokenizer=None,
        model_fingerprint: str | None = None,
        judges: Mapping[str, Judge] | None = None,
        verbose: bool = False,
    ):
        self.config = config
        self.output_dir = Path(output_dir)
        self._model = model
        self._tokenizer = tokenizer
        self._owns_model = model is None  # loaded here from config.model, on first use
        self._model_fingerprint = model_fingerprint
        self._injected_judges = dict(judges or {})
        self._judges: dict[str, LoadedJudge] = {}
        self.verbose = verbose

    @property
    def model_name(self) -> str:
        if not self._owns_model:
            return getattr(self._model, "name_or_path", None) or f"in-memory {type(self._model).__name__}"
        return self.config.model

    def _load(self) -> None:
        from immunize.models import load_model_and_tokenizer

        self.say(f"loading model {self.config.model}")
        self._model, self._tokenizer = load_model_and_tokenizer(
            self.config.model,
            device=self.config.device,
            dtype=self.config.dtype,
            trust_remote_code=self.config.trust_remote_code,
        )
        self._model.eval()

    @property
    def model(self):
        if self._model is None:
            self._load()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self._owns_model:
                raise ImmunizeError("evaluate(): pass the tokenizer along with an already-loaded model")
            self._load()
        return self._tokenizer

    @property
    def model_fingerprint(self) -> str:
        if self._model_fingerprint is None:
            if not self._owns_model:
                self._model_fingerprint = weights_fingerprint(self._model)
            else:
                from immunize.models import model_fingerprint

                self._model_fingerprint = model_fingerprint(self.config.model)
        return self._model_fingerprint

    @property
    def dtype(self) -> str:
        """The weights' dtype (it changes the numbers, so it is part of every key)."""
        if self._model is not None:
            return str(next(self._model.parameters()).dtype)
        from immunize.models import choose_device, choose_dtype

        return str(choose_dtype(self.config.dtype, choose_device(self.config.device)))

    @cached_property
    def data_root(self) -> Path:
        return data_root(self.config.data_root)

    def judge(self, role: str) -> LoadedJudge:
        if role not in self._judges:
            if role in self._injected_judges:
                obj = self._injected_judges[role]
                self._judges[role] = LoadedJudge(role, obj, obj.name)
            else:
                name_option, fallback_option = JUDGE_ROLES[role]
                self._judges[role] = load_role(
                    role,
                    getattr(self.config, name_option),
                    getattr(self.config, fallback_option),
                    option=name_option,
                )
        return self._judges[role]

    def generate(self, prompts: Sequence[str], *, fmt: str, max_new_tokens: int) -> list[Generation]:
        return generate(
            self.model,
            self.tokenizer,
            prompts,
            fmt=fmt,
            max_new_tokens=max_new_tokens,
            batch_size=self.config.batch_size,
            across_ranks=True,
        )

    def say(self, message: str) -> None:
        if not is_main():  # one log per job
            return
        log.info(message)
        if self.verbose:
            print(message, flush=True)


def selected_sections(config: EvaluationConfig) -> list[str]:
    wanted = section_names() if config.sections.strip() in ("", "all") else split_list(config.sections)
    for name in [*wanted, *split_list(config.skip)]:
        get_section(name)  # raises on an unknown name
    skipped = set(split_list(config.skip))
    return [name for name in wanted if name not in skipped]


def run_section(section: Section, ctx: EvaluationContext) -> tuple[dict[str, Any], bool]:
    """Run one section (or reuse its stored result); returns (result document, reused)."""
    cfg = ctx.config
    inputs = section.inputs(ctx)
    inputs_fp = fingerprint(inputs)
    judges = {role: ctx.judge(role) for role in section.judges}
    judge_records = {role: judge.record() for role, judge in judges.items()}
    options = {name: getattr(cfg, name) for name in section.options}
    key = section_key(
        section=section.name,
        model_fingerprint=ctx.model_fingerprint,
        judges={role: [r["name"], r["fingerprint"]] for role, r in judge_records.items()},
        options=options,
        inputs_fingerprint=inputs_fp,
        extra={"dtype": ctx.dtype, **section.extra_key(ctx)},
    )
    if not cfg.force and (stored := from_main(load_matching(ctx.output_dir, section.name, key))):
        ctx.say(f"[{section.name}] reusing {result_path(ctx.output_dir, section.name)} (key {key})")
        return stored, True
    ctx.say(f"[{section.name}] running")
    start, cpu_start = time.perf_counter(), time.process_time()
    result = on_main(lambda: section.run(ctx, inputs)) if section.main_only else section.run(ctx, inputs)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    document = on_main(lambda: write_result(
        ctx.output_dir,
        section.name,
        key=key,
        model={"name": ctx.model_name, "fingerprint": ctx.model_fingerprint},
        judges=judge_records,
        options=options,
        inputs_fingerprint=inputs_fp,
        metrics=result.metrics,
        breakdown=result.breakdown,
        details=result.details,
        rows=result.rows,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
    ))
    ctx.say(f"[{section.name}] done in {seconds:.1f}s ({cpu_seconds:.0f} CPU-s): {headline_text(section, document)}")
    return document, False


def headline(section: Section, document: dict[str, Any]) -> dict[str, Any]:
    metrics = document.get("metrics", {})
    return {name: metrics[name] for name in section.headline if name in metrics}


def headline_text(section: Section, document: dict[str, Any]) -> str:
    parts = []
    for name, metric in headline(section, document).items():
        value = metric.get("value") if isinstance(metric, dict) else metric
        ci = metric.get("ci95") if isinstance(metric, dict) else None
        if value is None:
            parts.append(f"{name} n/a")
        elif ci:
            parts.append(f"{name} {value:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]")
        else:
            parts.append(f"{name} {value:.4g}")
    return ", ".join(parts)


def evaluate(
    model: str | torch.nn.Module | None = None,
    tokenizer=None,
    config: EvaluationConfig | None = None,
    output_dir: str | Path | None = None,
    *,
    judges: Mapping[str, Judge] | None = None,
    model_fingerprint: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` (a name, or a loaded model with its ``tokenizer``); returns the summary.

    ``config`` defaults to the quick suite; ``output_dir`` overrides ``config.output_dir``.
    ``judges`` maps roles (harmfulness, refusal, toxicity) to judge objects, overriding the names
    in the config; ``model_fingerprint`` saves hashing the weights of an in-memory model.
    """
    config = config or EvaluationConfig()
    if model is not None and not isinstance(model, str) and tokenizer is None:
        raise ImmunizeError("evaluate(): pass the tokenizer along with an already-loaded model")
    if isinstance(model, str):
        config = EvaluationConfig(**{**config_to_dict(config), "model": model})
        model = None
    config = resolve_suite(config)
    out = Path(output_dir or config.output_dir)
    config = EvaluationConfig(**{**config_to_dict(config), "output_dir": str(out)})
    ctx = EvaluationContext(
        config,
        out,
        model=model,
        tokenizer=tokenizer,
        model_fingerprint=model_fingerprint,
        judges=judges,
        verbose=verbose,
    )
    names = selected_sections(config)
    if not names:
        raise ImmunizeError("--sections/--skip: no section left to run")
    # The model and every judge the selected sections need are checked (loaded) before anything is
    # written: a bad one fails before any work is done, leaving no provenance of a run that never ran.
    model_fp = ctx.model_fingerprint
    for name in names:
        for role in get_section(name).judges:
            ctx.judge(role)
    out.mkdir(parents=True, exist_ok=True)
    if is_main():
        write_provenance(out, {"evaluate": config}, {"model_fingerprint": model_fp})
    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "model": {"name": ctx.model_name, "fingerprint": ctx.model_fingerprint},
        "suite": config.suite,
        "config_fingerprint": fingerprint(config_to_dict(config)),
        "sections": {},
    }
    start, cpu_start = time.perf_counter(), time.process_time()
    for name in names:
        section = get_section(name)
        document, reused = run_section(section, ctx)
        summary["sections"][name] = {
            "file": result_path(out, name).name,
            "key": document["key"],
            "reused": reused,
            "selected": True,
            "seconds": document["seconds"],
            "metrics": headline(section, document),
        }
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["cpu_seconds"] = round(time.process_time() - cpu_start, 2)
    # Sections of this model evaluated by earlier runs into the same directory stay in the summary.
    for name in section_names():
        if name in summary["sections"] or not result_path(out, name).is_file():
            continue
        try:
            document = json.loads(result_path(out, name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if document.get("schema_version") == SCHEMA_VERSION and document.get("model") == summary["model"]:
            summary["sections"][name] = {
                "file": result_path(out, name).name,
                "key": document["key"],
                "reused": True,
                "selected": False,
                "seconds": document["seconds"],
                "metrics": headline(get_section(name), document),
            }
    if is_main():
        atomic_write_json(out / "summary.json", summary)
    wait()  # no rank reads this directory before the summary is written
    return summary
