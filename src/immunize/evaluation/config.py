"""The configuration of `immunize evaluate`: one dataclass (CLI flags = YAML keys) plus suites.

A suite (``quick`` or ``full``) fills every size option the user left unset; anything given on
the command line or in the YAML file wins over the suite. Sizes of 0 mean "all available".
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from immunize.config import check_numbers
from immunize.errors import ImmunizeError
from immunize.generation import check_generation_format
from immunize.judges.gate import DEFAULT_THRESHOLD, check_threshold
from immunize.models.aliases import DEFAULT_MODEL

T = TypeVar("T")

# Small, fast MMLU subjects spread over STEM, humanities, social sciences and other.
QUICK_MMLU_SUBJECTS = "high_school_geography,marketing,college_biology,elementary_mathematics"

SUITES: dict[str, dict[str, Any]] = {
    # Sized to finish in under 10 minutes for SmolLM2-135M on a 2-core CPU, every section filled
    # (about 230 CPU-seconds in all, measured); TruthfulQA MC1 and E2E only in the full suite.
    "quick": {
        "batch_size": 32,
        "bootstrap_resamples": 1000,
        "harmfulness_samples": 48,
        "harmfulness_max_new_tokens": 64,
        "overrefusal_samples": 32,
        "overrefusal_max_new_tokens": 32,
        "toxicity_samples": 32,
        "toxicity_max_new_tokens": 32,
        "capability_tasks": "mmlu,truthfulqa_mc2",
        "mmlu_subjects": QUICK_MMLU_SUBJECTS,
        "mmlu_num_fewshot": 0,
        "capability_limit": 6,
        "perplexity_samples": 16,
        "perplexity_max_length": 256,
        "trainability_tasks": "viggo",
        "trainability_steps": 4,
        "trainability_eval_samples": 12,
        "trainability_max_new_tokens": 40,
    },
    # Paper-sized: every held-out prompt, all of MMLU 5-shot, all of TruthfulQA.
    "full": {
        "batch_size": 32,
        "bootstrap_resamples": 10000,
        "harmfulness_samples": 0,
        "harmfulness_max_new_tokens": 128,
        "overrefusal_samples": 500,
        "overrefusal_max_new_tokens": 64,
        "toxicity_samples": 0,
        "toxicity_max_new_tokens": 50,
        "capability_tasks": "mmlu,truthfulqa_mc1,truthfulqa_mc2",
        "mmlu_subjects": "all",
        "mmlu_num_fewshot": 5,
        "capability_limit": 0,
        "perplexity_samples": 0,
        "perplexity_max_length": 1024,
        "trainability_tasks": "viggo,e2e",
        "trainability_steps": 100,
        "trainability_eval_samples": 200,
        "trainability_max_new_tokens": 64,
    },
}


@dataclass
class EvaluationConfig:
    # What to evaluate, and where the results go.
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "alias, local dir, .gguf file or hub id"})
    suite: str = field(
        default="quick",
        metadata={"help": "quick (minutes on a CPU) or full (paper-sized); fills every size option left unset"},
    )
    output_dir: str = field(
        default="runs/eval",
        metadata={"help": "where <section>.json, generations/ and summary.json go; results there are reused"},
    )
    sections: str = field(
        default="all",
        metadata={
            "help": "comma list of sections to run, or all "
            "(harmfulness, overrefusal, toxicity, capability, "
            "perplexity, trainability)"
        },
    )
    skip: str = field(default="", metadata={"help": "comma list of sections to leave out"})
    force: bool = field(default=False, metadata={"help": "recompute sections even if a matching result exists"})
    data_root: str | None = field(default=None, metadata={"help": "local data root (default ../shared/data)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the checkpoint"})
    prompt_format: str = field(default="chat", metadata={"help": "chat or plain, for harmful and benign prompts"})
    batch_size: int | None = field(default=None, metadata={"help": "generation batch size"})
    threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads for torch (default: torch's choice, or 1 when the CPUs are oversubscribed)"},
    )
    seed: int = field(default=42, metadata={"help": "seed of bootstrap intervals and fine-tunes"})
    bootstrap_resamples: int | None = field(default=None, metadata={"help": "bootstrap resamples per interval"})

    # Harmfulness: answers to held-out harmful prompts, scored by a judge.
    harmfulness_source: str = field(
        default="beavertails", metadata={"help": "beavertails (held-out eval split), advbench, or both"}
    )
    harmfulness_prompts: str | None = field(
        default=None,
        metadata={"help": "your own harmful prompts instead of --harmfulness_source: a .jsonl, .json (list of "
                          "objects) or .csv file, or a hub dataset owner/name[:split] (split test by default), "
                          "with a 'prompt' column and an optional 'category' one (one name per row); a prompt "
                          "that any training set or the judges' training data holds, or that repeats an "
                          "earlier row, is dropped (counted in the result's details.prompts)"},
    )
    harmfulness_samples: int | None = field(default=None, metadata={"help": "prompts per source (0: all)"})
    harmfulness_categories: str = field(
        default="",
        metadata={"help": "comma-separated BeaverTails categories whose every evaluation prompt joins the "
                          "sample, e.g. a defence's held-out categories; with --harmfulness_prompts, the "
                          "file's own categories or BeaverTails' (a name no kept prompt of the file carries "
                          "adds nothing and is listed in details.prompts.categories_absent)"},
    )
    harmfulness_max_new_tokens: int | None = field(default=None, metadata={"help": "answer length in tokens"})
    harmfulness_judge: str = field(default="harmfulness", metadata={"help": "judge scoring harmfulness"})
    harmfulness_judge_fallback: str | None = field(
        default=None, metadata={"help": "judge used (and recorded) if --harmfulness_judge cannot be loaded"}
    )
    harmfulness_refusal_gate: float = field(
        default=DEFAULT_THRESHOLD,
        metadata={"help": "an answer whose opening 32 words the refusal judge scores at least this as a "
                          "refusal, and no later 32-word window of which reads as compliance, scores harmfulness "
                          "0, as in StrongREJECT (a refusal's harm should not depend on the prompt; windows, "
                          "since the judge reads 64 word pieces); 0: off"},
    )
    refusal_judge: str = field(default="refusal", metadata={"help": "judge deciding refusals"})
    refusal_judge_fallback: str | None = field(
        default="keyword-refusal",
        metadata={"help": "judge used (and recorded) if --refusal_judge cannot be loaded"},
    )

    # Over-refusal: refusals of benign instructions.
    overrefusal_samples: int | None = field(default=None, metadata={"help": "benign test instructions (0: all)"})
    overrefusal_max_new_tokens: int | None = field(default=None, metadata={"help": "answer length in tokens"})

    # Toxicity: continuations of DecodingTrust toxic_test prompts.
    toxicity_samples: int | None = field(default=None, metadata={"help": "toxic_test prompts (0: all)"})
    toxicity_max_new_tokens: int | None = field(default=None, metadata={"help": "continuation length in tokens"})
    toxicity_format: str = field(
        default="continuation",
        metadata={"help": "continuation (the prompt text as is, as in RealToxicityPrompts), chat or plain"},
    )
    toxicity_judge: str = field(default="toxicity", metadata={"help": "judge scoring toxicity"})
    toxicity_judge_fallback: str | None = field(
        default=None, metadata={"help": "judge used (and recorded) if --toxicity_judge cannot be loaded"}
    )

    # Capability (stability): lm-evaluation-harness on local copies.
    capability_tasks: str | None = field(
        default=None, metadata={"help": "comma list of mmlu, truthfulqa_mc1, truthfulqa_mc2"}
    )
    mmlu_subjects: str | None = field(default=None, metadata={"help": "comma list of MMLU subjects, or all"})
    mmlu_num_fewshot: int | None = field(default=None, metadata={"help": "MMLU shots (from its dev split)"})
    capability_limit: int | None = field(default=None, metadata={"help": "documents per task (0: all)"})
    capability_batch_size: int = field(default=16, metadata={"help": "lm-eval batch size"})

    # Perplexity on held-out benign answers.
    perplexity_samples: int | None = field(default=None, metadata={"help": "held-out alpaca_eval answers (0: all)"})
    perplexity_max_length: int | None = field(default=None, metadata={"help": "tokens per text (prompt + answer)"})

    # Trainability: a fixed small fine-tuning budget on data-to-text tasks, ROUGE after it.
    trainability_tasks: str | None = field(default=None, metadata={"help": "comma list of viggo, e2e"})
    trainability_steps: int | None = field(default=None, metadata={"help": "optimizer steps per task"})
    trainability_batch_size: int = field(default=8, metadata={"help": "examples per step"})
    trainability_learning_rate: float = field(default=5e-5, metadata={"help": "fine-tuning learning rate"})
    trainability_max_length: int = field(default=128, metadata={"help": "tokens per training example"})
    trainability_eval_samples: int | None = field(
        default=None, metadata={"help": "test meaning representations scored with ROUGE (0: all)"}
    )
    trainability_max_new_tokens: int | None = field(default=None, metadata={"help": "generated text length"})
    reference_model: str | None = field(
        default=None,
        metadata={"help": "model fine-tuned with the same budget and seed for comparison (e.g. the undefended base)"},
    )

    def __post_init__(self):
        if self.suite not in SUITES:
            raise ImmunizeError(f"--suite {self.suite!r}: unknown (use {' or '.join(SUITES)})")
        check_generation_format(self.prompt_format, "--prompt_format")
        if self.prompt_format == "continuation":
            raise ImmunizeError(
                "--prompt_format continuation: harmful and benign prompts are questions; use chat or plain"
            )
        check_generation_format(self.toxicity_format, "--toxicity_format")
        if self.harmfulness_source not in ("beavertails", "advbench", "both"):
            raise ImmunizeError(f"--harmfulness_source {self.harmfulness_source!r}: use beavertails, advbench or both")
        # A misspelt category or a bad prompts file fails here, not mid-run.
        if self.harmfulness_prompts is not None:
            self._check_prompts_file()
        else:
            from immunize.evaluation.harmfulness import parse_categories  # it imports this module

            parse_categories(self.harmfulness_categories)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and f.name != "seed" and value < 0:
                raise ImmunizeError(f"--{f.name} {value}: must not be negative")
        for name in (
            "batch_size",
            "bootstrap_resamples",
            "capability_batch_size",
            "trainability_batch_size",
            "trainability_steps",
            "perplexity_max_length",
            "trainability_max_length",
            "harmfulness_max_new_tokens",
            "overrefusal_max_new_tokens",
            "toxicity_max_new_tokens",
            "trainability_max_new_tokens",
        ):
            if getattr(self, name) == 0:
                raise ImmunizeError(f"--{name} 0: must be at least 1")
        check_numbers(self)
        # A float, so 0 and 0.0 (a flag, YAML, Python) are the same option and the same section key.
        self.harmfulness_refusal_gate = check_threshold(self.harmfulness_refusal_gate, "--harmfulness_refusal_gate")
        self._check_names()

    def _check_prompts_file(self) -> None:
        """A local prompts file is read whole (it is small next to a run); a hub id only by its form."""
        from immunize.data.prompt_files import load_prompt_rows, prompt_source
        from immunize.evaluation.harmfulness import file_categories

        option = "--harmfulness_prompts"
        source = prompt_source(self.harmfulness_prompts, option)
        if source.path is not None:
            try:
                rows = load_prompt_rows(source, option)
            except ImmunizeError as err:
                raise ImmunizeError(f"{option}: {err}") from None
            file_categories(self.harmfulness_categories, rows, source.text)

    def _check_names(self) -> None:
        """Judges, sections and tasks by name, so a typo fails before anything is written or loaded."""
        from immunize.evaluation.registry import SECTIONS
        from immunize.evaluation.trainability import TRAINABILITY_TASKS
        from immunize.judges.registry import find_judge
        from immunize.tasks import CAPABILITY_TASKS

        for f in dataclasses.fields(self):
            if f.name.endswith(("_judge", "_judge_fallback")) and getattr(self, f.name) is not None:
                find_judge(getattr(self, f.name), f"--{f.name}")
        sections = "" if self.sections.strip() == "all" else self.sections
        for option, text, what, known in (
                ("sections", sections, "section", SECTIONS.names()), ("skip", self.skip, "section", SECTIONS.names()),
                ("capability_tasks", self.capability_tasks, "task", list(CAPABILITY_TASKS)),
                ("trainability_tasks", self.trainability_tasks, "task", list(TRAINABILITY_TASKS))):
            for name in split_list(text):
                if name not in known:
                    raise ImmunizeError(f"--{option} {name!r}: unknown {what} (known: {', '.join(known)})")


def resolve_suite(cfg: EvaluationConfig) -> EvaluationConfig:
    """A copy with every unset (None) size option taken from the suite."""
    preset = SUITES[cfg.suite]
    values = {name: value for name, value in preset.items() if getattr(cfg, name) is None}
    return dataclasses.replace(cfg, **values)


def split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def fixed_subset(items: Sequence[T], n: int | None, key: Callable[[T], str], *, option: str,
                 source: str) -> list[T]:
    """``n`` items (all when n is 0 or None) chosen by a stable hash of ``key(item)``.

    The same items on every run and machine, independent of the file's order (which may be
    grouped by category), so a small subset is still a fair sample. Returned in hash order.
    More than ``source`` holds is an error naming ``--option``: fewer than asked for would be
    scored and reported as if they were the requested sample.
    """
    if n and n > len(items):
        raise ImmunizeError(f"--{option} {n}: {source} has only {len(items)}")
    ranked = sorted(items, key=lambda item: hashlib.sha256(key(item).encode("utf-8")).hexdigest())
    return ranked if not n else ranked[:n]
