"""Small classifier/regressor heads on frozen features, saved as safetensors + JSON.

A head standardizes its input features, runs an MLP (no hidden layer = logistic regression) and
returns a logit; ``sigmoid(logit)`` is the score. The same loss serves both tasks: binary
cross-entropy with hard targets (classification) or soft targets in [0, 1] (regressing a
probability-like score such as Perspective toxicity), so a prediction is always in [0, 1].

Nothing here pickles: weights go to ``head.safetensors``, the architecture to JSON.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from immunize.errors import ImmunizeError
from immunize.io import atomic_write_bytes
from immunize.judges.specs import HeadConfig

WEIGHTS_FILE = "head.safetensors"


@contextmanager
def one_thread() -> Iterator[None]:
    """Run a head on one CPU thread, then restore the caller's setting.

    Head matrices are small: with two intra-op threads on a busy 2-core machine, thread
    synchronization made a fit 4x slower (251 s vs 64 s, same result), and on an idle one the
    second thread gains little.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Head(nn.Module):
    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float):
        super().__init__()
        self.in_dim = in_dim
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.scale).squeeze(-1)

    @torch.no_grad()
    def predict(self, features: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Scores in [0, 1] for a ``(n, in_dim)`` array."""
        self.eval()
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"head expects (n, {self.in_dim}) features, got {tuple(x.shape)}")
        with one_thread():
            out = [torch.sigmoid(self(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
        return torch.cat(out).double().numpy() if out else np.zeros(0)


def sample_weights(targets: np.ndarray, sources: np.ndarray | None, config: HeadConfig) -> np.ndarray:
    """Per-example weights with mean 1.

    With ``source_power`` p < 1 a source of n examples weighs n**p in total instead of n, so the
    10,000 BeaverTails answers do not drown the few hundred XSTest or benign ones. With
    ``balance_classes`` (hard targets only) the two classes then weigh the same in total.
    """
    targets = np.asarray(targets, dtype=np.float64)
    weights = np.ones(len(targets), dtype=np.float64)
    if sources is not None and config.source_power != 1.0:
        _, index, counts = np.unique(np.asarray(sources), return_inverse=True, return_counts=True)
        weights = counts[index].astype(np.float64) ** (config.source_power - 1.0)
    if config.balance_classes and np.isin(targets, (0.0, 1.0)).all():
        pos = targets >= 0.5
        if pos.any() and (~pos).any():
            weights[pos] *= 0.5 / weights[pos].sum()
            weights[~pos] *= 0.5 / weights[~pos].sum()
    return weights / weights.mean()


def fit_head(features: np.ndarray, targets: np.ndarray, config: HeadConfig,
             weights: np.ndarray | None = None) -> Head:
    """Train a head with AdamW on weighted binary cross-entropy (soft targets allowed)."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    if len(x) == 0:
        raise ImmunizeError("cannot train a judge head on zero examples")
    if weights is None:
        weights = sample_weights(np.asarray(targets), None, config)
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    # fork_rng: seed the initialization and shuffling without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(config.seed)
        head = Head(x.shape[1], config.hidden, config.dropout)
        head.mean.copy_(x.mean(0))
        # A constant feature (e.g. a flag that never fires in a small set) must not divide by zero.
        head.scale.copy_(x.std(0).clamp_min(1e-4))
        optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = max(1, -(-len(x) // config.batch_size))
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1)
        loss_fn = nn.BCEWithLogitsLoss(reduction="none")
        generator = torch.Generator().manual_seed(config.seed)
        head.train()
        for _ in range(config.epochs):
            order = torch.randperm(len(x), generator=generator)
            for begin in range(0, len(x), config.batch_size):
                idx = order[begin:begin + config.batch_size]
                loss = (loss_fn(head(x[idx]), y[idx]) * w[idx]).sum() / w[idx].sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return head.eval()


def save_head(head: Head, config: HeadConfig, directory: str | Path) -> dict[str, Any]:
    """Write ``head.safetensors``; return the JSON-able architecture to store beside it."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    atomic_write_bytes(Path(directory) / WEIGHTS_FILE, save(state))
    return {"in_dim": head.in_dim, "config": config.to_dict()}


def load_head(directory: str | Path, architecture: dict[str, Any]) -> Head:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    try:
        config = HeadConfig.from_dict(architecture["config"])
        head = Head(int(architecture["in_dim"]), config.hidden, config.dropout)
        head.load_state_dict(load_file(str(path)), strict=True)
    except FileNotFoundError:
        raise ImmunizeError(f"{path}: missing; re-run `immunize judge train`") from None
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImmunizeError(f"{path}: does not match its head.json ({first}); "
                            "re-run `immunize judge train`") from None
    return head.eval()

