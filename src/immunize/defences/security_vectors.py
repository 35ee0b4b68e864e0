"""Security vectors (Zhou et al. 2023, "Making Harmful Behaviors Unlearnable for Large Language
Models", arXiv 2311.02105).

Idea: a small adapter, the *security vector*, is trained so that the model *with* it already gives
harmful answers, i.e. already has a low loss on harmful data. During any later fine-tuning the
vector is switched on, so harmful examples yield small gradients and the backbone learns little
from them; at inference it is switched off, and the backbone behaves as it did before.

1. **Defence** (this module): a LoRA adapter on the frozen model is trained by next-token
   cross-entropy on (prompt, harmful answer) pairs, answer tokens only. The defended checkpoint
   is the input model's weights, unchanged; the vector is saved beside them as a PEFT adapter in
   ``attack_adapter/`` and the completion marker declares it.
2. **Attack time** (``immunize.attack_adapters``): every attack attaches the vector, frozen, to
   the model it fine-tunes; only the backbone (or the attack's own LoRA) trains; the resistance
   curve scores and the attacked checkpoint are without the vector. Evaluations read the plain
   checkpoint, so they never see it.

Reference code: no official code was available. This follows the security-vectors baseline of the
RepNoise reproduction, boyiwei/RepNoise-Reproduce @ 4f6572df53c20c824c5a32e443d670864be602d2,
``immunization_llms/training.py`` L356–415 (training the vector, then the attack with it frozen)
and L74–123 (adapter layers disabled for evaluation). Defaults are that code's: LoRA r 8, alpha
32, dropout 0.1, PEFT's default target modules for the architecture (q_proj, v_proj for Llama),
Adam at lr 1e-3, one epoch, cosine schedule with 10% warm-up, no gradient clipping.

Deviations from that code, each on purpose:

- **Data**: the vector trains on the BeaverTails unsafe QA rows of the *defence* split only; the
  reference trains it on the very data its attack then uses (the attack data never meets the
  defence data here).
- **Loss**: answer tokens only, padding masked, one shift; the reference's loss also covers the
  prompt and the padding.
- **Optimizer**: the Trainer's AdamW with weight decay 0, which is the reference's Adam.
- **LoRA initialization** is seeded (``--seed``), so a rerun trains the same vector.
- **Attack time**: the reference attaches the vector as PEFT layers and freezes every parameter
  whose name contains "lora"; here it is applied with PEFT's forward but outside the parameters
  (see ``immunize.attack_adapters``), so an attack's own LoRA and its checkpoints are unaffected.
  As in the reference, the vector's dropout is active while the attack trains.
- **DPO attacks** (not in the reference): the frozen reference model carries the vector too, so it
  is the attack's starting policy.
- The reference trains 4 epochs for DecodingTrust; the default here is the 1 epoch it uses for
  BeaverTails (``--num_train_epochs`` changes it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from immunize.defences.base import Defence, DefenceArguments, DefenceData
from immunize.errors import ImmunizeError
from immunize.prompts import IGNORE_INDEX, CausalLMCollator
from immunize.training import check_finite

log = logging.getLogger(__name__)

PEFT_DEFAULT = "default"


@dataclass
class SecurityVectorsConfig(DefenceArguments):
    """Security-vector options; defaults are the reference code's (see the module docstring)."""

    vector_r: int = field(default=8, metadata={"help": "LoRA rank of the security vector (reference: 8)"})
    vector_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the security vector (reference: 32)"})
    vector_dropout: float = field(default=0.1, metadata={
        "help": "LoRA dropout of the security vector, also active while attacks train (reference: 0.1)"})
    vector_target_modules: str = field(default=PEFT_DEFAULT, metadata={
        "help": "modules the vector adapts: default (PEFT's choice for the architecture, q_proj,v_proj for "
                "Llama: the reference), all-linear, or a comma list of module names"})

    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate (reference: 1e-3)"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "examples per device step"})
    num_train_epochs: float = field(default=1.0, metadata={
        "help": "epochs over the harmful answers (reference: 1 for BeaverTails)"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "lr schedule (reference: cosine)"})
    warmup_steps: float = field(default=0.1, metadata={
        "help": "warm-up: steps, or a fraction of all steps if below 1 (reference: 0.1)"})
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "gradient clipping norm, 0 for none (reference: none)"})
    output_dir: str = field(default="runs/defend-security-vectors",
                            metadata={"help": "where checkpoints, the model and the vector go"})

    def __post_init__(self):
        if self.use_lora:
            raise ImmunizeError("--use_lora true: security vectors train their own adapter on the frozen model "
                                "(set its shape with --vector_r, --vector_alpha, --vector_target_modules)")
        if self.vector_r < 1:
            raise ImmunizeError(f"--vector_r {self.vector_r}: must be at least 1")
        if self.vector_alpha <= 0:
            raise ImmunizeError(f"--vector_alpha {self.vector_alpha}: must be positive")
        if not 0 <= self.vector_dropout < 1:
            raise ImmunizeError(f"--vector_dropout {self.vector_dropout}: must be in [0, 1)")
        if not self.target_list() and self.vector_target_modules not in (PEFT_DEFAULT, "all-linear"):
            raise ImmunizeError(f"--vector_target_modules {self.vector_target_modules!r}: no module names")
        super().__post_init__()

    def target_list(self) -> list[str]:
        if self.vector_target_modules in (PEFT_DEFAULT, "all-linear"):
            return []
        return sorted({name.strip() for name in self.vector_target_modules.split(",") if name.strip()})


def vector_targets(cfg: SecurityVectorsConfig, model) -> str | list[str]:
    """The target modules for ``LoraConfig``: PEFT's per-architecture default resolved to its names
    (so the run records them), ``all-linear``, or the names given."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    if cfg.vector_target_modules == "all-linear":
        return "all-linear"
    if cfg.vector_target_modules == PEFT_DEFAULT:
        model_type = model.config.model_type
        if model_type not in PEFT_TARGETS:
            raise ImmunizeError(f"--vector_target_modules default: PEFT has no default modules for {model_type!r}; "
                                "name them (e.g. q_proj,v_proj) or use all-linear")
        return sorted(PEFT_TARGETS[model_type])
    return cfg.target_list()


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the answer tokens (labels unshifted, -100 ignored), and
    how many tokens it covers. One shift: the prediction at p scores the label at p + 1."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    total = torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="sum")
    tokens = int(scored.sum())
    return total / max(tokens, 1), tokens


class SecurityVectorTrainer(Trainer):
    """``Trainer`` for the vector: the model is a PEFT model whose only trainable weights are the
    vector's, and the loss is the answer-only cross-entropy of the model with the vector on."""

    # compute_loss returns a per-micro-batch mean; Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._nll_sum = 0.0  # since the last log: summed answer-token NLL and the token count
        self._tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        loss, tokens = answer_cross_entropy(outputs.logits, inputs["labels"])
        check_finite(loss, self.state.global_step, self.args.output_dir)
        if model.training:
            self._nll_sum += loss.item() * tokens
            self._tokens += tokens
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._tokens:  # the token-weighted mean since the last log
            logs["harmful_ce"] = round(self._nll_sum / self._tokens, 6)
            logs["harmful_tokens"] = self._tokens
            self._nll_sum, self._tokens = 0.0, 0
        super().log(logs, start_time)


def harmful_defence_data(cfg: SecurityVectorsConfig, tokenizer) -> DefenceData:
    """(prompt, harmful answer) features from the defence split's unsafe QA rows, first N if asked."""
    from immunize.config import fingerprint
    from immunize.data import load_splits
    from immunize.data.beavertails import QA_FILE
    from immunize.training import take, tokenize_pairs

    splits = load_splits(root=cfg.data_root, held_out_categories=tuple(cfg.held_out_categories))
    # The splits hold unsafe rows only: every response is a harmful answer.
    pairs = take([(r.prompt, r.response) for r in splits.defence], cfg.num_samples, "harmful defence-split answers")
    features = tokenize_pairs(tokenizer, pairs, cfg.prompt_format, cfg.max_length)
    if not features:
        raise ImmunizeError(f"--max_length {cfg.max_length}: no harmful answer fits after its prompt")
    summary = {
        "pairs_sha256": fingerprint([list(p) for p in pairs], 64),
        "features_sha256": fingerprint(features, 64),
        "pairs": len(pairs), "pairs_used": len(features), "pairs_dropped": len(pairs) - len(features),
        "defence_split_rows": len(splits.defence),
        "held_out_categories": list(cfg.held_out_categories),
    }
    return DefenceData(features=features, prompts=[p for p, _ in pairs], summary=summary, sources=[QA_FILE])


class SecurityVectors(Defence):
    config_class = SecurityVectorsConfig
    attack_adapter = "attack_adapter"

    def build_data(self, cfg: SecurityVectorsConfig, tokenizer) -> DefenceData:
        return harmful_defence_data(cfg, tokenizer)

    def load_model(self, cfg: SecurityVectorsConfig):
        """The input model, frozen, with a fresh vector (seeded) as its only trainable weights."""
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        from immunize.training import load_training_model

        model, tokenizer = load_training_model(cfg)
        config = LoraConfig(r=cfg.vector_r, lora_alpha=cfg.vector_alpha, lora_dropout=cfg.vector_dropout,
                            target_modules=vector_targets(cfg, model), task_type="CAUSAL_LM")
        set_seed(cfg.seed)  # LoRA's A matrices are initialized at random
        return get_peft_model(model, config), tokenizer

    def build_trainer(self, cfg: SecurityVectorsConfig, model, tokenizer, data: DefenceData):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return SecurityVectorTrainer(model=model, args=cfg, train_dataset=data.features, processing_class=tokenizer,
                                     data_collator=CausalLMCollator(pad))

    def save_extras(self, cfg: SecurityVectorsConfig, model, out_dir) -> dict[str, Any]:
        """The vector as a PEFT adapter in ``attack_adapter/``, checked as attacks will read it."""
        from immunize.attack_adapters import AttackAdapter

        folder = Path(out_dir) / self.attack_adapter
        model.save_pretrained(folder, safe_serialization=True)
        return {"security_vector": AttackAdapter(folder).facts()}

    def evaluated_model(self, cfg: SecurityVectorsConfig, model):
        """The input model's weights without the vector (removed, never merged)."""
        return model.unload()
