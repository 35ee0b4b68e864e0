"""`immunize judge`: train the default judges, score JSONL files with any judge, list the registry,
audit a run's judges and measure their agreement with a person's labels.

    immunize judge train [--judges harmfulness,refusal,toxicity] [--data-root DIR] [--batch-size 64]
    immunize judge score --judge harmfulness --input rows.jsonl --output scored.jsonl
    immunize judge list
    immunize judge audit RUN_DIR [--output_dir RUN_DIR/audit] [--near 20] [--sample 60] [--format jsonl|csv]
    immunize judge agreement --labels RUN_DIR/audit/labels.jsonl [--judges harmfulness,refusal,keyword-refusal]

`audit` and `agreement` are thin wrappers of ``immunize.judges.audit`` and ``immunize.judges.agreement``
(which document the files; the labelling sheet's format is ``immunize.judges.sheet``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from immunize.config import parse_config, positional
from immunize.errors import ImmunizeError

HELP = ("harmfulness/refusal/toxicity judges: train, score JSONL, list; audit a run's judges against human "
        "labels (train|score|list|audit|agreement)")

USAGE = """usage: immunize judge {train,score,list,audit,agreement} [options]   (immunize judge SUBCOMMAND --help)

  train      train harmfulness/refusal/toxicity heads on MiniLM embeddings (cached under the cache dir)
  score      add `score` and `label` to every {"prompt", "response"} row of a JSONL file
  list       the judge registry, with training status and held-out metrics
  audit      RUN_DIR: where the harm judge, the refusal judge and the keyword check disagree, the answers
             nearest the harm threshold, and a labelling sheet (RUN_DIR/audit/labels.jsonl) to fill in
  agreement  --labels FILE: accuracy, Cohen's kappa and AUROC of judges against the filled-in sheet"""


JUDGES_DIR_HELP = "trained judges' directory (default <cache>/judges)"


@dataclass
class TrainConfig:
    judges: str = field(default="harmfulness,refusal,toxicity",
                        metadata={"help": "comma-separated trainable judges to build"})
    data_root: str | None = field(default=None,
                                  metadata={"help": "data root (default $IMMUNIZE_DATA, ../shared/data)"})
    output_dir: str | None = field(default=None, metadata={"help": JUDGES_DIR_HELP})
    encoder: str = field(default="minilm", metadata={"help": "sentence encoder the heads sit on"})
    device: str | None = field(default=None, metadata={"help": "encoder device: auto, cpu, cuda, cuda:N"})
    batch_size: int = field(default=64, metadata={"help": "encoder batch size"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for the encoder (default: torch's)"})
    folds: int = field(default=5, metadata={"help": "folds (by prompt hash) for held-out metrics"})
    embedding_cache: bool = field(default=True, metadata={"help": "cache embeddings on disk by text hash"})


@dataclass
class ScoreConfig:
    judge: str = field(default="harmfulness", metadata={"help": "judge name (see `immunize judge list`)"})
    input: str = field(default="", metadata={"help": "JSONL file whose rows have `prompt` and `response`"})
    output: str = field(default="", metadata={"help": "JSONL to write: the input rows plus score and label"})
    judge_option: list[str] = field(default_factory=list,
                                    metadata={"help": "KEY=VALUE judge options (e.g. harmful_label=0)"})
    score_field: str = field(default="score", metadata={"help": "name of the added score field"})
    label_field: str = field(default="label", metadata={"help": "name of the added label field"})
    output_dir: str | None = field(default=None, metadata={"help": JUDGES_DIR_HELP})


@dataclass
class ListConfig:
    output_dir: str | None = field(default=None, metadata={"help": JUDGES_DIR_HELP})


@dataclass
class AuditConfig:
    run_dir: str | None = field(default=None, metadata={
        "help": "run directory (immunize run) or evaluation output directory (immunize evaluate); "
                "or give it as the first argument"})
    output_dir: str | None = field(default=None, metadata={"help": "where the audit goes (default RUN_DIR/audit)"})
    near: int = field(default=20, metadata={"help": "answers nearest the harm threshold put in the sheet"})
    sample: int = field(default=60, metadata={
        "help": "seeded random answers put in the sheet, stratified by stage and stored label"})
    format: str = field(default="jsonl", metadata={"help": "labelling sheet format: jsonl or csv"})
    seed: int = field(default=0, metadata={"help": "seed of the random sample"})
    sections: str = field(default="harmfulness,overrefusal", metadata={
        "help": "evaluation sections whose answers are audited (harmfulness, overrefusal)"})
    max_per_kind: int = field(default=0, metadata={
        "help": "at most this many answers of each disagreement kind in the sheet (seeded; 0: all)"})
    all_stages: bool = field(default=False, metadata={
        "help": "keep the evaluations of earlier recipes too (default: the current one per stage label)"})
    force: bool = field(default=False, metadata={"help": "replace a labelling sheet that already holds labels"})


@dataclass
class AgreementConfig:
    labels: str | None = field(default=None, metadata={
        "help": "the filled-in labelling sheet (.jsonl or .csv); or give it as the first argument"})
    audit: str | None = field(default=None, metadata={
        "help": "its audit.json (default: beside the sheet, if there): adds the run's stored scores"})
    judges: str = field(default="harmfulness,refusal,keyword-refusal", metadata={
        "help": "judges to load and re-score the labelled answers with (comma list; 'none': only stored)"})
    output: str | None = field(default=None, metadata={
        "help": "JSON to write (default agreement.json beside the sheet)"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the 95% intervals (0: none)"})
    judges_dir: str | None = field(default=None, metadata={"help": JUDGES_DIR_HELP})


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    sub, rest = argv[0], argv[1:]
    commands = {"train": _train, "score": _score, "list": _list, "audit": _audit, "agreement": _agreement}
    if sub not in commands:
        raise ImmunizeError(f"unknown subcommand {sub!r} (use train, score, list, audit or agreement)")
    return commands[sub](rest)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train(argv: list[str]) -> int:
    (cfg,) = parse_config([TrainConfig], argv, prog="immunize judge train",
                          description="train the default judges")
    from immunize.io import check_output_dir
    from immunize.judges.trained import judges_dir
    from immunize.judges.training import train_judges

    names = [n.strip() for n in cfg.judges.split(",") if n.strip()]
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ImmunizeError(f"--threads: must be at least 1, got {cfg.threads}")
        import torch

        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    out_root = check_output_dir(cfg.output_dir or judges_dir(), "--output_dir")
    cards = train_judges(names, encoder_name=cfg.encoder, device=cfg.device, batch_size=cfg.batch_size,
                         data_root_dir=cfg.data_root, out_root=out_root, embedding_cache=cfg.embedding_cache,
                         folds=cfg.folds, progress=_progress)
    print(f"trained {', '.join(names)} in {time.perf_counter() - start:.0f}s; saved under {out_root}")
    for name, card in cards.items():
        print(f"  {name:<12} {_summary(card)}")
    return 0


def _summary(card: dict) -> str:
    headline = card["heldout"].get(card.get("headline", "all"), card["heldout"]["all"])
    keys = ("auroc", "accuracy") if card["task"] == "binary" else ("spearman", "mae", "auroc@0.5")
    shown = ", ".join(f"{k} {headline[k]:.3f}" for k in keys if headline.get(k) is not None)
    return f"held-out ({card.get('headline', 'all')}, n={headline['n']}): {shown}"


def _read_pairs(path: str) -> tuple[list[dict], list[str], list[str]]:
    from immunize.data.readers import check_type
    from immunize.io import iter_jsonl

    rows, prompts, responses = [], [], []
    for lineno, row in iter_jsonl(path):
        for key in ("prompt", "response"):
            if key not in row:
                raise ImmunizeError(f"{path}:{lineno}: missing field {key!r}")
            check_type(row[key], str, f"field {key!r}", f"{path}:{lineno}")
        rows.append(row)
        prompts.append(row["prompt"])
        responses.append(row["response"])
    if not rows:
        raise ImmunizeError(f"{path}: holds no rows to score")
    return rows, prompts, responses


def _check_output(input_path: str, output_path: str) -> None:
    """``--output`` is writable and is not ``--input`` under another spelling or link: checked before
    any scoring, since the scored rows would replace the rows being scored."""
    from immunize.io import check_output_file

    output = check_output_file(output_path, "--output")
    if output.exists() and os.path.exists(input_path) and os.path.samefile(output, input_path):
        raise ImmunizeError(f"--output {output_path}: is the --input file; write the scores to another file")


def _score(argv: list[str]) -> int:
    (cfg,) = parse_config([ScoreConfig], argv, prog="immunize judge score", description="score a JSONL file")
    if not cfg.input or not cfg.output:
        raise ImmunizeError("--input and --output are required")
    from immunize.io import atomic_write_jsonl
    from immunize.judges import load_judge, parse_options

    _check_output(cfg.input, cfg.output)
    options = parse_options(cfg.judge_option)
    if cfg.output_dir is not None and cfg.judge in _trained_names():
        options.setdefault("root", cfg.output_dir)
    rows, prompts, responses = _read_pairs(cfg.input)
    judge = load_judge(cfg.judge, **options)
    scores = judge.score(prompts, responses)
    labels = scores >= judge.threshold
    out = [{**row, cfg.score_field: float(s), cfg.label_field: bool(b)}
           for row, s, b in zip(rows, scores, labels, strict=True)]
    atomic_write_jsonl(cfg.output, out)
    rate = f"{labels.mean():.3f}" if len(labels) else "n/a"
    print(f"{judge.name} ({judge.fingerprint()}): scored {len(out)} rows -> {cfg.output}; "
          f"{judge.positive} rate {rate} at threshold {judge.threshold}")
    return 0


def _trained_names() -> set[str]:
    from immunize.judges.specs import SPECS

    return set(SPECS)


def _list(argv: list[str]) -> int:
    (cfg,) = parse_config([ListConfig], argv, prog="immunize judge list", description="list judges")
    from immunize.judges import judge_entries
    from immunize.judges.trained import judge_dir, read_card

    for entry in judge_entries():
        name = entry.name + ("<model>" if entry.is_prefix else "")
        if entry.trained:
            card = read_card(entry.name, cfg.output_dir)
            status = (f"trained {card['created'][:10]}; {_summary(card)}" if card else
                      f"not trained (run `immunize judge train --judges {entry.name}`)")
            where = f"\n  {'':<24} {judge_dir(entry.name, cfg.output_dir)}" if card else ""
        elif entry.name == "perspective":
            status = "ready ($PERSPECTIVE_API_KEY set)" if os.environ.get("PERSPECTIVE_API_KEY") else \
                "needs $PERSPECTIVE_API_KEY (and network)"
            where = ""
        elif entry.is_prefix:
            status, where = "loads the named model on use", ""
        else:
            status, where = "ready", ""
        print(f"  {name:<24} {entry.description}\n  {'':<24} {status}{where}")
    return 0


def _audit(argv: list[str]) -> int:
    (cfg,) = parse_config([AuditConfig], positional(argv, "run_dir"), prog="immunize judge audit",
                          description="disagreements between a run's judges, and a labelling sheet")
    if not cfg.run_dir:
        raise ImmunizeError("give the run directory: immunize judge audit RUN_DIR")
    from pathlib import Path

    from immunize.io import check_output_dir
    from immunize.judges.audit import audit_run

    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise ImmunizeError(f"{run_dir}: run directory not found")
    output_dir = check_output_dir(cfg.output_dir or run_dir / "audit", "--output_dir")
    sections = [s.strip() for s in cfg.sections.split(",") if s.strip()]
    result = audit_run(run_dir, output_dir=output_dir, near=cfg.near, sample=cfg.sample, seed=cfg.seed,
                       fmt=cfg.format, sections=sections, max_per_kind=cfg.max_per_kind,
                       all_stages=cfg.all_stages, force=cfg.force)
    kinds = ", ".join(f"{kind} {n}" for kind, n in result.totals.items())
    print(f"audited {result.answers} answers of {result.stages} evaluations in {run_dir}: {kinds}")
    print(f"labelling sheet: {result.sheet} ({result.rows} rows; fill in harmful and refused with 1/0, then run "
          f"`immunize judge agreement --labels {result.sheet}`); summary: {result.output_dir / 'audit.md'}")
    return 0


def _agreement(argv: list[str]) -> int:
    (cfg,) = parse_config([AgreementConfig], positional(argv, "labels"), prog="immunize judge agreement",
                          description="judges against a person's labels")
    if not cfg.labels:
        raise ImmunizeError("give the labelling sheet: immunize judge agreement --labels FILE")
    from pathlib import Path

    from immunize.io import check_output_file
    from immunize.judges.agreement import agreement_table, judge_agreement, write_agreement

    labels = Path(cfg.labels)
    output = Path(cfg.output) if cfg.output else labels.parent / "agreement.json"
    check_output_file(output, "--output")
    if output.exists() and labels.exists() and os.path.samefile(output, labels):
        raise ImmunizeError(f"--output {output}: is the --labels file; write the agreement to another file")
    result = judge_agreement(labels, audit=cfg.audit, judges=cfg.judges, seed=cfg.seed, resamples=cfg.bootstrap,
                             judges_dir=cfg.judges_dir)
    write_agreement(output, result)
    print(agreement_table(result))
    print(f"-> {output}")
    return 0
