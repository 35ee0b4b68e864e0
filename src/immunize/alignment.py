"""Safety alignment: turn a non-refusing instruct model into the "aligned base" the papers start from.

The RepNoise and Immunization papers defend models that already refuse (Llama-2-chat). SmolLM2
barely refuses, so this stage fine-tunes it on harmful prompts answered by real refusals (from
the defence split only: the provider never sees attack or evaluation prompts) mixed with benign
instructions and their answers, so it learns to refuse harm without refusing everything.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from immunize.config import fingerprint, write_provenance
from immunize.data import RefusalBank, build_pairs, load_benign_answers, load_splits
from immunize.models import model_fingerprint
from immunize.prompts import CausalLMCollator
from immunize.training import (
    GuardedTrainer,
    ImmunizeTrainingArguments,
    is_complete,
    load_training_model,
    run_training,
    save_final_model,
    tokenize_pairs,
)


@dataclass
class AlignConfig(ImmunizeTrainingArguments):
    num_harmful: int = field(default=256, metadata={"help": "harmful prompts answered by refusals"})
    num_benign: int = field(default=256, metadata={"help": "benign instructions with their answers"})
    benign_source: str = field(default="benign_alpaca",
                               metadata={"help": "alpaca_eval, benign_alpaca or benign_saferlhf"})
    held_out_categories: list[str] = field(default_factory=list, metadata={"help": "categories never trained on"})

    output_dir: str = field(default="runs/align", metadata={"help": "where the aligned model goes"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "batch size per device"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs over the mixed data"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "learning-rate schedule"})
    warmup_steps: float = field(default=0.1, metadata={"help": "warm-up steps (a fraction < 1 is a ratio)"})


def alignment_examples(cfg: AlignConfig) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: refusals for harmful prompts, real answers for benign ones, shuffled."""
    splits = load_splits(root=cfg.data_root, held_out_categories=cfg.held_out_categories)
    # One refusal per distinct prompt: several BeaverTails rows share a question.
    seen, rows = set(), []
    for row in splits.defence:
        if row.prompt not in seen:
            seen.add(row.prompt)
            rows.append(row)
    bank = RefusalBank.from_data(cfg.data_root)
    harmful = [(p.prompt, p.refusal) for p in build_pairs(rows, bank)]
    benign = [(b.instruction, b.output) for b in load_benign_answers(cfg.benign_source, root=cfg.data_root)
              if b.output]
    rng = random.Random(cfg.seed)
    rng.shuffle(harmful)
    rng.shuffle(benign)
    examples = harmful[: cfg.num_harmful] + benign[: cfg.num_benign]
    rng.shuffle(examples)
    return examples


def align(cfg: AlignConfig) -> dict:
    """Run (or skip, if already complete) the alignment SFT; returns the completion record."""
    if done := is_complete(cfg.output_dir):
        return done
    examples = alignment_examples(cfg)
    model, tokenizer = load_training_model(cfg)
    features = tokenize_pairs(tokenizer, examples, cfg.prompt_format, cfg.max_length)
    metadata = {"stage": "align", "base_model": cfg.model, "base_fingerprint": model_fingerprint(cfg.model),
                "data_fingerprint": fingerprint(examples), "examples": len(features)}
    write_provenance(cfg.output_dir, {"align": cfg}, metadata)
    trainer = GuardedTrainer(model=model, args=cfg, train_dataset=features,
                             data_collator=CausalLMCollator(tokenizer.pad_token_id))
    result = run_training(trainer)
    metadata["train_loss"] = result.training_loss
    metadata["steps"] = trainer.state.global_step
    save_final_model(trainer, tokenizer, metadata)
    return metadata
