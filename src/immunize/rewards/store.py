"""Harmful rewards, cached with a card: a trained reward model, or the harmfulness judge itself.

A reward lives in ``<cache>/rewards/<kind>-<key>/``: ``model-…`` holds the trained reward model
(``model.safetensors``, ``config.json``, the tokenizer), ``judge-…`` only the card (the judge lives
with the judges); both hold ``reward_card.json`` and a ``README.md`` rendered from it. The key hashes
everything that decides the reward: a recipe version, the options (the whole reward-model config
for a trained model; the held-out pairs' options for the judge), the data pack (its MANIFEST hash
and source options) and the backbone's weights or the judge's fingerprint. One process builds an
entry under a cache lock (staged, then swapped in whole); the others wait and reuse it.

The card reports, on held-out pairs whose prompts were never trained on: the pairwise accuracy
(the share of pairs whose harmful answer scores higher; 95% interval resampling whole prompts),
per source, and the mean and standard deviation of the raw reward over the held-out answers
(both sides). ``Reward`` gives every score in those units, ``(raw - mean) / std``, so a reward gain,
a penalty weight and a threshold mean the same for any reward model and for the judge.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from immunize.config import fingerprint, git_revision, package_versions
from immunize.data import BeaverTailsSplits, normalize_prompt
from immunize.errors import ImmunizeError
from immunize.io import atomic_write_json, atomic_write_text, publish_dir, read_json
from immunize.locks import cache_lock
from immunize.paths import cache_dir
from immunize.rewards.harmful import (
    HarmfulRewardConfig,
    Pair,
    PairEncoder,
    RewardPairs,
    backbone_fingerprint,
    reward_pairs,
    train_reward_model,
)

log = logging.getLogger(__name__)

# Bump when pair building, encoding or the card change what a cached reward holds.
REWARD_RECIPE = 1
CARD_FILE = "reward_card.json"
KINDS = ("model", "judge")
# What decides the held-out pairs (all a judge's card depends on, besides the judge).
HELDOUT_OPTIONS = ("preference_data", "num_heldout_pairs", "heldout_fraction", "held_out_categories")

Score = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def rewards_dir() -> Path:
    return cache_dir() / "rewards"


def reward_dir(cfg: HarmfulRewardConfig, judge=None) -> Path:
    """The cache entry of the reward model ``cfg`` trains, or (``judge`` given) of that judge as reward."""
    from immunize.method_runner import config_identity, data_identity

    if judge is None:
        kind, source = "model", {"backbone": backbone_fingerprint(cfg.backbone), "options": config_identity(cfg)}
    else:
        kind, source = "judge", {"judge": judge.name, "fingerprint": judge.fingerprint(),
                                 "options": {name: getattr(cfg, name) for name in HELDOUT_OPTIONS}}
    key = fingerprint({"recipe": REWARD_RECIPE, "data": data_identity(cfg), **source})
    return rewards_dir() / f"{kind}-{key}"


def ensure_reward(cfg: HarmfulRewardConfig, splits: BeaverTailsSplits, judge=None) -> Path:
    """The cached reward (built now if absent): the reward model ``cfg`` trains, or ``judge``'s card."""
    target = reward_dir(cfg, judge)
    if (target / CARD_FILE).is_file():
        return target
    with cache_lock(target, "the harmful reward"):
        if not (target / CARD_FILE).is_file():
            _build(cfg, splits, judge, target)
    return target


def _build(cfg: HarmfulRewardConfig, splits: BeaverTailsSplits, judge, target: Path) -> None:
    start = time.perf_counter()
    pairs = reward_pairs(cfg, splits)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging."))
    try:
        training = None
        if judge is None:
            log.info("training the harmful reward model on %d pairs (%s)", len(pairs.train), cfg.backbone)
            scratch = staging / "trainer"
            training = train_reward_model(dataclasses.replace(cfg, output_dir=str(scratch)), pairs, staging)
            shutil.rmtree(scratch, ignore_errors=True)
            score: Score = RewardModelScorer(staging, cfg.max_length, cfg.max_answer_tokens)
        else:
            score = judge.score
        card = _card(cfg, judge, pairs, heldout_metrics(score, pairs.heldout), training, time.perf_counter() - start)
        atomic_write_json(staging / CARD_FILE, card)
        atomic_write_text(staging / "README.md", render_card(card))
        publish_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def heldout_metrics(score: Score, pairs: Sequence[Pair]) -> dict[str, Any]:
    """Pairwise accuracy (ties count as errors) and the raw reward's spread on held-out pairs."""
    from immunize.judges.metrics import cluster_summary

    prompts = [p.prompt for p in pairs]
    chosen = np.asarray(score(prompts, [p.chosen for p in pairs]), dtype=np.float64)
    rejected = np.asarray(score(prompts, [p.rejected for p in pairs]), dtype=np.float64)
    wins = (chosen > rejected).astype(np.float64)
    clusters = np.array([normalize_prompt(p) for p in prompts])
    sources = np.array([p.source for p in pairs])
    answers = np.concatenate([chosen, rejected])
    return {
        "pairwise_accuracy": cluster_summary(wins, clusters),
        "by_source": {s: cluster_summary(wins[sources == s], clusters[sources == s]) for s in sorted(set(sources))},
        "mean_chosen": float(chosen.mean()), "mean_rejected": float(rejected.mean()),
        "margin": float((chosen - rejected).mean()), "mean": float(answers.mean()), "std": float(answers.std()),
    }


def _card(cfg: HarmfulRewardConfig, judge, pairs: RewardPairs, heldout: dict[str, Any],
          training: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    from immunize.attacks.data import sources_of
    from immunize.method_runner import config_identity

    if judge is None:
        reward = {"backbone": cfg.backbone, "backbone_layers": cfg.backbone_layers,
                  "backbone_fingerprint": backbone_fingerprint(cfg.backbone), "trainer": "trl.RewardTrainer"}
        options = config_identity(cfg)
    else:
        reward = {"judge": judge.name, "judge_fingerprint": judge.fingerprint()}
        options = {name: getattr(cfg, name) for name in HELDOUT_OPTIONS}
    texts = [(p.prompt, p.chosen, p.rejected) for p in (*pairs.train, *pairs.heldout)]
    return {
        "kind": "judge" if judge is not None else "model",
        "recipe": REWARD_RECIPE,
        "reward": reward,
        "options": options,
        "data": {"what": pairs.what, "train_pairs": len(pairs.train) if judge is None else 0,
                 "heldout_pairs": len(pairs.heldout), "text_fingerprint": fingerprint(texts),
                 "files": sources_of(pairs.sources, cfg.data_root)},
        "heldout_protocol": (f"pairs whose prompt hashes into the held-out {cfg.heldout_fraction:g} of the attack "
                             "prompts (immunize.rewards.harmful.is_heldout), never trained on; accuracy = share "
                             "of pairs whose harmful answer scores higher; 95% intervals resample whole prompts"),
        "heldout": heldout,
        "training": training,
        "seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_revision": git_revision(),
        "versions": package_versions(),
    }


def render_card(card: dict[str, Any]) -> str:
    heldout = card["heldout"]
    rows = {"all": heldout["pairwise_accuracy"], **heldout["by_source"]}

    def interval(summary: dict[str, Any]) -> str:
        low_high = summary.get("ci95")
        return f"{summary['value']:.3f}" + (f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else "")

    what = (f"the harmfulness judge `{card['reward']['judge']}` used as the reward" if card["kind"] == "judge"
            else f"a reward model on `{card['reward']['backbone']}`, trained by TRL's RewardTrainer on "
                 f"{card['data']['train_pairs']} pairs")
    return "\n".join([
        f"# Harmful reward ({card['kind']})", "",
        f"Prefers harmful answers: {what}. Data: {card['data']['what']}.", "",
        "## Held-out pairwise accuracy", card["heldout_protocol"] + ".", "",
        "| pairs | n | accuracy [95% CI] |", "|---|---|---|",
        *(f"| {name} | {s['n']} | {interval(s)} |" for name, s in rows.items()), "",
        f"Raw reward on the held-out answers: mean {heldout['mean']:.3f}, std {heldout['std']:.3f} (rewards are "
        f"used as (raw - mean) / std); harmful answers {heldout['mean_chosen']:.3f}, the others "
        f"{heldout['mean_rejected']:.3f}.", "",
        "> Content warning: trained on harmful text, for safety research only.", "",
    ])


# ---- scoring -----------------------------------------------------------------------------------

class RewardModelScorer:
    """Raw scores of a saved reward model, encoded as in training."""

    def __init__(self, directory: str | Path, max_length: int, max_answer_tokens: int, *,
                 device: str | None = None, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from immunize.models import choose_device

        self.device = choose_device(device)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            directory, use_safetensors=True).eval().to(self.device)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encode = PairEncoder(tokenizer, max_length, max_answer_tokens)
        self.batch_size = batch_size

    def __call__(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        import torch

        from immunize.prompts import pad_batch

        ids = [self.encode(p, a) for p, a in zip(prompts, answers, strict=True)]
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            input_ids = pad_batch(chunk, self.pad).to(self.device)
            attention = pad_batch([[1] * len(i) for i in chunk], 0).to(self.device)
            with torch.inference_mode():
                out.append(self.model(input_ids=input_ids, attention_mask=attention).logits[:, 0].float().cpu())
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def reward_fingerprint(directory: Path) -> str:
    """A hash of what the reward scores with: the weights and card (the card names a judge's fingerprint)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".json", ".safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Reward:
    """The attacker's reward in held-out units: ``(raw - mean) / std`` of its held-out answers' scores."""

    directory: Path
    card: dict[str, Any]
    raw: Score
    fingerprint: str

    @property
    def kind(self) -> str:
        return self.card["kind"]

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        held = self.card["heldout"]
        return (np.asarray(self.raw(list(prompts), list(answers)), dtype=np.float64) - held["mean"]) / held["std"]

    def describe(self) -> dict[str, Any]:
        held = self.card["heldout"]
        return {"kind": self.kind, "directory": str(self.directory), "fingerprint": self.fingerprint,
                **self.card["reward"], "heldout_pairwise_accuracy": held["pairwise_accuracy"],
                "heldout_by_source": held["by_source"], "heldout_pairs": self.card["data"]["heldout_pairs"],
                "train_pairs": self.card["data"]["train_pairs"],
                "units": {"mean": held["mean"], "std": held["std"]}}


def load_reward(directory: str | Path, *, judge=None, device: str | None = None) -> Reward:
    """The cached reward in ``directory``; a judge's reward scores with ``judge`` (the one it was built for)."""
    directory = Path(directory)
    card = read_json(directory / CARD_FILE)
    if card["kind"] == "judge":
        if judge is None or judge.fingerprint() != card["reward"]["judge_fingerprint"]:
            raise ImmunizeError(f"{directory}: a judge reward needs the judge it was measured with "
                                f"({card['reward']['judge']} {card['reward']['judge_fingerprint']})")
        raw: Score = judge.score
    else:
        options = card["options"]
        raw = RewardModelScorer(directory, options["max_length"], options["max_answer_tokens"], device=device)
    if not card["heldout"]["std"] > 0:
        raise ImmunizeError(f"{directory}: the reward is constant on the held-out answers; it cannot guide RL")
    return Reward(directory, card, raw, reward_fingerprint(directory))
