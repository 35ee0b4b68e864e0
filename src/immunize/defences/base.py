"""What a defence is: a config, a data builder and a trainer (or, for defences that do not train, a
model builder), run by the one method runner (``immunize.method_runner``).

A defence module holds three things, TRL style:

- ``XConfig(DefenceArguments)``: its options, with its paper's defaults;
- ``XTrainer(Trainer)``: its loss, readable top to bottom (``compute_loss`` / ``training_step``);
- ``X(Defence)``: ``build_data`` (from the defence split only) and ``build_trainer``.

and is registered by one line in ``immunize.defences.DEFENCES``. The runner owns everything else:
run identity, resume, provenance, saving, the completion marker and the model card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from immunize.errors import ImmunizeError
from immunize.training import ImmunizeTrainingArguments

# Options every defence honours; a recipe sets them once for all its defences (and the alignment).
SHARED_OPTIONS = ("data_root", "prompt_format", "max_length", "seed", "dtype", "held_out_categories")


@dataclass
class DefenceArguments(ImmunizeTrainingArguments):
    """Options every defence shares (``SHARED_OPTIONS``), on top of the training plumbing."""

    # Options of a method that only measure or report (never change what it computes): left out of
    # the run identity (``immunize.method_runner.config_identity``).
    not_identity: ClassVar[frozenset[str]] = frozenset()

    held_out_categories: list[str] = field(default_factory=list, metadata={
        "help": "BeaverTails categories kept out of the defence data (generalization tests); space-separated "
                "names as in immunize.data.CATEGORIES (several contain commas, so this is a list)"})
    output_dir: str = field(default="runs/defend", metadata={"help": "where checkpoints and the model go"})

    def __post_init__(self):
        # From immunize.data, not immunize.attacks: the attacks package imports TRL, which a
        # defence does not need (and machines that only train defences may not have).
        from immunize.data.beavertails import parse_categories

        self.held_out_categories = parse_categories(self.held_out_categories)
        super().__post_init__()

    @property
    def judges_used(self) -> frozenset[str]:
        """The judges the training data depends on (e.g. the one that picks refusals): a run trains them
        first, and recomputes this stage when they change."""
        return frozenset()

    def require_non_reentrant_checkpointing(self, why: str) -> None:
        """For losses that read activations inside checkpointed layers: refuse reentrant activation
        checkpointing (one line, naming the option), else make non-reentrant the setting. Call after
        ``TrainingArguments.__post_init__``, which resolves the deprecated aliases."""
        if not self.activation_checkpointing:
            return
        kwargs = dict(self.activation_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", False):
            raise ImmunizeError(f"--activation_checkpointing_kwargs use_reentrant=true: {why}, which needs "
                                "non-reentrant checkpointing")
        kwargs["use_reentrant"] = False
        self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs = kwargs


def config_with_defaults(base: type, defaults: dict[str, Any], name: str, module: str) -> type:
    """``base`` with other defaults, as a class named ``name`` importable from ``module``.

    The Trainer pickles its args into every checkpoint, so the class must be found by name on
    resume; the real field types are kept (HfArgumentParser reads them from the new class).
    """
    import dataclasses
    import typing

    known = {f.name: f for f in dataclasses.fields(base)}
    if unknown := sorted(set(defaults) - set(known)):
        raise ValueError(f"{name}: options {unknown} are not fields of {base.__name__}")
    types = typing.get_type_hints(base)
    fields = [(key, types[key], dataclasses.field(default=value, metadata=known[key].metadata))
              for key, value in defaults.items()]
    cls = dataclasses.make_dataclass(name, fields, bases=(base,))
    cls.__module__ = module
    cls.__doc__ = f"{base.__name__} with other defaults: {defaults}."
    return cls


@dataclass
class DefenceData:
    """What a defence trains on: features for its collator, and what the model card and tests see."""

    features: list[dict]
    prompts: list[str]  # every prompt the defence trained on (checked against the splits in tests)
    summary: dict[str, Any]  # counts and hashes, recorded in the marker and the model card
    sources: list[str] = field(default_factory=list)  # data-root files read (their licences go in the card)


class Defence:
    """Subclass, set ``config_class``, implement ``build_data`` and ``build_trainer`` (or, with
    ``trains = False``, ``build_model``), and register the class in ``immunize.defences``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[DefenceArguments]] = DefenceArguments
    trains: ClassVar[bool] = True
    # False for a defence that leaves nothing to keep (random init): its stability and trainability
    # are not "passes", and its resistance is a lower bound, not an achievement.
    keeps_capability: ClassVar[bool] = True
    # A subfolder of the checkpoint holding a PEFT adapter that every attack attaches, frozen, to the
    # model it trains, and that every evaluation leaves off (e.g. a security vector).
    attack_adapter: ClassVar[str | None] = None

    def build_data(self, cfg: DefenceArguments, tokenizer) -> DefenceData | None:
        """The training data, from the defence split only (``None`` for defences without data)."""
        return None

    def load_model(self, cfg: DefenceArguments):
        """The model to train and its tokenizer (LoRA added when ``cfg.use_lora``)."""
        from immunize.training import load_training_model

        return load_training_model(cfg)

    def build_trainer(self, cfg: DefenceArguments, model, tokenizer, data: DefenceData):
        raise NotImplementedError

    def build_model(self, cfg: DefenceArguments):
        """For ``trains = False``: the finished model and its tokenizer."""
        raise NotImplementedError

    def save_extras(self, cfg: DefenceArguments, model, out_dir) -> dict[str, Any]:
        """Write anything besides the evaluated model into ``out_dir`` (before the marker); its facts."""
        return {}

    def evaluated_model(self, cfg: DefenceArguments, model):
        """The trained model to save as the checkpoint (called after ``save_extras``); by default the
        trained model itself. A defence whose trained weights are an extra (an attack adapter)
        returns the model without them."""
        return model
