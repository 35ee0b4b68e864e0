"""Point estimates with seeded percentile-bootstrap 95% confidence intervals.

Every headline number an evaluation reports comes with an interval over its own examples, drawn
from a generator seeded by the evaluation's seed, so a re-run reproduces the interval exactly.
Two models evaluated on the same examples are compared by a paired bootstrap of their
per-example differences (``pair_by_key``, ``paired_bootstrap``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
# Resamples drawn per chunk: bounds memory at about 8 MB per 1,000 examples.
_CHUNK = 1000
# Resamples × clusters drawn at once by the paired bootstrap (about 32 MB of indices).
_CELLS = 4_000_000


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic`` (default: the mean) over ``values``.

    ``statistic`` maps a (resamples, n) array to (resamples,) values; rows are resampled with
    replacement. Returns None for empty input; a constant sample gives a zero-width interval.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1:
        raise ValueError("bootstrap_ci expects a 1-D sample")
    if data.size == 0:
        return None
    if resamples < 1:
        raise ValueError("resamples must be positive")
    stat = statistic or (lambda sample: sample.mean(axis=1))
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        draws.append(stat(data[rng.integers(0, data.size, size=(size, data.size))]))
    estimates = np.concatenate(draws)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(estimates, [tail, 100.0 - tail])
    return float(low), float(high)


def ratio_bootstrap_ci(
    numerators: Sequence[float],
    denominators: Sequence[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, float] | None:
    """Interval of ``transform(sum(num) / sum(den))`` with examples (pairs) resampled together
    (e.g. token-weighted perplexity: per-text NLL sums over per-text token counts, then exp)."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError("numerators and denominators must be 1-D and of equal length")
    if num.size == 0:
        return None
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        idx = rng.integers(0, num.size, size=(size, num.size))
        ratio = num[idx].sum(axis=1) / den[idx].sum(axis=1)
        draws.append(transform(ratio) if transform else ratio)
    estimates = np.concatenate(draws)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(estimates, [tail, 100.0 - tail])
    return float(low), float(high)


def summarize(values: Sequence[float] | np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """``{"value": mean, "ci95": [low, high], "n": count}`` (value and interval None when empty)."""
    data = np.asarray(values, dtype=np.float64)
    ci = bootstrap_ci(data, resamples=resamples, seed=seed)
    return {
        "value": float(data.mean()) if data.size else None,
        "ci95": list(ci) if ci else None,
        "n": int(data.size),
    }


@dataclass(frozen=True)
class Pairs:
    """Two models' outcomes on the examples both answered, matched by key (see ``pair_by_key``)."""

    keys: list[str]
    defended: np.ndarray
    reference: np.ndarray
    weights: np.ndarray | None  # per pair, from the reference's outcomes (e.g. answer tokens)
    unpaired: int  # examples of either model without a partner


def pair_by_key(defended: Sequence[Sequence], reference: Sequence[Sequence]) -> Pairs:
    """Match per-example outcomes ``[key, value]`` (or ``[key, value, weight]``) of two models.

    The k-th occurrence of a key on one side pairs with its k-th occurrence on the other, so a
    prompt asked twice (e.g. by two sources) gives two pairs, in file order; an example without a
    partner is counted in ``unpaired``, never paired with another example.
    """
    def occurrences(rows: Sequence[Sequence]) -> dict[tuple[str, int], Sequence]:
        seen: dict[str, int] = {}
        out = {}
        for row in rows:
            key = str(row[0])
            out[key, seen.get(key, 0)] = row
            seen[key] = seen.get(key, 0) + 1
        return out

    mine, theirs = occurrences(defended), occurrences(reference)
    common = [k for k in theirs if k in mine]
    weighted = bool(common) and all(len(theirs[k]) > 2 for k in common)
    return Pairs(
        keys=[key for key, _ in common],
        defended=np.asarray([float(mine[k][1]) for k in common], dtype=np.float64),
        reference=np.asarray([float(theirs[k][1]) for k in common], dtype=np.float64),
        weights=np.asarray([float(theirs[k][2]) for k in common], dtype=np.float64) if weighted else None,
        unpaired=len(mine) + len(theirs) - 2 * len(common),
    )


def paired_bootstrap(
    defended: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    *,
    clusters: Sequence | None = None,
    weights: Sequence[float] | np.ndarray | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Mean difference ``defended − reference`` over paired examples, with a percentile interval.

    Both models answered the same examples, so what varies between resamples is the per-example
    difference: resampling it keeps the two scores of an example together and cancels what the
    examples contribute to both (their difficulty), which two independent intervals cannot.
    Whole ``clusters`` (e.g. the prompt an example answers; ids as ``immunize.judges.metrics``'s
    clustered bootstraps make them) are resampled together; ``weights`` (positive) make it a
    weighted mean (e.g. answer tokens: a difference of log-perplexities). Returns
    ``{"difference", "ci95", "n", "clusters"}``; empty input gives ``difference`` and ``ci95`` None.
    """
    from immunize.judges.metrics import cluster_ids

    a = np.asarray(defended, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("defended and reference must be 1-D and of equal length")
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != a.shape or (w <= 0).any():
        raise ValueError("weights must be positive, one per paired example")
    if a.size == 0:
        return {"difference": None, "ci95": None, "n": 0, "clusters": 0}
    if resamples < 1:
        raise ValueError("resamples must be positive")
    ids = cluster_ids(np.arange(a.size) if clusters is None else clusters)
    count = int(ids.max()) + 1
    # A resample is a multiplicity per cluster: its estimate needs only per-cluster sums.
    weighted = np.bincount(ids, weights=w * (a - b), minlength=count)
    total = np.bincount(ids, weights=w, minlength=count)
    rng = np.random.default_rng(seed)
    draws = []
    chunk = max(1, _CELLS // count)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        drawn = rng.integers(0, count, size=(size, count)) + count * np.arange(size)[:, None]
        multiplicity = np.bincount(drawn.ravel(), minlength=size * count).reshape(size, count)
        draws.append(multiplicity @ weighted / (multiplicity @ total))
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(np.concatenate(draws), [tail, 100.0 - tail])
    return {"difference": float(weighted.sum() / total.sum()), "ci95": [float(low), float(high)],
            "n": int(a.size), "clusters": count}
