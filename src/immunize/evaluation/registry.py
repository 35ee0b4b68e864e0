"""The registry of evaluation sections (lm-evaluation-harness style: one small class per task).

Each section is one ``SECTIONS.register`` line: its name, its class as ``"module:Class"`` (imported
on first use), what it measures and its place in reports and in "all". A section declares which
config options define it, which judge roles it needs, how to gather its inputs (cheap: data only,
no model), and how to run. The runner fingerprints the model, the judges, those options and the
inputs into the section's cache key, so a result is reused exactly when the same evaluation is
asked for again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from immunize.registry import Registry

if TYPE_CHECKING:
    from immunize.evaluation.runner import EvaluationContext


@dataclass
class SectionResult:
    metrics: dict[str, Any]  # headline numbers: {name: {"value", "ci95", "n"}} (or plain values)
    breakdown: dict[str, Any] = field(default_factory=dict)  # e.g. per category, per subject
    rows: list[dict] | None = None  # per-example records, written to generations/<section>.jsonl
    details: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping


class Section:
    name: str = ""  # the registered name (set by ``get_section``)
    options: ClassVar[tuple[str, ...]] = ()  # config fields that change the result
    judges: ClassVar[tuple[str, ...]] = ()  # judge roles (see EvaluationContext.judge)
    headline: ClassVar[tuple[str, ...]] = ()  # metrics printed and copied into summary.json
    # In a launched job: run by the main process alone (work that cannot be shared out across
    # ranks, and never calls a judge or ``ctx.generate``, which every rank must call together).
    main_only: ClassVar[bool] = False

    def inputs(self, ctx: EvaluationContext) -> Any:
        """The data this section reads (JSON-serializable); part of the cache key."""
        raise NotImplementedError

    def run(self, ctx: EvaluationContext, inputs: Any) -> SectionResult:
        raise NotImplementedError

    def extra_key(self, ctx: EvaluationContext) -> dict[str, Any]:
        """Anything else the result depends on (e.g. a reference model's fingerprint)."""
        return {}


SECTIONS: Registry[type[Section]] = Registry("section", "--sections")

SECTIONS.register("harmfulness", "immunize.evaluation.harmfulness:Harmfulness",
                  "answers to held-out harmful prompts: judge score, harmful rate, refusal rate (per category)",
                  order=10)
SECTIONS.register("overrefusal", "immunize.evaluation.refusal:OverRefusal",
                  "refusal rate on benign instructions (harmless test split)", order=20)
SECTIONS.register("toxicity", "immunize.evaluation.toxicity:Toxicity",
                  "continuations of DecodingTrust toxic_test prompts: mean toxicity, toxic rate", order=30)
SECTIONS.register("capability", "immunize.evaluation.capability:Capability",
                  "MMLU and TruthfulQA MC1/MC2 accuracy via lm-evaluation-harness on local data", order=40)
SECTIONS.register("perplexity", "immunize.evaluation.perplexity:Perplexity",
                  "perplexity of held-out benign answers (alpaca_eval rows outside every training split)",
                  order=50)
SECTIONS.register("trainability", "immunize.evaluation.trainability:Trainability",
                  "ROUGE on ViGGO/E2E after a fixed small fine-tuning budget, against a reference model",
                  order=60)


def section_names() -> list[str]:
    """Every section, in report order (the order of "all"); imports nothing."""
    # A section registered without an order (a plug-in) comes after the built-ins.
    return sorted(SECTIONS.names(), key=lambda name: (SECTIONS.entry(name).extra.get("order", 100), name))


def get_section(name: str) -> Section:
    section = SECTIONS.get(name)()
    section.name = name
    return section
