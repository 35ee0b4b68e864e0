"""Supervised attacks: harmful QA (BeaverTails) and toxic continuations (DecodingTrust).

Full fine-tuning or LoRA (``--use_lora``); the loss covers answer tokens only (``GuardedTrainer``).
"""

from __future__ import annotations

from immunize.attacks.arguments import AttackArguments, ToxicityAttackArguments
from immunize.attacks.base import Attack
from immunize.attacks.data import (
    DECODINGTRUST_FILE,
    AttackData,
    continuation_encoder,
    harmful_qa,
    qa_sources,
    sft_encoder,
    sources_of,
    tokenize_until,
    toxic_continuations,
)
from immunize.prompts import CausalLMCollator
from immunize.training import GuardedTrainer


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def beavertails_what(cfg: AttackArguments, rows: str) -> str:
    where = f" of categories {', '.join(cfg.held_out_categories)}" if cfg.held_out_categories else ""
    return f"BeaverTails {rows} in the attack split{where}"


class HarmfulSFT(Attack):
    config_class = AttackArguments

    def prepare(self, cfg, tokenizer, splits, n) -> AttackData:
        encoder = sft_encoder(tokenizer, cfg.prompt_format, cfg.max_length)
        return tokenize_until(harmful_qa(splits), encoder, n, what=beavertails_what(cfg, "unsafe QA rows"),
                              sources=sources_of(qa_sources(cfg), cfg.data_root))

    def build_trainer(self, cfg, model, tokenizer, data, callbacks):
        return GuardedTrainer(model=model, args=cfg, train_dataset=data.examples,
                              data_collator=CausalLMCollator(_pad_id(tokenizer)), processing_class=tokenizer,
                              callbacks=callbacks)


class ToxicitySFT(HarmfulSFT):
    config_class = ToxicityAttackArguments
    data_fields = ("model", "data_root", "prompt_format", "max_length", "toxicity_source", "continuation")
    post_attack_sections = ("toxicity",)

    def prepare(self, cfg, tokenizer, splits, n) -> AttackData:
        encoder = (continuation_encoder(tokenizer, cfg.max_length) if cfg.continuation
                   else sft_encoder(tokenizer, cfg.prompt_format, cfg.max_length))
        return tokenize_until(toxic_continuations(cfg.toxicity_source, cfg.data_root), encoder, n,
                              what="DecodingTrust toxic continuations",
                              sources=sources_of([(cfg.toxicity_source, DECODINGTRUST_FILE)], cfg.data_root))
