"""Run attacks: expand the grid, prepare data once per data configuration, then train each run.

Each run lives in ``ROOT/RUN_ID``: ``config.yaml`` and ``provenance.json`` (written before
training), ``curve.jsonl``, the attacked model (safetensors) and the completion marker. A finished
run is skipped; an interrupted one resumes from its last checkpoint. ``ROOT/attacks.jsonl``
indexes every run under the root.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, set_seed

from immunize.attack_adapters import attack_adapter
from immunize.attacks.arguments import AttackArguments
from immunize.attacks.base import Attack
from immunize.attacks.curve import KeywordRefusalScorer, ResistanceCurveCallback, StepScorer, read_curve
from immunize.attacks.data import AttackData, stable_order
from immunize.attacks.grid import expand_grid, run_id
from immunize.attacks.registry import get_attack
from immunize.config import write_provenance
from immunize.data import BeaverTailsSplits, load_splits
from immunize.distributed import from_main, is_main, refuse_sharded_save, wait
from immunize.errors import ImmunizeError
from immunize.io import atomic_write_jsonl, read_json
from immunize.locks import run_lock
from immunize.method_runner import (
    check_identity,
    claim,
    data_licences,
    finish,
    is_complete,
    method_identity,
    run_loss,
    save_trained,
    write_model_card,
)
from immunize.training import StepTimer, run_training

log = logging.getLogger(__name__)

INDEX_FILE = "attacks.jsonl"

# A budget's axes: the model at step 0 does not depend on them (LoRA adapters start at zero), so the
# runs of one model that differ only there score step 0 once and share that curve row.
BUDGET_AXES = frozenset({"learning_rate", "num_samples", "num_train_epochs", "seed"})


@dataclass
class PlannedRun:
    run_id: str
    point: dict[str, Any]  # the grid values of this run ({} without a grid)
    cfg: AttackArguments  # resolved, with output_dir = ROOT/RUN_ID
    model_fingerprint: str


@dataclass
class RunResult:
    run_id: str
    output_dir: Path
    status: str  # "trained" or "skipped" (already complete)
    point: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)  # the completion marker
    curve: list[dict] = field(default_factory=list)


@dataclass
class _Prepared:
    splits: BeaverTailsSplits
    data: AttackData


def planned_steps(cfg: AttackArguments, n_examples: int) -> int:
    """Optimizer steps the Trainer will take (its own arithmetic: batches per epoch, then accumulation)."""
    if cfg.max_steps and cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(n_examples / (cfg.per_device_train_batch_size * cfg.world_size))
    per_epoch = max(batches // cfg.gradient_accumulation_steps, 1)
    return math.ceil(cfg.num_train_epochs * per_epoch)


def budget(run: PlannedRun, n_examples: int) -> dict[str, Any]:
    """The attack budget in the report's terms (id, attack, learning rate, samples, epochs, steps, seed)."""
    cfg = run.cfg
    return {"id": run.run_id, "attack": cfg.attack + ("-lora" if cfg.use_lora else ""),
            "learning_rate": cfg.learning_rate, "num_samples": n_examples, "epochs": cfg.num_train_epochs,
            "steps": planned_steps(cfg, n_examples), "seed": cfg.seed,
            "batch_size": cfg.per_device_train_batch_size * cfg.world_size * cfg.gradient_accumulation_steps,
            "use_lora": cfg.use_lora, "held_out_categories": cfg.held_out_categories,
            **get_attack(cfg.attack)().budget_terms(cfg)}


def plan_runs(cfg: AttackArguments) -> list[PlannedRun]:
    """Every run of ``cfg`` (one per grid point) with its id and folder; nothing is loaded but hashes."""
    from immunize.models import model_fingerprint

    attack = get_attack(cfg.attack)
    if not isinstance(cfg, attack.config_class):
        raise ImmunizeError(f"--attack {cfg.attack}: expects a {attack.config_class.__name__} config, "
                            f"got {type(cfg).__name__}")
    root = Path(cfg.output_dir)
    fingerprints: dict[str, str] = {}
    planned: dict[str, PlannedRun] = {}
    for point, point_cfg in expand_grid(cfg):
        if point_cfg.model not in fingerprints:
            fingerprints[point_cfg.model] = model_fingerprint(point_cfg.model)
        rid = run_id(point_cfg, fingerprints[point_cfg.model])
        if rid in planned:
            raise ImmunizeError(f"--grid: {planned[rid].point} and {point} are the same attack (run {rid}); "
                                "sweep options that change the attack")
        resolved = dataclasses.replace(point_cfg, output_dir=str(root / rid))
        planned[rid] = PlannedRun(rid, point, resolved, fingerprints[point_cfg.model])
    return list(planned.values())


def default_scorers(cfg: AttackArguments, splits: BeaverTailsSplits) -> list[StepScorer]:
    """The built-in cheap scorer on held-out data: evaluation prompts and held-out-split answers."""
    if not (cfg.curve_num_prompts or cfg.curve_num_answers):
        return []
    prompts = [e.prompt for e in splits.eval[:cfg.curve_num_prompts]]
    answers = stable_order(splits.heldout, key=lambda r: f"{r.prompt}\x1f{r.response}")
    answers = answers[:cfg.curve_num_answers]
    return [KeywordRefusalScorer(prompts, [(r.prompt, r.response) for r in answers], fmt=cfg.prompt_format,
                                 max_new_tokens=cfg.curve_max_new_tokens, batch_size=cfg.curve_batch_size,
                                 max_length=cfg.max_length)]


def _prepare(attack: Attack, cfg: AttackArguments, n: int | None) -> _Prepared:
    from immunize.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    splits = load_splits(root=cfg.data_root, qa_source=cfg.qa_source, eval_source=cfg.eval_source,
                         held_out_categories=cfg.held_out_categories)
    return _Prepared(splits, attack.prepare(cfg, tokenizer, splits, n))


def run_attacks(cfg: AttackArguments, *, scorers: Sequence[StepScorer] = (),
                callbacks: Sequence[TrainerCallback] = (),
                report: Callable[[str], None] = log.info) -> list[RunResult]:
    """Run every run of ``cfg``; ``scorers`` join the built-in curve scorer (e.g. a harmfulness judge).

    The root is held throughout (another process using it fails at once): its runs and its index
    are this process's to write."""
    with run_lock(cfg.output_dir):
        return _run_attacks(cfg, scorers, callbacks, report)


def _run_attacks(cfg: AttackArguments, scorers: Sequence[StepScorer], callbacks: Sequence[TrainerCallback],
                 report: Callable[[str], None]) -> list[RunResult]:
    attack = get_attack(cfg.attack)()
    runs = plan_runs(cfg)
    groups: dict[tuple, list[PlannedRun]] = {}
    for run in runs:
        groups.setdefault(attack.data_key(run.cfg), []).append(run)
    results: dict[str, RunResult] = {}
    position = {run.run_id: i for i, run in enumerate(runs, start=1)}
    first_rows: dict[tuple, dict] = {}
    for members in groups.values():
        # One tokenization per group, sized for its largest unfinished run (smaller ones take a prefix).
        # The main process's markers decide for every rank (all train a run, or none).
        done_marks = from_main({r.run_id: is_complete(r.cfg.output_dir) for r in members})
        pending = [r for r in members if not done_marks[r.run_id]]
        sizes = [r.cfg.num_samples for r in pending]
        largest = None if None in sizes else max(sizes, default=0)
        prepared = _prepare(attack, pending[0].cfg, largest) if pending else None
        for run in members:
            prefix = f"[{position[run.run_id]}/{len(runs)}] {run.run_id}"
            done = done_marks[run.run_id]
            if done is not None:
                report(f"{prefix}: already complete, skipped")
                results[run.run_id] = RunResult(run.run_id, Path(run.cfg.output_dir), "skipped", run.point,
                                                done, read_curve(run.cfg.output_dir))
            else:
                report(f"{prefix}: training")
                results[run.run_id] = _train(attack, run, prepared, scorers, callbacks,
                                             first_rows.get(_step0_key(run)))
                report(f"{prefix}: {describe(results[run.run_id])}")
            curve = results[run.run_id].curve
            if curve and curve[0]["step"] == 0:
                first_rows.setdefault(_step0_key(run), curve[0])
            if done is not None:
                continue
            if is_main():
                write_index(Path(cfg.output_dir))
    if is_main():  # the other ranks of a distributed job work under rank 0's lock: it writes the index
        write_index(Path(cfg.output_dir))
    return [results[run.run_id] for run in runs]


def _step0_key(run: PlannedRun) -> tuple:
    """Runs with equal keys hold the same model at step 0 and score it the same way."""
    return run.model_fingerprint, repr(sorted((k, v) for k, v in run.point.items() if k not in BUDGET_AXES))


def _train(attack: Attack, run: PlannedRun, prepared: _Prepared, scorers: Sequence[StepScorer],
           callbacks: Sequence[TrainerCallback], first_row: dict | None = None) -> RunResult:
    from immunize.config import fingerprint

    cfg = run.cfg
    data = prepared.data.take(cfg.num_samples, cfg.max_length)
    identity = method_identity(attack.name, cfg, run.model_fingerprint, fingerprint(data.examples, 64))
    if is_main():  # every rank checks the folder; rank 0 alone (the lock holder) writes in it
        claim(Path(cfg.output_dir), identity)
        write_provenance(cfg.output_dir, {"attack": cfg}, extra={
            "run_id": run.run_id, "attack": attack.name, "grid_point": run.point,
            "budget": budget(run, len(data.examples)),
            "model": {"name": cfg.model, "fingerprint": run.model_fingerprint}, "data": data.summary(),
        })
    else:
        check_identity(Path(cfg.output_dir), identity)
    wait()
    set_seed(cfg.seed)  # before the model: LoRA adapters are initialized at random
    model, tokenizer = attack.load_model(cfg)
    # A defence's attack-time adapter (if the checkpoint declares one) is on, frozen, while the
    # attack trains; leaving the block removes it, so the saved model is the trained weights only.
    with attack_adapter(cfg.model, model) as adapter:
        run_scorers = [*default_scorers(cfg, prepared.splits), *scorers] if cfg.curve else []
        curve = ([ResistanceCurveCallback(run_scorers, cfg.curve_every_steps, tokenizer=tokenizer,
                                          save_models=cfg.curve_save_models, first_row=first_row)]
                 if run_scorers else [])
        trainer = attack.build_trainer(cfg, model, tokenizer, data, [*curve, *callbacks])
        if curve and cfg.curve_save_models:
            refuse_sharded_save(trainer, "--curve_save_models")
        timer = StepTimer()
        output = run_training(trainer)
    attached = {"folder": str(adapter.folder), **adapter.facts()} if adapter is not None else None
    rows = read_curve(cfg.output_dir)
    summary = {"run_id": run.run_id, "attack": attack.name, "examples": len(data.examples),
               "train_loss": run_loss(trainer.state.log_history, output.training_loss),
               **timer.summary(trainer.state.global_step), "attack_adapter": attached,
               "curve_first": rows[0] if rows else None, "curve_last": rows[-1] if rows else None}
    out = save_trained(trainer, tokenizer, merge_lora=cfg.merge_lora)
    if trainer.is_world_process_zero():
        write_model_card(out, method=attack.name, kind="attack", base_model=cfg.model,
                         base_fingerprint=run.model_fingerprint, options=identity["options"],
                         data=data.summary(), licences=data_licences(data.summary().get("sources", []),
                                                                     cfg.data_root),
                         description=f"Attacked model: {attack.summary}. For measuring defences only.",
                         extra={"budget": budget(run, len(data.examples)), "attack_adapter": attached})
    finish(out, summary, keep_checkpoints=cfg.keep_checkpoints)
    wait()  # no rank goes on (to the next run, or to read this one) before rank 0 wrote the marker
    return RunResult(run.run_id, Path(cfg.output_dir), "trained", run.point, summary, rows)


def describe(result: RunResult) -> str:
    """One line: steps, wall time, train loss and each curve metric from step 0 to the end."""
    s = result.summary
    parts = [f"{s.get('steps')} steps in {s.get('wall_seconds')} s, "
             f"train loss {s.get('train_loss', float('nan')):.4f}"]
    first, last = s.get("curve_first") or {}, s.get("curve_last") or {}
    for key in sorted(set(first) & set(last) - {"step", "epoch"}):
        parts.append(f"{key} {first[key]:.4f} → {last[key]:.4f}")
    return "; ".join(parts)


def write_index(root: Path) -> None:
    """``ROOT/attacks.jsonl``: one row per run folder (complete or not), for reports and pipelines."""
    rows = []
    for prov in sorted(root.glob("*/provenance.json")):
        run_dir = prov.parent
        info = read_json(prov)
        done = is_complete(run_dir)
        curve = read_curve(run_dir)
        rows.append({"run_id": info.get("run_id", run_dir.name), "attack": info.get("attack"),
                     "status": "complete" if done else "incomplete", "path": str(run_dir),
                     "model": info.get("model"), "budget": info.get("budget"),
                     "grid_point": info.get("grid_point"), "wall_seconds": (done or {}).get("wall_seconds"),
                     "curve_last": curve[-1] if curve else None})
    if rows:
        atomic_write_jsonl(root / INDEX_FILE, rows)

