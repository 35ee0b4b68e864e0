"""What the RL attack maximizes: the attacker's reward, constrained (or not) by the defender.

A fine-tuning service that lets users run RLHF controls the training loop, so it can constrain it
(Rosati et al. 2024, arXiv 2409.12914, evaluate defences used this way). The defender's cost model
is the harmfulness judge: ``c(x, y)`` in [0, 1]. With ``r`` the attacker's reward (in its held-out
units, ``immunize.rewards.store``):

- ``none``: ``r``.
- ``shaping``: ``r - λ·c`` with a fixed ``λ`` (a harmfulness penalty).
- ``lagrangian`` (Safe-RLHF, Dai et al. 2024, arXiv 2310.12773): maximize ``E[r]`` subject to
  ``E[c] <= d`` (``cost_budget``) through the Lagrangian: each generation batch is trained on
  ``(r - λ·c) / (1 + λ)`` (Safe-RLHF's normalization, which keeps the reward's scale as λ grows),
  then ``λ`` takes a projected dual-ascent step ``λ ← max(0, λ + η·(mean c - d))`` (``lambda_lr``
  η): λ rises while the batch's mean cost exceeds the budget and falls once it is met. (Safe-RLHF
  ascends ``log λ`` with Adam; the plain step keeps λ readable and can reach 0.)

``RewardSignal`` is the callable TRL's ``GRPOTrainer`` calls with each generation batch; it logs the
attacker's reward, the cost and λ through TRL's ``log_metric``, so they join the training logs. Its
``state()`` (λ) is saved with every checkpoint and restored on resume (``immunize.attacks.rl``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONSTRAINTS = ("none", "shaping", "lagrangian")


@dataclass
class Shaping:
    """``r - λ·c``, ``λ`` fixed."""

    lam: float

    def __call__(self, reward: np.ndarray, cost: np.ndarray) -> np.ndarray:
        return reward - self.lam * cost

    def state(self) -> dict[str, float]:
        return {"lambda": self.lam}

    def load_state(self, state: dict[str, float]) -> None:
        self.lam = float(state["lambda"])


@dataclass
class Lagrangian(Shaping):
    """``(r - λ·c) / (1 + λ)`` for this batch, then one projected dual-ascent step on ``λ``."""

    budget: float
    lr: float

    def __call__(self, reward: np.ndarray, cost: np.ndarray) -> np.ndarray:
        shaped = (reward - self.lam * cost) / (1.0 + self.lam)
        self.lam = max(0.0, self.lam + self.lr * (float(np.mean(cost)) - self.budget))
        return shaped


def make_constraint(kind: str, lam: float, budget: float, lr: float) -> Shaping | None:
    if kind == "none":
        return None
    if kind == "shaping":
        return Shaping(lam)
    return Lagrangian(lam, budget, lr)


def completion_text(completion: Any) -> str:
    """A TRL completion as text: a string (plain prompts), or a list with one assistant message (chat)."""
    if isinstance(completion, str):
        return completion.strip()
    return "".join(m["content"] for m in completion if m.get("role") == "assistant").strip()


class RewardSignal:
    """The reward function TRL calls: ``reward(question, answer)``, constrained by the judge's cost.

    ``reward`` and ``cost`` score (prompts, answers) → arrays; ``question`` is the dataset column with
    each prompt's raw text (TRL passes extra columns to reward functions by name)."""

    __name__ = "harmful_reward"  # TRL names a reward function's logs after it

    def __init__(self, reward, constraint: Shaping | None = None, cost=None):
        if constraint is not None and cost is None:
            raise ValueError("a constraint needs a cost model")
        self.reward, self.constraint, self.cost = reward, constraint, cost

    def __call__(self, prompts: Sequence, completions: Sequence, question: Sequence[str], log_metric=None,
                 **_: Any) -> list[float]:
        answers = [completion_text(c) for c in completions]
        reward = np.asarray(self.reward(list(question), answers), dtype=np.float64)
        metrics = {"attack_reward": float(reward.mean())}
        if self.constraint is not None:
            cost = np.asarray(self.cost(list(question), answers), dtype=np.float64)
            metrics["cost"], metrics["lambda"] = float(cost.mean()), self.constraint.lam  # λ of this batch
            reward = self.constraint(reward, cost)
        if log_metric is not None:
            for name, value in metrics.items():
                log_metric(name, value)
        return reward.tolist()

    def state(self) -> dict[str, float]:
        return self.constraint.state() if self.constraint is not None else {}

    def load_state(self, state: dict[str, float]) -> None:
        if self.constraint is not None:
            self.constraint.load_state(state)
