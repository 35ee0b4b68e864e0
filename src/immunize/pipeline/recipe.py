"""The recipe of `immunize run`: one flat dataclass, so every knob is a flag and a YAML key."""

from __future__ import annotations

from dataclasses import dataclass, field

from immunize.errors import ImmunizeError
from immunize.models.aliases import DEFAULT_MODEL
from immunize.prompts import check_format


@dataclass
class RunConfig:
    # The experiment.
    name: str = field(default="experiment", metadata={"help": "run name (shown in the report)"})
    output_dir: str = field(default="runs/experiment",
                            metadata={"help": "run directory (stages/, results.json, report/)"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "base model: alias, local dir, .gguf file or hub id"})
    data_root: str | None = field(default=None, metadata={"help": "local data root (default ../shared/data)"})
    prompt_format: str = field(default="chat", metadata={"help": "chat or plain"})
    max_length: int = field(default=128, metadata={"help": "tokens per training example"})
    seed: int = field(default=42, metadata={"help": "seed of every stage"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"})

    # Alignment: safety SFT that makes a non-refusing instruct model the papers' aligned base.
    align: bool = field(default=True, metadata={"help": "safety-align the base model first"})
    align_num_harmful: int = field(default=256, metadata={"help": "harmful prompts answered with refusals"})
    align_num_benign: int = field(default=256, metadata={"help": "benign instructions with answers"})
    align_learning_rate: float = field(default=5e-5, metadata={"help": "alignment learning rate"})
    align_epochs: float = field(default=1.0, metadata={"help": "alignment epochs"})
    align_batch_size: int = field(default=8, metadata={"help": "alignment batch size"})

    # Defences to compare; "none" is the aligned model itself.
    defences: list[str] = field(default_factory=lambda: ["none", "repnoise"],
                                metadata={"help": "defences to compare (none = the undefended aligned model)"})
    defence_num_samples: int = field(default=256, metadata={"help": "defence pairs (harmful, refusal)"})
    defence_learning_rate: float = field(default=2e-5, metadata={"help": "defence learning rate (paper: 2e-5)"})
    defence_epochs: float = field(default=1.0, metadata={"help": "defence epochs (paper: 1)"})
    defence_batch_size: int = field(default=8, metadata={"help": "defence batch size (paper: 8)"})
    repnoise_alpha: float = field(default=1.0, metadata={"help": "RepNoise ascent weight α (paper: 1)"})
    repnoise_beta: float = field(default=0.001, metadata={"help": "RepNoise noise weight β (paper: 0.001)"})

    # Attacks: the grid of budgets (learning rate × samples × seed), the same for every defence.
    attack: str = field(default="sft", metadata={"help": "attack (sft, dpo, toxicity, ...)"})
    attack_use_lora: bool = field(default=False, metadata={"help": "LoRA attack instead of full fine-tuning"})
    attack_learning_rates: list[float] = field(default_factory=lambda: [3e-5, 6e-5, 8e-5],
                                               metadata={"help": "attack learning rates"})
    attack_num_samples: list[int] = field(default_factory=lambda: [1000, 10000],
                                          metadata={"help": "attack sample counts"})
    attack_seeds: list[int] = field(default_factory=lambda: [42], metadata={"help": "attack seeds"})
    attack_epochs: float = field(default=1.0, metadata={"help": "attack epochs"})
    attack_batch_size: int = field(default=8, metadata={"help": "attack batch size"})
    curve_every_steps: int = field(default=10, metadata={"help": "resistance-curve point every N attack steps"})
    curve_num_prompts: int = field(default=16, metadata={"help": "prompts judged at each curve point"})
    curve_max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per curve prompt"})

    # Evaluation.
    eval_suite: str = field(default="quick", metadata={"help": "evaluation suite for sizes left unset (quick, full)"})
    eval_harmfulness_samples: int = field(default=50, metadata={"help": "held-out harmful prompts (0: all)"})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "answer length of harmfulness evaluations"})
    eval_capability_limit: int | None = field(default=None, metadata={"help": "questions per capability task"})
    eval_trainability_steps: int | None = field(default=None, metadata={"help": "benign fine-tune steps"})
    eval_trainability_tasks: str | None = field(default=None, metadata={"help": "viggo, e2e"})
    eval_trainability_eval_samples: int | None = field(default=None, metadata={"help": "ROUGE test examples"})
    eval_toxicity_samples: int | None = field(default=None, metadata={"help": "toxic_test prompts"})
    eval_overrefusal_samples: int | None = field(default=None, metadata={"help": "benign prompts for over-refusal"})
    harmfulness_judge: str = field(default="harmfulness", metadata={"help": "judge of harmfulness"})

    # Generalization: the defence never sees these categories; harm on them is reported apart.
    held_out_categories: list[str] = field(default_factory=list,
                                           metadata={"help": "BeaverTails categories kept out of the defence"})

    # Depth analysis.
    analysis: bool = field(default=True, metadata={"help": "weight distance, representation PCA, logit lens"})
    analysis_examples: int = field(default=32, metadata={"help": "harmful/harmless examples for PCA and lens"})
    analysis_layers: list[int] = field(default_factory=list, metadata={"help": "PCA layers (default: 4 spread)"})
    analysis_lens_tokens: int = field(default=32, metadata={
        "help": "logit lens: opening answer tokens read out per example (its cost grows with them)"})

    # Verdict thresholds (see immunize.verdict for their meaning and defaults).
    phi: float | None = field(default=None, metadata={"help": "harmfulness threshold φ for resistance"})
    epsilon: float | None = field(default=None, metadata={"help": "tolerance ε for stability and trainability"})

    def __post_init__(self):
        check_format(self.prompt_format)
        if not self.defences:
            raise ImmunizeError("--defences: name at least one defence (none is the baseline)")
        if "none" not in self.defences:
            raise ImmunizeError("--defences: include 'none': every verdict compares with the undefended model")
        if len(set(self.defences)) != len(self.defences):
            raise ImmunizeError(f"--defences: {self.defences} names a defence twice")
        for name in ("attack_learning_rates", "attack_num_samples", "attack_seeds"):
            if not getattr(self, name):
                raise ImmunizeError(f"--{name}: give at least one value")
        if any(n <= 0 for n in self.attack_num_samples):
            raise ImmunizeError("--attack_num_samples: values must be positive")
        for name in ("analysis_examples", "analysis_lens_tokens"):
            if getattr(self, name) < 1:
                raise ImmunizeError(f"--{name}: must be positive, got {getattr(self, name)}")
        from immunize.data.beavertails import CATEGORIES

        if unknown := [name for name in self.held_out_categories if name not in CATEGORIES]:
            # Checked here: the stages would find out only after alignment has run.
            raise ImmunizeError(f"--held_out_categories: unknown BeaverTails categories {unknown} "
                                f"(known: {'; '.join(CATEGORIES)})")
