"""The judge interface: score (prompt, response) pairs in [0, 1]; a label is ``score >= threshold``.

Every judge, whatever it wraps (a trained head on sentence embeddings, a Hugging Face classifier,
a generative safety model, a web API), is called the same way, so evaluation code never needs to
know which one it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from immunize.errors import ImmunizeError


def check_pairs(prompts: Sequence[str], responses: Sequence[str], judge: str) -> tuple[list[str], list[str]]:
    """Validate the two parallel lists a judge scores; bad input names the judge and the index."""
    for what, seq in (("prompts", prompts), ("responses", responses)):
        if isinstance(seq, (str, bytes)):
            raise ImmunizeError(f"judge {judge}: {what} must be a list of strings, got a single string")
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ImmunizeError(f"judge {judge}: {len(prompts)} prompts but {len(responses)} responses")
    for what, seq in (("prompt", prompts), ("response", responses)):
        for i, item in enumerate(seq):
            if not isinstance(item, str):
                raise ImmunizeError(f"judge {judge}: {what} {i} is {type(item).__name__}, expected a string")
    return prompts, responses


class Judge(ABC):
    """Scores how much a response is ``positive`` (harmful, a refusal, toxic) given its prompt."""

    name: str = "judge"
    threshold: float = 0.5
    positive: str = "positive"  # what a score of 1 means, for tables and model cards

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Float scores in [0, 1], one per (prompt, response) pair."""
        prompts, responses = check_pairs(prompts, responses, self.name)
        if not prompts:
            return np.zeros(0, dtype=np.float64)
        scores = np.asarray(self._score(prompts, responses), dtype=np.float64).reshape(-1)
        if scores.shape != (len(prompts),):
            raise RuntimeError(f"judge {self.name}: {scores.shape[0]} scores for {len(prompts)} pairs")
        if not np.isfinite(scores).all():
            raise RuntimeError(f"judge {self.name}: non-finite scores (broken weights or inputs)")
        # Sigmoids and softmaxes can land a rounding error outside [0, 1]; the contract is [0, 1].
        return np.clip(scores, 0.0, 1.0)

    def label(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Booleans: ``score >= threshold``."""
        return self.score(prompts, responses) >= self.threshold

    @abstractmethod
    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Scores for validated, non-empty, equally long lists."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short stable hash of everything that decides the scores (weights and configuration)."""

    def describe(self) -> dict[str, Any]:
        """What a results file records about the judge that produced its numbers."""
        return {"name": self.name, "positive": self.positive, "threshold": self.threshold,
                "fingerprint": self.fingerprint()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, threshold={self.threshold})"
