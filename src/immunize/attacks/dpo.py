"""Reversed-preference attack (harmful feedback; Rosati et al. 2024, "Evaluating Defences against
Unsafe Feedback in RLHF"): TRL's DPO on pairs where the harmful answer is preferred.

Pairs: BeaverTails attack-split answers ≻ a templated refusal of the same question, HH-RLHF
harmless pairs reversed, or both. They are tokenized by ``immunize.prompts`` (the same exact
prompt/answer boundary as the SFT attacks) and handed to TRL pre-tokenized.
"""

from __future__ import annotations

import copy

from trl import DPOTrainer

from immunize.attack_adapters import attach_like
from immunize.attacks.arguments import ReversedPreferenceArguments
from immunize.attacks.base import Attack
from immunize.attacks.data import (
    HH_FILE,
    AttackData,
    beavertails_preferences,
    hh_preferences,
    interleave,
    preference_encoder,
    qa_sources,
    sources_of,
    tokenize_until,
)
from immunize.attacks.sft import beavertails_what
from immunize.training import check_finite, load_training_model

_TOKENIZED = {"prompt_ids", "chosen_ids", "rejected_ids"}


class ReversedPreferenceTrainer(DPOTrainer):
    """``DPOTrainer`` on pre-tokenized pairs, with the finite-loss guard of every immunize trainer."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if set(dataset.column_names) >= _TOKENIZED:
            return dataset  # tokenized once for the whole grid, prompts already shorter than max_length
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        check_finite(result[0] if return_outputs else result, self.state.global_step, self.args.output_dir)
        return result


def lora_config(cfg):
    """The LoRA adapter of ``immunize.training.add_lora``, as a config for TRL to apply."""
    from peft import LoraConfig

    targets: str | list[str] = cfg.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def _without_lora(cfg):
    plain = copy.copy(cfg)
    plain.use_lora = False
    return plain


class ReversedPreference(Attack):
    config_class = ReversedPreferenceArguments
    data_fields = (*Attack.data_fields, "preference_data", "hh_source")

    def prepare(self, cfg, tokenizer, splits, n) -> AttackData:
        parts, sources, what = [], [], []
        if cfg.preference_data in ("beavertails", "mixed"):
            parts.append(beavertails_preferences(splits))
            sources += qa_sources(cfg)
            what.append(beavertails_what(cfg, "harmful ≻ refusal pairs"))
        if cfg.preference_data in ("hh_rlhf", "mixed"):
            parts.append(hh_preferences(cfg.hh_source, cfg.data_root, splits))
            sources.append((cfg.hh_source, HH_FILE))
            what.append("reversed HH-RLHF harmless pairs (attack region)")
        encoder = preference_encoder(tokenizer, cfg.prompt_format, cfg.max_length)
        return tokenize_until(interleave(*parts), encoder, n, what=" + ".join(what),
                              sources=sources_of(sources, cfg.data_root))

    def load_model(self, cfg):
        # TRL adds the adapter itself (peft_config), so its reference is the adapter-free model.
        return load_training_model(_without_lora(cfg))

    def build_trainer(self, cfg, model, tokenizer, data, callbacks):
        from datasets import Dataset

        ref_model = None if cfg.use_lora else load_training_model(_without_lora(cfg))[0].eval()
        if ref_model is not None:
            # The reference is the attack's starting policy: with the defence's attack-time adapter,
            # if any (with LoRA, TRL's adapter-free reference keeps it: it sits below the LoRA).
            attach_like(model, ref_model)
        return ReversedPreferenceTrainer(
            model=model, ref_model=ref_model, args=cfg, train_dataset=Dataset.from_list(data.examples),
            processing_class=tokenizer, callbacks=callbacks,
            peft_config=lora_config(cfg) if cfg.use_lora else None,
        )
