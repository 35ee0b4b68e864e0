"""Held-out metrics for judges: ranking (AUROC), decisions at the threshold, and regression fit."""

from __future__ import annotations

import numpy as np


def _round(x: float) -> float:
    return round(float(x), 4)


Metrics = dict[str, float | int | None]


def binary_metrics(targets: np.ndarray, scores: np.ndarray, threshold: float) -> Metrics:
    """AUROC (None when one class is absent), accuracy, precision/recall/F1 of ``score >= threshold``."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(targets) >= 0.5
    s = np.asarray(scores, dtype=np.float64)
    pred = s >= threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    both = 0 < y.sum() < len(y)
    out: Metrics = {
        "n": len(y),
        "positives": int(y.sum()),
        "auroc": _round(roc_auc_score(y, s)) if both else None,
        "accuracy": _round((pred == y).mean()) if len(y) else None,
        "balanced_accuracy": _round(0.5 * (pred[y].mean() + (~pred[~y]).mean())) if both else None,
        "precision": _round(tp / (tp + fp)) if tp + fp else None,
        "recall": _round(tp / (tp + fn)) if tp + fn else None,
    }
    p, r = out["precision"], out["recall"]
    out["f1"] = _round(2 * p * r / (p + r)) if p and r else None
    return out


def regression_metrics(targets: np.ndarray, predictions: np.ndarray, threshold: float) -> Metrics:
    """Spearman/Pearson correlation, MAE, and the binary metrics of ``target >= threshold``."""
    from scipy.stats import pearsonr, spearmanr

    t = np.asarray(targets, dtype=np.float64)
    p = np.asarray(predictions, dtype=np.float64)
    varied = len(t) > 2 and t.std() > 0 and p.std() > 0
    out: Metrics = {
        "n": len(t),
        "spearman": _round(spearmanr(t, p).statistic) if varied else None,
        "pearson": _round(pearsonr(t, p).statistic) if varied else None,
        "mae": _round(np.abs(t - p).mean()) if len(t) else None,
    }
    at = binary_metrics(t >= threshold, p, threshold)
    out.update({f"{k}@{threshold:g}": v for k, v in at.items() if k != "n"})
    return out
