"""What an attack is: a config class, a way to prepare its data, and a ``Trainer`` that runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from transformers import Trainer

from immunize.attacks.arguments import AttackArguments
from immunize.attacks.data import AttackData
from immunize.data import BeaverTailsSplits
from immunize.training import load_training_model


class Attack:
    """Subclass, set ``config_class``, implement ``prepare`` and ``build_trainer``, and add one
    ``ATTACKS.register(name, "module:Class", help)`` line in ``immunize.attacks.registry`` (which
    supplies ``name`` and ``summary``)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    config_class: ClassVar[type[AttackArguments]] = AttackArguments
    # Evaluation sections the pipeline measures after this attack besides harmfulness (which every
    # attack is judged on): what the attack itself targets, e.g. ("toxicity",).
    post_attack_sections: ClassVar[tuple[str, ...]] = ()
    # Config fields that change the prepared data: runs of a grid that agree on them share one
    # tokenization (``num_samples`` is not among them: smaller budgets take a prefix).
    data_fields: ClassVar[tuple[str, ...]] = (
        "model", "data_root", "prompt_format", "max_length", "held_out_categories", "qa_source",
    )

    def prepare(self, cfg: AttackArguments, tokenizer, splits: BeaverTailsSplits,
                n: int | None) -> AttackData:
        """The first ``n`` attack examples (all when None), tokenized for ``build_trainer``."""
        raise NotImplementedError

    def load_model(self, cfg: AttackArguments):
        """The model to attack and its tokenizer (LoRA adapters added when ``cfg.use_lora``)."""
        return load_training_model(cfg)

    def build_trainer(self, cfg: AttackArguments, model, tokenizer, data: AttackData,
                      callbacks: list) -> Trainer:
        """A ``Trainer`` whose ``train()`` runs the attack (``run_training`` adds resume)."""
        raise NotImplementedError

    def data_key(self, cfg: AttackArguments) -> tuple:
        return (self.name, *(repr(getattr(cfg, name)) for name in self.data_fields))

    def budget_terms(self, cfg: AttackArguments) -> dict[str, Any]:
        """What this attack's budget has besides the learning rate, samples, epochs, steps and seed every
        budget states (e.g. answers sampled per prompt): added to the budget's record."""
        return {}

    def run_record(self, output_dir: str | Path) -> dict[str, Any] | None:
        """What a finished run of this attack states beyond its curve and its model (e.g. an RL run's reward
        and constraint), read from its folder for the results; None when it states nothing more."""
        return None
