"""Judges as evaluations use them: loaded by name, with an explicit, recorded fallback.

The judges themselves live in ``immunize.judges`` (``load_judge(name)`` → an object with
``score(prompts, responses)`` in [0, 1], ``label``, ``name``, ``threshold``, ``fingerprint()``).
An evaluation asks for a judge by *role* (harmfulness, refusal, toxicity); the config names the
judge for each role and, optionally, a fallback used when that judge cannot be loaded (e.g. not
trained yet). A fallback is never silent: the result records which judge was asked for, which one
scored, and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from immunize.distributed import share
from immunize.errors import ImmunizeError

log = logging.getLogger(__name__)


class Judge(Protocol):
    name: str
    threshold: float

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray: ...

    def label(self, prompts: list[str], responses: list[str]) -> np.ndarray: ...

    def fingerprint(self) -> str: ...


@dataclass
class LoadedJudge:
    role: str
    judge: Judge
    requested: str  # the judge the config asked for
    fallback_reason: str | None = None  # why ``requested`` was not used (None: it was)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.judge.name,
            "fingerprint": self.judge.fingerprint(),
            "threshold": float(self.judge.threshold),
            "requested": self.requested,
            "fallback_reason": self.fallback_reason,
        }

    def scores(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """The judge's scores; in a launched job every rank calls this and they share the texts out."""
        values = np.asarray(self._shared(self.judge.score, prompts, responses), dtype=np.float64)
        if values.shape != (len(prompts),):
            raise ImmunizeError(f"judge {self.judge.name!r} returned {values.shape} scores for {len(prompts)} texts")
        if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > 1):
            raise ImmunizeError(f"judge {self.judge.name!r} returned scores outside [0, 1]")
        return values

    def labels(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return np.asarray(self._shared(self.judge.label, prompts, responses), dtype=bool)

    @staticmethod
    def _shared(method, prompts, responses) -> list:
        """``method`` over contiguous parts of the (prompt, response) pairs, one per rank, in order.
        Judges that batch by length see other batches than in one process: their scores agree to
        float rounding, not bit for bit."""
        def part(pairs: list[tuple[str, str]]) -> list:
            return list(method([p for p, _ in pairs], [r for _, r in pairs])) if pairs else []

        return share(part, list(zip(prompts, responses, strict=True)))


def _load(name: str) -> Judge:
    try:
        from immunize.judges import load_judge
    except ImportError as err:
        raise ImmunizeError(f"judge {name!r}: the judges package is not available ({err})") from None
    return load_judge(name)


def load_role(role: str, name: str, fallback: str | None = None, *, option: str) -> LoadedJudge:
    """Load judge ``name`` for ``role``; on failure use ``fallback`` (if any) and say so."""
    try:
        return LoadedJudge(role, _load(name), name)
    except ImmunizeError as err:
        if not fallback or fallback == name:
            raise ImmunizeError(f"--{option} {name}: {err}") from None
        log.warning("%s judge %r unavailable (%s); falling back to %r", role, name, err, fallback)
        print(f"warning: {role} judge {name!r} unavailable ({err}); using fallback {fallback!r}")
        return LoadedJudge(role, _load(fallback), name, fallback_reason=str(err))
