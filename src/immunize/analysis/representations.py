"""Harmful vs harmless representations in 2-D, on axes shared by every model compared.

For each model and chosen layer, every (prompt, answer) pair becomes one vector: the mean of the
hidden states over its answer tokens. The PCA basis is fitted once, on the *first* model's
vectors (harmful and harmless together), and every model is projected onto it, so "before" and
"after" a defence are drawn on the same axes: if RepNoise scrambles harmful representations, the
harmful cloud moves or collapses instead of the axes silently rotating with it.

Separability is measured on the full-dimensional vectors (what a fine-tuning attack could exploit),
not on the 2-D picture: the cross-validated accuracy of a logistic-regression probe telling harmful
from harmless. The silhouette of the 2-D coordinates is reported too, describing the picture itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from immunize.analysis.activations import answer_mask, batches, eval_mode, hidden_states
from immunize.errors import ImmunizeError

PROBE_METRIC = "linear-probe accuracy (logistic regression on standardized activations, stratified k-fold CV)"


@torch.no_grad()
def _pooled(model, tokenizer, pairs, fmt, layers, *, max_length,
            batch_size) -> tuple[dict[int, np.ndarray], int]:
    """(layer → ``(len(pairs), hidden)`` answer-token means of the raw hidden states, number of states)."""
    pooled: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    n_states = 0
    with eval_mode(model):
        for batch in batches(tokenizer, pairs, fmt, max_length=max_length, batch_size=batch_size):
            states = hidden_states(model, batch)
            n_states = len(states)
            for layer in layers:
                if not -len(states) <= layer < len(states):
                    raise ImmunizeError(f"representation PCA: layer {layer} out of range for "
                                        f"{type(model).__name__} (0 = embeddings … {len(states) - 1})")
                state = states[layer].float()
                mask = answer_mask(batch["labels"]).to(state.device).unsqueeze(-1).float()
                mean = (state * mask).sum(dim=1) / mask.sum(dim=1)
                pooled[layer].append(mean.double().cpu().numpy())
    return {layer: np.concatenate(chunks) for layer, chunks in pooled.items()}, n_states


def _probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int) -> float | None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(folds, int(np.bincount(labels).min()))
    if folds < 2:
        return None
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(probe, features, labels, cv=StratifiedKFold(n_splits=folds)).mean())


def _silhouette(coords: np.ndarray, labels: np.ndarray) -> float | None:
    from sklearn.metrics import silhouette_score

    if len(set(labels.tolist())) < 2 or len(labels) < 3:
        return None
    return float(silhouette_score(coords, labels))


def representation_pca(
    models: Mapping[str, tuple[object, object]],
    harmful: Sequence[tuple[str, str]],
    harmless: Sequence[tuple[str, str]],
    layers: Sequence[int],
    fmt: str = "chat",
    *,
    max_length: int = 256,
    batch_size: int = 8,
    probe_folds: int = 5,
) -> dict:
    """2-D PCA of answer-token representations for each model × layer × {harmful, harmless}.

    ``models`` maps a label to ``(model, tokenizer)``; the first entry defines the PCA axes.
    ``layers`` index the hidden states: 0 = embeddings, k = output of decoder layer k; negative
    indices count from the last layer. Returns a JSON-ready dict (layer keys are strings)::

        {"layers": [..], "models": [..], "reference": first label, "n": {"harmful": n, "harmless": m},
         "explained_variance": {layer: [pc1, pc2]},
         "points": {model: {layer: {"harmful": [[x, y], ..], "harmless": [[x, y], ..]}}},
         "separability": {model: {layer: probe accuracy or None}}, "separability_metric": str,
         "silhouette": {model: {layer: 2-D silhouette or None}}}
    """
    from sklearn.decomposition import PCA

    if not models:
        raise ImmunizeError("representation PCA: no models given")
    if len(harmful) < 2 or len(harmless) < 2:
        raise ImmunizeError(f"representation PCA: need at least 2 harmful and 2 harmless pairs "
                            f"(got {len(harmful)} and {len(harmless)})")
    if not layers:
        raise ImmunizeError("representation PCA: no layers given")
    pairs = [*harmful, *harmless]
    labels = np.array([1] * len(harmful) + [0] * len(harmless))
    n_harmful = len(harmful)
    features = {}
    for name, (model, tokenizer) in models.items():
        features[name], n_states = _pooled(model, tokenizer, pairs, fmt, list(layers), max_length=max_length,
                                           batch_size=batch_size)
    # Negative indices are stored as the layer they name, so the report's labels are unambiguous.
    keys = [str(layer % n_states) for layer in layers]
    reference = next(iter(models))
    result: dict = {"layers": [int(key) for key in keys], "models": list(models), "reference": reference,
                    "n": {"harmful": len(harmful), "harmless": len(harmless)},
                    "explained_variance": {}, "points": {name: {} for name in models},
                    "separability": {name: {} for name in models}, "separability_metric": PROBE_METRIC,
                    "silhouette": {name: {} for name in models}}
    for layer, key in zip(layers, keys, strict=True):
        basis = features[reference][layer]
        pca = PCA(n_components=2, svd_solver="full").fit(basis)
        result["explained_variance"][key] = [float(v) for v in pca.explained_variance_ratio_]
        for name in models:
            feats = features[name][layer]
            if feats.shape[1] != basis.shape[1]:
                raise ImmunizeError(f"representation PCA: model {name!r} has hidden size {feats.shape[1]}, "
                                    f"the reference {reference!r} has {basis.shape[1]}")
            coords = pca.transform(feats)
            result["points"][name][key] = {"harmful": coords[:n_harmful].round(6).tolist(),
                                           "harmless": coords[n_harmful:].round(6).tolist()}
            result["separability"][name][key] = _probe_accuracy(feats, labels, probe_folds)
            result["silhouette"][name][key] = _silhouette(coords, labels)
    return result
