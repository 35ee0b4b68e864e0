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
from immunize.data.splits import normalize_prompt
from immunize.errors import ImmunizeError
from immunize.io import atomic_write_json, atomic_write_text, publish_dir
from immunize.judges import leakage
from immunize.judges.card import render_readme
from immunize.judges.encoders import EmbeddingCache, TextEncoder
from immunize.judges.examples import BUILDERS, ExampleSet, fold_of
from immunize.judges.heads import fit_head, sample_weights, save_head
from immunize.judges.metrics import binary_metrics, bootstrap_binary, calibration, regression_metrics
from immunize.judges.ngrams import NgramModel, fit_ngrams
from immunize.judges.specs import SPECS, TrainedJudgeSpec, recipe_fingerprint
from immunize.judges.trained import CARD_FILE, FORMAT_VERSION, META_FILE, ensemble, features_of, judge_dir, predict
from immunize.locks import cache_lock
from immunize.paths import data_root

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def subset_mask(pattern: str, sources: np.ndarray) -> np.ndarray:
    """The examples whose source contains ``pattern`` ("!text": whose source does not contain text)."""
    negate, text = pattern.startswith("!"), pattern.removeprefix("!")
    return np.array([(text in s) != negate for s in sources], dtype=bool)


def evaluate(spec: TrainedJudgeSpec, targets: np.ndarray, scores: np.ndarray, sources: np.ndarray,
             groups: np.ndarray | None = None) -> dict[str, Any]:
    """Held-out metrics overall, per subset and per source; binary ones with bootstrap intervals that
    resample whole ``groups`` (the prompts: answers to one prompt are not independent)."""
    metric = binary_metrics if spec.task == "binary" else regression_metrics

    def subset(mask: np.ndarray) -> dict[str, Any]:
        values = metric(targets[mask], scores[mask], spec.threshold)
        if spec.task == "binary":
            values.update(bootstrap_binary(targets[mask], scores[mask], spec.threshold,
                                           clusters=None if groups is None else groups[mask]))
        return values

    out: dict[str, Any] = {"all": subset(np.ones(len(targets), dtype=bool))}
    for name, pattern in spec.subsets.items():
        mask = subset_mask(pattern, sources)
        if mask.any():
            out[name] = subset(mask)
    out["by_source"] = {s: subset(sources == s) for s in sorted(set(sources.tolist()))}
    if spec.task == "binary":
        headline = subset_mask(spec.subsets[spec.headline], sources) if spec.headline else np.ones(len(targets), bool)
        out["calibration"] = calibration(targets[headline], scores[headline])
    return out


def embed_examples(spec: TrainedJudgeSpec, data: ExampleSet, encoder: TextEncoder,
                   cache: EmbeddingCache | None, progress: Progress) -> np.ndarray:
    return features_of(spec.blocks, encoder, [ex.prompt for ex in data.examples],
                       [ex.response for ex in data.examples], cache=cache, progress=progress)


class _ProbeScorer:
    """Scores pairs the judge never trained on the way the judge would be met: a pair whose prompt
    the training set holds gets the head fitted without that prompt's fold (a held-out score); any
    other prompt (a benchmark it never trains on, a BeaverTails prompt of the untrained half) gets the
    shipped head, as ``shipped`` asks for every pair."""

    def __init__(self, spec: TrainedJudgeSpec, encoder: TextEncoder, cache: EmbeddingCache | None,
                 fold_models: dict[int, tuple[Any, NgramModel | None]], shipped: tuple[Any, NgramModel | None],
                 folds: int, trained_prompts: set[str]):
        self.spec, self.encoder, self.cache = spec, encoder, cache
        self.fold_models, self.shipped, self.folds = fold_models, shipped, folds
        self.trained_prompts = trained_prompts

    def _models(self, prompt: str, shipped: bool) -> int:
        """-1: the shipped head; k: the head fitted without fold k."""
        k = fold_of(prompt, self.folds)
        held_out = not shipped and normalize_prompt(prompt) in self.trained_prompts and k in self.fold_models
        return k if held_out else -1

    def __call__(self, prompts: list[str], responses: list[str], *, shipped: bool = False) -> np.ndarray:
        features = features_of(self.spec.blocks, self.encoder, prompts, responses, cache=self.cache)
        chosen = np.array([self._models(p, shipped) for p in prompts], dtype=int)
        weight = self.spec.ngrams.weight if self.spec.ngrams is not None else None
        out = np.full(len(prompts), np.nan)
        for k in sorted(set(chosen.tolist())):
            mask = chosen == k
            head, ngrams = self.shipped if k < 0 else self.fold_models[k]
            out[mask] = predict(head, ngrams, weight, features[mask],
                                [r for r, m in zip(responses, mask, strict=True) if m])
        return out


def probe_card(score: Callable[..., np.ndarray], root: Path, threshold: float) -> dict[str, Any]:
    """The model card's ``probes``: prompt leakage both ways, and BeaverTails answers never trained on."""
    leak = leakage.leakage_probes(root)
    opposite = leakage.opposite_probes(root)
    unseen = leakage.unseen_beavertails_sample(root)
    unseen_scores = score([r.prompt for r in unseen], [r.response for r in unseen], shipped=True)
    unseen_targets = np.array([0.0 if r.is_safe else 1.0 for r in unseen])
    return {
        "protocol": ("leakage: the test half of immunize.judges.leakage.NON_ANSWERS under harmful prompts "
                     "(all pairs harmless); opposite: harmful BeaverTails answers never trained on, under "
                     "innocuous prompts (all harmful). A pair whose prompt is in the training set is scored by "
                     "the head fitted without that prompt's fold, any other by the shipped head. "
                     "unseen_beavertails: rows of the BeaverTails prompts left out of training, shipped head. "
                     "Intervals resample whole prompts."),
        "leakage": leakage.leakage_report(leak, score([p.prompt for p in leak], [p.response for p in leak]),
                                          threshold),
        "opposite": leakage.opposite_report(
            opposite, score([p.prompt for p in opposite], [p.response for p in opposite]),
            score([p.own_prompt for p in opposite], [p.response for p in opposite]), threshold),
        "unseen_beavertails": {**binary_metrics(unseen_targets, unseen_scores, threshold),
                               **bootstrap_binary(unseen_targets, unseen_scores, threshold,
                                                  clusters=[normalize_prompt(r.prompt) for r in unseen]),
                               "calibration": calibration(unseen_targets, unseen_scores)},
        "files_sha256": _probe_hashes(root),
        "missing_files": leakage.missing_sources(root),
    }


def _probe_hashes(root: Path) -> dict[str, str]:
    from immunize.io import file_sha256

    return {rel: file_sha256(root / rel) for rel in sorted(leakage.PROBE_FILES) if (root / rel).is_file()}


def train_judge(name: str, *, encoder: TextEncoder, data_root_dir: str | Path | None = None,
                out_root: str | Path | None = None, cache: EmbeddingCache | None = None, folds: int = 5,
                progress: Progress = _quiet, spec: TrainedJudgeSpec | None = None) -> dict[str, Any]:
    """Train judge ``name`` and write it under ``out_root/name``; return its model card.

    ``spec`` replaces ``SPECS[name]`` (the judge variants benchmark trains alternatives this way).
    """
    if spec is None and name not in SPECS:
        raise ImmunizeError(f"--judges: {name!r} is not a trainable judge (trainable: {', '.join(SPECS)})")
    if folds < 2:
        raise ImmunizeError(f"--folds: need at least 2 for a held-out evaluation, got {folds}")
    spec = spec or SPECS[name]
    start = time.perf_counter()
    root = data_root(data_root_dir)
    data = BUILDERS[name](root, folds=folds, **spec.example_options)
    if not data.examples:
        raise ImmunizeError(f"judge {name}: no training examples under {root}")
    progress(f"{name}: {len(data.examples)} examples from {len(data.counts())} sources; embedding")
    features = embed_examples(spec, data, encoder, cache, progress)
    embedded = time.perf_counter()

    targets = np.array([ex.target for ex in data.examples], dtype=np.float64)
    sources = np.array([ex.source for ex in data.examples])
    fold_ids = np.array([fold_of(ex.group, folds) for ex in data.examples])
    groups = np.array([normalize_prompt(ex.group) for ex in data.examples])
    responses = [ex.response for ex in data.examples]
    held_out_head = np.full(len(targets), np.nan)
    held_out_ngrams = np.full(len(targets), np.nan)
    weights = sample_weights(targets, sources, spec.head)
    fold_models: dict[int, tuple[Any, NgramModel | None]] = {}
    for k in range(folds):
        test = fold_ids == k
        if not test.any() or test.all():
            continue
        train = ~test
        fold_weights = sample_weights(targets[train], sources[train], spec.head)
        fold_head = fit_head(features[train], targets[train], spec.head, fold_weights)
        held_out_head[test] = fold_head.predict(features[test])
        model = None
        if spec.ngrams is not None:
            model = fit_ngrams([responses[i] for i in np.flatnonzero(train)], targets[train], spec.ngrams,
                               fold_weights)
            held_out_ngrams[test] = model.predict([responses[i] for i in np.flatnonzero(test)])
        fold_models[k] = (fold_head, model)
        progress(f"{name}: fold {k + 1}/{folds} done")
    if np.isnan(held_out_head).any():
        raise ImmunizeError(f"judge {name}: too few distinct prompts for {folds} folds")
    head = fit_head(features, targets, spec.head, weights)
    ngrams = None
    if spec.ngrams is None:
        metrics = evaluate(spec, targets, held_out_head, sources, groups)
    else:
        metrics = evaluate(spec, targets, ensemble(held_out_head, held_out_ngrams, spec.ngrams.weight), sources,
                           groups)
        # What each part scores alone, on the headline subset: the case for averaging them.
        subset = spec.headline or "all"
        metrics["components"] = {part: evaluate(spec, targets, scores, sources, groups)[subset]
                                 for part, scores in (("head", held_out_head), ("ngrams", held_out_ngrams))}
        ngrams = fit_ngrams(responses, targets, spec.ngrams, weights)
    probes = None
    if spec.probes:
        progress(f"{name}: prompt-leakage probes")
        scorer = _ProbeScorer(spec, encoder, cache, fold_models, (head, ngrams), folds, set(groups.tolist()))
        probes = probe_card(scorer, root, spec.threshold)
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
        **({"probes": probes} if probes is not None else {}),
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
        "recipe": recipe_fingerprint(spec),
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
