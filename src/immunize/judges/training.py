"""Train the default judges: build examples, embed (cached), cross-validate, fit, save with a card.

Held-out protocol: ``folds``-fold cross-validation where the fold of an example is fixed by the
hash of its prompt (``immunize.data.splits.prompt_position``), so every held-out score comes from
a head that never saw that prompt (nor, for synthetic pairs, the answer's own prompt). The shipped
head is then fitted on all examples.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from immunize.config import git_revision, package_versions
from immunize.errors import ImmunizeError
from immunize.io import atomic_write_json, atomic_write_text, publish_dir
from immunize.judges.card import render_readme
from immunize.judges.encoders import EmbeddingCache, TextEncoder
from immunize.judges.examples import BUILDERS, ExampleSet, fold_of
from immunize.judges.features import build_features, view_texts
from immunize.judges.heads import fit_head, sample_weights, save_head
from immunize.judges.metrics import binary_metrics, regression_metrics
from immunize.judges.ngrams import NgramModel, fit_ngrams
from immunize.judges.specs import SPECS, TrainedJudgeSpec
from immunize.judges.trained import CARD_FILE, FORMAT_VERSION, META_FILE, embed_views, ensemble, judge_dir
from immunize.locks import cache_lock
from immunize.paths import data_root

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def evaluate(spec: TrainedJudgeSpec, targets: np.ndarray, scores: np.ndarray, sources: np.ndarray,
             ) -> dict[str, Any]:
    metric = binary_metrics if spec.task == "binary" else regression_metrics

    def subset(mask: np.ndarray) -> dict[str, Any]:
        return metric(targets[mask], scores[mask], spec.threshold)

    out: dict[str, Any] = {"all": subset(np.ones(len(targets), dtype=bool))}
    for name, pattern in spec.subsets.items():
        mask = np.array([pattern in s for s in sources], dtype=bool)
        if mask.any():
            out[name] = subset(mask)
    out["by_source"] = {s: subset(sources == s) for s in sorted(set(sources.tolist()))}
    return out


def embed_examples(spec: TrainedJudgeSpec, data: ExampleSet, encoder: TextEncoder,
                   cache: EmbeddingCache | None, progress: Progress) -> np.ndarray:
    prompts = [ex.prompt for ex in data.examples]
    responses = [ex.response for ex in data.examples]
    views = view_texts(spec.blocks, prompts, responses)
    return build_features(spec.blocks, embed_views(encoder, views, cache=cache, progress=progress), responses)


def train_judge(name: str, *, encoder: TextEncoder, data_root_dir: str | Path | None = None,
                out_root: str | Path | None = None, cache: EmbeddingCache | None = None, folds: int = 5,
                progress: Progress = _quiet) -> dict[str, Any]:
    """Train judge ``name`` and write it under ``out_root/name``; return its model card."""
    if name not in SPECS:
        raise ImmunizeError(f"--judges: {name!r} is not a trainable judge (trainable: {', '.join(SPECS)})")
    if folds < 2:
        raise ImmunizeError(f"--folds: need at least 2 for a held-out evaluation, got {folds}")
    spec = SPECS[name]
    start = time.perf_counter()
    root = data_root(data_root_dir)
    data = BUILDERS[name](root, folds=folds)
    if not data.examples:
        raise ImmunizeError(f"judge {name}: no training examples under {root}")
    progress(f"{name}: {len(data.examples)} examples from {len(data.counts())} sources; embedding")
    features = embed_examples(spec, data, encoder, cache, progress)
    embedded = time.perf_counter()

    targets = np.array([ex.target for ex in data.examples], dtype=np.float64)
    sources = np.array([ex.source for ex in data.examples])
    fold_ids = np.array([fold_of(ex.group, folds) for ex in data.examples])
    responses = [ex.response for ex in data.examples]
    held_out_head = np.full(len(targets), np.nan)
    held_out_ngrams = np.full(len(targets), np.nan)
    weights = sample_weights(targets, sources, spec.head)
    for k in range(folds):
        test = fold_ids == k
        if not test.any() or test.all():
            continue
        train = ~test
        fold_weights = sample_weights(targets[train], sources[train], spec.head)
        held_out_head[test] = fit_head(features[train], targets[train], spec.head, fold_weights).predict(
            features[test])
        if spec.ngrams is not None:
            model = fit_ngrams([responses[i] for i in np.flatnonzero(train)], targets[train], spec.ngrams,
                               fold_weights)
            held_out_ngrams[test] = model.predict([responses[i] for i in np.flatnonzero(test)])
        progress(f"{name}: fold {k + 1}/{folds} done")
    if np.isnan(held_out_head).any():
        raise ImmunizeError(f"judge {name}: too few distinct prompts for {folds} folds")
    head = fit_head(features, targets, spec.head, weights)
    ngrams = None
    if spec.ngrams is None:
        metrics = evaluate(spec, targets, held_out_head, sources)
    else:
        metrics = evaluate(spec, targets, ensemble(held_out_head, held_out_ngrams, spec.ngrams.weight), sources)
        # What each part scores alone, on the headline subset: the case for averaging them.
        subset = spec.headline or "all"
        metrics["components"] = {part: evaluate(spec, targets, scores, sources)[subset]
                                 for part, scores in (("head", held_out_head), ("ngrams", held_out_ngrams))}
        ngrams = fit_ngrams(responses, targets, spec.ngrams, weights)
    finished = time.perf_counter()

    card = {
        "name": name,
        "description": spec.description,
        "positive": spec.positive,
        "task": spec.task,
        "threshold": spec.threshold,
        "encoder": {"name": encoder.name, "identity": encoder.identity, "dim": encoder.dim},
        "features": list(spec.blocks),
        "head": spec.head.to_dict(),
        "ngrams": spec.ngrams.to_dict() if spec.ngrams is not None else None,
        "data_root": str(root),
        "data_files_sha256": data.files,
        "counts": data.counts(),
        "n_examples": len(data.examples),
        "heldout_protocol": (f"{folds}-fold cross-validation, fold = hash of the normalized prompt "
                             "(immunize.data.splits.prompt_position); the shipped head is fitted on all "
                             "examples"),
        "headline": spec.headline or "all",
        "heldout": metrics,
        "training_time_s": {"total": round(finished - start, 1), "embedding": round(embedded - start, 1),
                            "heads": round(finished - embedded, 1)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_revision": git_revision(),
        "versions": package_versions(),
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "positive": spec.positive,
        "task": spec.task,
        "threshold": spec.threshold,
        "blocks": list(spec.blocks),
        "encoder": card["encoder"],
    }
    target = judge_dir(name, out_root)
    _write_judge(target, head, ngrams, spec, meta, card)
    progress(f"{name}: saved to {target} ({finished - start:.0f}s)")
    return card


def _write_judge(target: Path, head, ngrams: NgramModel | None, spec: TrainedJudgeSpec,
                 meta: dict[str, Any], card: dict[str, Any]) -> None:
    """Write into a staging directory, then swap it in: a reader sees the old judge or the new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging."))
    try:
        meta["head"] = save_head(head, spec.head, staging)
        if ngrams is not None:
            ngrams.save(staging)
            meta["ngrams_weight"] = ngrams.config.weight
        atomic_write_json(staging / META_FILE, meta)
        atomic_write_json(staging / CARD_FILE, card)
        atomic_write_text(staging / "README.md", render_readme(card))
        publish_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def train_judges(names: list[str], *, encoder_name: str = "minilm", device: str | None = None,
                 batch_size: int = 64, data_root_dir: str | Path | None = None, out_root: str | Path | None = None,
                 embedding_cache: bool = True, folds: int = 5, progress: Progress = _quiet) -> dict[str, dict]:
    """Train several judges on one encoder (loaded once) and one embedding cache; their model cards."""
    from immunize.judges.encoders import make_encoder
    from immunize.judges.trained import judges_dir

    unknown = [n for n in names if n not in SPECS]
    if not names or unknown:
        raise ImmunizeError(f"--judges: {', '.join(unknown) or 'nothing given'} (trainable: {', '.join(SPECS)})")
    encoder = make_encoder(encoder_name, device=device, batch_size=batch_size)
    out_root = Path(out_root) if out_root is not None else judges_dir()
    # One process at a time writes the judges and their embedding cache; the cache is read under
    # the lock, so a process that waited reuses every text the first one embedded.
    with cache_lock(out_root, "the trained judges"):
        cache = EmbeddingCache(f"{out_root}/embeddings", encoder.identity, encoder.dim) if embedding_cache else None
        return {name: train_judge(name, encoder=encoder, data_root_dir=data_root_dir, out_root=out_root,
                                  cache=cache, folds=folds, progress=progress) for name in names}
