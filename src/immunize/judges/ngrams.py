"""A word n-gram logistic regression on the response text, averaged with a judge's MLP head.

Refusals are said in stock phrases ("I cannot provide", "it is not appropriate", "I must point
out"). A sentence embedding blurs them with the answer's topic; TF-IDF n-grams keep them. On the
refusal judge's cross-validation (XSTest human labels, folds by prompt) the n-grams alone scored
94.2% accuracy against 91.6% for the MLP on MiniLM embeddings, and their mean 93.4% with the best
AUROC (0.985); the mean is shipped because the embeddings carry what the words do not (a refusal
phrased in words the training set never used).

Storage: ``ngrams.json`` (vocabularies, in column order, and the settings) and
``ngrams.safetensors`` (inverse document frequencies, coefficients, intercept). Nothing pickled;
scikit-learn fits the model and rebuilds the vectorizers from the stored vocabularies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from immunize.errors import ImmunizeError
from immunize.io import atomic_write_bytes, atomic_write_json, read_json
from immunize.judges.specs import NgramConfig

JSON_FILE = "ngrams.json"
WEIGHTS_FILE = "ngrams.safetensors"


def view(text: str, first_words: int | None) -> str:
    """The response, or its first ``first_words`` words: where a refusal opens, it says so."""
    return text if first_words is None else " ".join(text.split()[:first_words])


def _vectorizer(ngram_max: int, min_df: int = 1, vocabulary: dict[str, int] | None = None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    # Sublinear tf: a phrase said twice is not twice the refusal.
    return TfidfVectorizer(ngram_range=(1, ngram_max), min_df=min_df, sublinear_tf=True, lowercase=True,
                           vocabulary=vocabulary, dtype=np.float64)


class NgramModel:
    """TF-IDF vectorizers (one per view) feeding one logistic regression."""

    def __init__(self, config: NgramConfig, vectorizers: list, coef: np.ndarray, intercept: float):
        self.config = config
        self.vectorizers = vectorizers
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)

    def _matrix(self, texts: Sequence[str]):
        from scipy.sparse import hstack

        parts = [vec.transform([view(t, first) for t in texts])
                 for vec, (first, _) in zip(self.vectorizers, self.config.views, strict=True)]
        return hstack(parts).tocsr()

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive) for each text."""
        if not len(texts):
            return np.zeros(0)
        logits = self._matrix(texts) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, directory: str | Path) -> None:
        from safetensors.numpy import save

        tensors = {"coef": self.coef, "intercept": np.array([self.intercept])}
        vocabularies = []
        for i, vec in enumerate(self.vectorizers):
            terms = [""] * len(vec.vocabulary_)
            for term, column in vec.vocabulary_.items():
                terms[column] = term
            vocabularies.append(terms)
            tensors[f"idf.{i}"] = np.asarray(vec.idf_, dtype=np.float64)
        atomic_write_bytes(Path(directory) / WEIGHTS_FILE, save(tensors))
        atomic_write_json(Path(directory) / JSON_FILE, {"config": self.config.to_dict(),
                                                        "vocabularies": vocabularies})

    @classmethod
    def load(cls, directory: str | Path) -> NgramModel:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        directory = Path(directory)
        for name in (JSON_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise ImmunizeError(f"{directory / name}: missing; re-run `immunize judge train`")
        try:
            stored = read_json(directory / JSON_FILE)
            tensors = load_file(str(directory / WEIGHTS_FILE))
            config = NgramConfig.from_dict(stored["config"])
            vectorizers = []
            for i, ((_, ngram_max), terms) in enumerate(zip(config.views, stored["vocabularies"], strict=True)):
                vec = _vectorizer(ngram_max, vocabulary={t: j for j, t in enumerate(terms)})
                vec.idf_ = tensors[f"idf.{i}"]
                vectorizers.append(vec)
            model = cls(config, vectorizers, tensors["coef"], float(tensors["intercept"][0]))
            if len(model.coef) != sum(len(v.vocabulary_) for v in vectorizers):
                raise ValueError(f"{len(model.coef)} coefficients for "
                                 f"{sum(len(v.vocabulary_) for v in vectorizers)} terms")
        except (KeyError, TypeError, ValueError, SafetensorError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ImmunizeError(f"{directory / JSON_FILE}: does not match {WEIGHTS_FILE} ({first}); "
                                "re-run `immunize judge train`") from None
        return model


def fit_ngrams(texts: Sequence[str], targets: np.ndarray, config: NgramConfig,
               weights: np.ndarray | None = None) -> NgramModel:
    """Fit the vectorizers and an L2-regularized logistic regression (deterministic: L-BFGS)."""
    from scipy.sparse import hstack
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(targets) >= 0.5
    if labels.all() or not labels.any():
        raise ImmunizeError("an n-gram model needs examples of both classes")
    vectorizers, parts = [], []
    for first, ngram_max in config.views:
        vec = _vectorizer(ngram_max, config.min_df if len(texts) >= 2 * config.min_df else 1)
        parts.append(vec.fit_transform([view(t, first) for t in texts]))
        vectorizers.append(vec)
    regression = LogisticRegression(C=config.c, max_iter=config.max_iter)
    regression.fit(hstack(parts).tocsr(), labels, sample_weight=weights)
    return NgramModel(config, vectorizers, regression.coef_[0], regression.intercept_[0])
