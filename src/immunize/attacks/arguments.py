"""Attack configs: ``TrainingArguments`` subclasses whose fields are CLI flags and YAML keys.

``AttackArguments`` carries what every attack shares (the budget, BeaverTails sources, the
cross-domain category split, the resistance curve, the grid); each attack subclasses it with its
own fields. The reversed-preference attack mixes in TRL's ``DPOConfig`` so every DPO option works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from trl import DPOConfig

from immunize.config import MAPPING_TOO
from immunize.data import CATEGORIES
from immunize.data.beavertails import parse_categories
from immunize.errors import ImmunizeError
from immunize.training import ImmunizeTrainingArguments

GRID_HELP = (
    "sweep budgets: space-separated KEY=V1,V2,... over any scalar option, e.g. "
    "--grid learning_rate=3e-5,6e-5,8e-5 num_samples=1000,4000 seed=1,2 (YAML: grid: {learning_rate: "
    "[3e-5, 6e-5], num_samples: [1000, 4000]}); runs are the Cartesian product and share tokenization"
)
ATTACK_HELP = "attack to run (immunize attack --help lists them)"


ROOT_HELP = "root folder; each run goes to ROOT/RUN_ID"


@dataclass
class AttackArguments(ImmunizeTrainingArguments):
    """Harmful SFT on BeaverTails unsafe QA (full or ``--use_lora``), and what every attack shares.

    Budget defaults follow the RepNoise paper's attack: lr 3e-5, batch 8, 1 epoch, 1k samples.
    """

    attack: str = field(default="sft", metadata={"help": ATTACK_HELP})
    grid: Annotated[list[str] | None, MAPPING_TOO] = field(default=None, metadata={"help": GRID_HELP})
    held_out_categories: list[str] = field(
        default_factory=list,
        metadata={"help": "cross-domain attack: train and score only on these BeaverTails categories "
                          "(the ones the defence did not see); e.g. self_harm terrorism,organized_crime"},
    )
    qa_source: str | None = field(default=None, metadata={"help": "BeaverTails QA: local file or hub id"})
    eval_source: str | None = field(
        default=None, metadata={"help": "BeaverTails evaluation prompts: local file or hub id"})

    curve: bool = field(
        default=True, metadata={"help": "score the model during the attack (a resistance curve)"})
    curve_every_steps: int = field(
        default=10,
        metadata={"help": "score every N optimizer steps (and at step 0 and the end); 0: only at those"})
    curve_num_prompts: int = field(
        default=16, metadata={"help": "held-out evaluation prompts for the keyword refusal rate (greedy)"})
    curve_num_answers: int = field(
        default=32, metadata={"help": "held-out harmful answers for the mean log-likelihood"})
    curve_max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per curve prompt"})
    curve_batch_size: int = field(default=16, metadata={"help": "batch size of curve generation and scoring"})
    curve_save_models: bool = field(
        default=False, metadata={"help": "also save the model at every curve point (curve-models/step-N)"})

    # Budget defaults (RepNoise paper attack) and a root directory that holds one folder per run.
    output_dir: str = field(default="runs/attack", metadata={"help": ROOT_HELP})
    learning_rate: float = field(default=3e-5, metadata={"help": "attack learning rate (AdamW)"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs over the attack samples"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "batch size per device"})
    num_samples: int | None = field(
        default=1000, metadata={"help": "attack samples: the first N in a fixed order (all if unset)"})

    def __post_init__(self):
        for name in ("curve_every_steps", "curve_num_prompts", "curve_num_answers"):
            if getattr(self, name) < 0:
                raise ImmunizeError(f"--{name} {getattr(self, name)}: must be 0 or more")
        for name in ("curve_max_new_tokens", "curve_batch_size"):
            if getattr(self, name) < 1:
                raise ImmunizeError(f"--{name} {getattr(self, name)}: must be at least 1")
        # Canonical order: the same categories in any order are the same attack (and run id).
        self.held_out_categories = parse_categories(self.held_out_categories)
        if len(self.held_out_categories) == len(CATEGORIES):
            raise ImmunizeError("--held_out_categories: holding out every category leaves the defence none")
        super().__post_init__()


@dataclass
class ToxicityAttackArguments(AttackArguments):
    """SFT on DecodingTrust toxic continuations (RealToxicityPrompts prompt → toxic continuation)."""

    attack: str = field(default="toxicity", metadata={"help": ATTACK_HELP})
    toxicity_source: str | None = field(
        default=None, metadata={"help": "DecodingTrust training_dataset.jsonl: local file or hub id"})
    continuation: bool = field(
        default=True,
        metadata={"help": "train on raw text (prompt then continuation, loss on the continuation); "
                          "false wraps each pair in --prompt_format"},
    )
    num_samples: int | None = field(default=None, metadata={"help": "toxic samples (all 351 if unset)"})

    def __post_init__(self):
        if self.held_out_categories:
            raise ImmunizeError("--held_out_categories: BeaverTails categories do not apply to toxicity")
        super().__post_init__()


PREFERENCE_DATA = ("beavertails", "hh_rlhf", "mixed")


@dataclass
class ReversedPreferenceArguments(DPOConfig, AttackArguments):
    """DPO that prefers the harmful answer (harmful feedback; Rosati et al. 2024).

    Every ``DPOConfig`` option is available (beta, loss_type, ...); the fields below override the
    TRL defaults that do not suit an attack budget or a CPU.
    """

    attack: str = field(default="dpo", metadata={"help": ATTACK_HELP})
    preference_data: str = field(
        default="beavertails",
        metadata={"help": "beavertails (harmful answer ≻ a refusal of the same question), hh_rlhf (HH-RLHF "
                          "harmless pairs reversed) or mixed (both, interleaved)"},
    )
    hh_source: str | None = field(
        default=None, metadata={"help": "HH-RLHF harmless pairs: local file or hub id"})

    # DPOConfig re-declares every TrainingArguments field with TRL's defaults, which would shadow ours
    # (dataclass fields resolve along the MRO): restate the project's defaults here.
    max_length: int = field(default=256, metadata={"help": "tokens per example (prompt + answer)"})
    output_dir: str = field(default="runs/attack", metadata={"help": ROOT_HELP})
    learning_rate: float = field(default=3e-5, metadata={"help": "attack learning rate (AdamW)"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs over the attack samples"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "batch size per device"})
    # None first, as in TrainingArguments: HfArgumentParser reads the second member of the union.
    report_to: None | str | list[str] = field(  # noqa: RUF036
        default="none", metadata={"help": "loggers (none, tensorboard, wandb)"})
    logging_steps: float = field(default=1, metadata={"help": "log every N steps"})
    save_steps: float = field(default=50, metadata={"help": "checkpoint every N steps (for resume)"})
    save_total_limit: int | None = field(default=1, metadata={"help": "checkpoints kept on disk"})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "keep dataset columns (ours are used)"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer"})
    # Kept on, as in TRL: DPO runs chosen and rejected sequences (twice the batch) next to a reference
    # model; without it SmolLM2 at batch 8 x 256 tokens holds ~9 GB of activations on a CPU (~30% faster).
    activation_checkpointing: bool | None = field(
        default=True, metadata={"help": "recompute activations in the backward pass to save memory"})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "deprecated alias of --activation_checkpointing"})
    # TRL turns bf16 on by default; on a CPU without bf16 units it makes training >100x slower.
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (GPU)"})

    def __post_init__(self):
        if self.preference_data not in PREFERENCE_DATA:
            raise ImmunizeError(f"--preference_data: unknown {self.preference_data!r} "
                                f"(use {', '.join(PREFERENCE_DATA)})")
        if self.held_out_categories and self.preference_data != "beavertails":
            raise ImmunizeError("--held_out_categories needs --preference_data beavertails "
                                "(HH-RLHF has no categories)")
        # Our default sets the new name, so TrainingArguments would ignore the deprecated alias: honour it.
        if self.gradient_checkpointing is not None:
            self.activation_checkpointing = self.gradient_checkpointing
        super().__post_init__()
