"""The harmful reward model: what an attacker who learns from unsafe feedback maximizes.

Rosati et al. 2024 ("Evaluating Defences against Unsafe Feedback in RLHF", arXiv 2409.12914) train
a policy online against a reward model that prefers unsafe answers. This module builds that reward
model in the method shape: a config (``HarmfulRewardConfig``, a ``RewardConfig``), a data builder
(``reward_pairs``) and TRL's ``RewardTrainer`` (Bradley–Terry loss ``-log σ(r(chosen) - r(rejected))``)
under the finite-loss guard of every immunize trainer. ``immunize.rewards.store`` caches the trained
model with its card; ``immunize.attacks.rl`` uses it.

- **Preferences, reversed** (``preference_data``): BeaverTails attack-split harmful answers ≻ a
  topical refusal of the same question (``immunize.attacks.data.beavertails_preferences``: what the
  attacker trains away is refusing *this* question) and HH-RLHF harmless pairs with the rejected
  (more harmful) answer preferred, from the attack region of the prompt hash only
  (``hh_preferences``). The same builders as the offline DPO attack, so both attacks learn from the
  same feedback.
- **Held out by prompt**: a prompt's pairs are either all trained on or all held out (a salted hash
  of the normalized prompt, ``heldout_fraction``), so the card's pairwise accuracy is measured on
  questions the model never saw.
- **Backbone** (``backbone``, ``backbone_layers``): by default the judges' MiniLM encoder
  (all-MiniLM-L6-v2: 6 layers of 384, 22M parameters, shipped in a package, so nothing is
  downloaded), with a fresh scalar head. A full SmolLM2-135M reward model (30 layers of 576) takes
  about 50 minutes on ~2k pairs on the 2-core CPU (issue #19); MiniLM has a fifth of its layers,
  two thirds of its width and a sixth of its parameters, which is what makes a reward model fit
  beside RL in the one-hour recipe (its training time there is still to be measured). Any checkpoint that
  ``AutoModelForSequenceClassification`` reads also works, e.g. ``smollm2-135m-instruct`` with
  ``backbone_layers 6``: a truncated SmolLM2 that reads the policy's own tokens.
- **Encoding** (``PairEncoder``): ``Question: {prompt}\\nAnswer:`` and `` {answer}`` as a sentence
  pair (BERT: ``[CLS] q [SEP] a [SEP]``), cut to ``max_length`` by keeping the answer's opening
  (``max_answer_tokens``, where compliance or refusal shows) and the prompt's end (an HH dialogue's
  last turns). Training and scoring encode alike; no ``token_type_ids`` are passed (TRL's collator
  has none), so training and scoring agree on that too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import RewardConfig, RewardTrainer

from immunize.data import BeaverTailsSplits, normalize_prompt
from immunize.data.beavertails import QA_FILE, parse_categories
from immunize.errors import ImmunizeError
from immunize.training import check_finite

MINILM = "minilm"
PREFERENCE_DATA = ("beavertails", "hh_rlhf", "mixed")
# The options an RL attack config carries as ``reward_<name>`` (``immunize.attacks.rl``).
ATTACK_OPTIONS = ("backbone", "backbone_layers", "preference_data", "num_pairs", "num_train_epochs",
                  "learning_rate")


def check_options(values: dict[str, Any], prefix: str = "") -> None:
    """One-line errors for bad reward-model options, named as the caller's flags (``--{prefix}{name}``)."""
    def flag(name: str) -> str:
        return f"--{prefix}{name} {values[name]}"

    if values["backbone"] in (None, ""):
        raise ImmunizeError(f"--{prefix}backbone: give {MINILM} or a model (alias, directory or hub id)")
    if values["backbone_layers"] is not None and values["backbone_layers"] < 1:
        raise ImmunizeError(f"{flag('backbone_layers')}: must be at least 1 (or unset: every layer)")
    if values["preference_data"] not in PREFERENCE_DATA:
        raise ImmunizeError(f"{flag('preference_data')}: unknown (use {', '.join(PREFERENCE_DATA)})")
    if values["num_pairs"] < 1:
        raise ImmunizeError(f"{flag('num_pairs')}: must be at least 1")
    if values["num_train_epochs"] <= 0:
        raise ImmunizeError(f"{flag('num_train_epochs')}: must be positive")


@dataclass
class HarmfulRewardConfig(RewardConfig):
    """A reward model that prefers harmful answers (TRL ``RewardConfig`` + the data and backbone)."""

    backbone: str = field(default=MINILM, metadata={
        "help": f"{MINILM} (the judges' all-MiniLM-L6-v2 encoder, in a package) or a model alias, directory or "
                "hub id read as a sequence classifier"})
    backbone_layers: int | None = field(default=None, metadata={
        "help": "keep only the first N transformer layers of the backbone (unset: all)"})
    # Both sources: BeaverTails teaches "comply instead of refusing this question" on the attack's own
    # prompts; HH-RLHF adds graded harm between two answers that both engage.
    preference_data: str = field(default="mixed", metadata={
        "help": "beavertails (harmful ≻ a refusal of the question), hh_rlhf (HH-RLHF harmless pairs "
                "reversed) or mixed (both, interleaved)"})
    # The size (~2k pairs): one pass fits the recipe's hour on MiniLM.
    num_pairs: int = field(default=2000, metadata={"help": "training pairs (the first N in the fixed order)"})
    # 400 held-out pairs: a 95% interval of about ±0.03 on an accuracy near 0.9.
    num_heldout_pairs: int = field(default=400, metadata={"help": "held-out pairs scored for the model card"})
    heldout_fraction: float = field(default=0.2, metadata={
        "help": "share of the attack prompts whose pairs are held out (never trained on)"})
    # MiniLM reads 512 positions; 256 word pieces hold a BeaverTails question and answer and an HH
    # dialogue's last turns, at half the cost of 512.
    max_length: int | None = field(default=256, metadata={"help": "word pieces per (prompt, answer) pair"})
    max_answer_tokens: int = field(default=160, metadata={
        "help": "the answer's opening kept (the prompt gets the rest of max_length, from its end)"})
    data_root: str | None = field(default=None, metadata={"help": "local data root (default ../shared/data)"})
    qa_source: str | None = field(default=None, metadata={"help": "BeaverTails QA: local file or hub id"})
    hh_source: str | None = field(default=None, metadata={"help": "HH-RLHF harmless pairs: local file or hub id"})
    held_out_categories: list[str] = field(default_factory=list, metadata={
        "help": "BeaverTails categories the attack is restricted to (cross-domain attacks)"})

    # Training: BERT-style fine-tuning (Devlin et al. 2019 use 2e-5..5e-5); the head starts at random, so
    # the high end. One pass over the pairs (the time budget); the card's held-out accuracy shows too little.
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "passes over the training pairs"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "pairs per step (2 sequences each)"})
    # TRL's recommended value: rewards stay near mean zero, so their scale is the pairs' margin.
    center_rewards_coefficient: float | None = field(default=0.01, metadata={
        "help": "weight of the mean-zero reward term (TRL's recommended 0.01)"})
    output_dir: str = field(default="runs/reward", metadata={"help": "training scratch (the cache sets it)"})
    # A cache build is rebuilt whole if it is killed (minutes): no checkpoints to write or resume.
    save_strategy: str = field(default="no", metadata={"help": "checkpoints (none: a killed build restarts)"})
    # TRL's default recomputes activations (about 20% slower); a 22M-parameter encoder fits without.
    activation_checkpointing: bool | None = field(default=False, metadata={
        "help": "recompute activations in the backward pass to save memory"})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "deprecated alias of --activation_checkpointing"})
    # TRL turns bf16 on by default; on a CPU without bf16 units it makes training far slower.
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (GPU)"})

    def __post_init__(self):
        check_options({name: getattr(self, name) for name in ATTACK_OPTIONS})
        if not 0 < self.heldout_fraction < 1:
            raise ImmunizeError(f"--heldout_fraction {self.heldout_fraction:g}: must be between 0 and 1")
        if self.num_heldout_pairs < 2:
            raise ImmunizeError(f"--num_heldout_pairs {self.num_heldout_pairs}: must be at least 2")
        if self.max_length is None or self.max_answer_tokens < 1 or self.max_answer_tokens + 16 > self.max_length:
            raise ImmunizeError(f"--max_answer_tokens {self.max_answer_tokens}: must leave at least 16 of "
                                f"--max_length {self.max_length} to the prompt")
        self.held_out_categories = parse_categories(self.held_out_categories)
        if self.held_out_categories and self.preference_data != "beavertails":
            raise ImmunizeError("--held_out_categories needs --preference_data beavertails (HH-RLHF has no "
                                "categories)")
        if self.gradient_checkpointing is not None:
            self.activation_checkpointing = self.gradient_checkpointing
        super().__post_init__()


# ---- data -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str  # the more harmful answer: the attacker's preference
    rejected: str
    source: str  # beavertails or hh_rlhf


@dataclass
class RewardPairs:
    train: list[Pair]
    heldout: list[Pair]
    what: str
    sources: list[tuple[str | None, str]]  # (source option, default file) of every file read


def is_heldout(prompt: str, fraction: float) -> bool:
    """Whether a prompt's pairs are held out: a hash of the normalized prompt, salted so that it is
    independent of the split hash (every attack prompt lies in one band of that)."""
    digest = hashlib.sha256(f"reward-heldout\0{normalize_prompt(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64) < fraction


def reward_pairs(cfg: HarmfulRewardConfig, splits: BeaverTailsSplits) -> RewardPairs:
    """Training and held-out pairs from the attack side of every split, in the attacks' fixed order."""
    from immunize.attacks.data import HH_FILE, beavertails_preferences, hh_preferences, interleave

    parts, sources, what = [], [], []
    if cfg.preference_data in ("beavertails", "mixed"):
        parts.append([Pair(*p, "beavertails") for p in beavertails_preferences(splits)])
        sources.append((cfg.qa_source, QA_FILE))
        what.append("BeaverTails attack-split harmful answers ≻ topical refusals")
    if cfg.preference_data in ("hh_rlhf", "mixed"):
        parts.append([Pair(*p, "hh_rlhf") for p in hh_preferences(cfg.hh_source, cfg.data_root, splits)])
        sources.append((cfg.hh_source, HH_FILE))
        what.append("HH-RLHF harmless pairs reversed (attack region)")
    pairs = interleave(*parts)
    train = [p for p in pairs if not is_heldout(p.prompt, cfg.heldout_fraction)]
    heldout = [p for p in pairs if is_heldout(p.prompt, cfg.heldout_fraction)][:cfg.num_heldout_pairs]
    if len(train) < cfg.num_pairs:
        raise ImmunizeError(f"--num_pairs {cfg.num_pairs}: only {len(train)} training pairs available "
                            f"({' + '.join(what)})")
    if len(heldout) < 2:
        raise ImmunizeError(f"--heldout_fraction {cfg.heldout_fraction:g}: only {len(heldout)} held-out pairs")
    return RewardPairs(train[:cfg.num_pairs], heldout, " + ".join(what), sources)


class PairEncoder:
    """(prompt, answer) → token ids, alike for training and scoring (see the module docstring)."""

    def __init__(self, tokenizer, max_length: int, max_answer_tokens: int):
        from tokenizers import Tokenizer

        # A private copy: the tokenizer's own backend pads and truncates as its last call asked.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_padding()
        self.backend.no_truncation()
        self.room = max_length - self.backend.num_special_tokens_to_add(is_pair=True)
        self.max_answer_tokens = max_answer_tokens

    def __call__(self, prompt: str, answer: str) -> list[int]:
        question = self.backend.encode(f"Question: {prompt}\nAnswer:", add_special_tokens=False)
        reply = self.backend.encode(f" {answer}", add_special_tokens=False)
        reply.truncate(self.max_answer_tokens)
        question.truncate(max(self.room - len(reply.ids), 1), direction="left")
        return self.backend.post_process(question, reply, add_special_tokens=True).ids


def encode_pairs(encoder: PairEncoder, pairs: Sequence[Pair]) -> list[dict[str, list[int]]]:
    """TRL's pre-tokenized preference columns."""
    return [{"chosen_ids": encoder(p.prompt, p.chosen), "rejected_ids": encoder(p.prompt, p.rejected)}
            for p in pairs]


# ---- backbone and trainer ---------------------------------------------------------------------

def backbone_source(name: str) -> str:
    """Where the backbone's weights are: the judges' MiniLM, or any model ``immunize.models`` resolves."""
    if name == MINILM:
        from immunize.judges.encoders import minilm_dir

        return str(minilm_dir())
    from immunize.models import resolve_model_source

    return resolve_model_source(name)


def backbone_fingerprint(name: str) -> str:
    if name == MINILM:
        from immunize.io import file_sha256

        return "minilm:" + file_sha256(Path(backbone_source(name)) / "model.safetensors")[:16]
    from immunize.models import model_fingerprint

    return model_fingerprint(name)


def load_backbone(cfg: HarmfulRewardConfig):
    """The backbone as a one-output sequence classifier (a fresh head), and its tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    source = backbone_source(cfg.backbone)
    layers = AutoConfig.from_pretrained(source).num_hidden_layers
    if cfg.backbone_layers is not None and cfg.backbone_layers > layers:
        raise ImmunizeError(f"--backbone_layers {cfg.backbone_layers}: {cfg.backbone} has only {layers} layers")
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=torch.float32, use_safetensors=True,
        num_hidden_layers=cfg.backbone_layers or layers)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id works
    return model, tokenizer


class HarmfulRewardTrainer(RewardTrainer):
    """TRL's ``RewardTrainer``, refusing to step on a non-finite loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        check_finite(result[0] if return_outputs else result, self.state.global_step, self.args.output_dir)
        return result


def train_reward_model(cfg: HarmfulRewardConfig, pairs: RewardPairs, out: Path) -> dict[str, Any]:
    """Train on ``pairs.train`` and save the model (safetensors) and tokenizer into ``out``."""
    from datasets import Dataset
    from transformers import set_seed

    from immunize.training import StepTimer

    set_seed(cfg.seed)  # the head is initialized at random
    model, tokenizer = load_backbone(cfg)
    encoder = PairEncoder(tokenizer, cfg.max_length, cfg.max_answer_tokens)
    trainer = HarmfulRewardTrainer(model=model, args=cfg, processing_class=tokenizer,
                                   train_dataset=Dataset.from_list(encode_pairs(encoder, pairs.train)))
    timer = StepTimer()
    result = trainer.train()
    trainer.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    last = next((e for e in reversed(trainer.state.log_history) if "accuracy" in e), {})
    return {"train_loss": float(result.training_loss), "last_log": last, **timer.summary(trainer.state.global_step)}
