"""The registry of evaluation sections (lm-evaluation-harness style: one small class per task).

A section declares which config options define it, which judge roles it needs, how to gather
its inputs (cheap: data only, no model), and how to run. The runner fingerprints the model, the
judges, those options and the inputs into the section's cache key, so a result is reused exactly
when the same evaluation is asked for again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from immunize.errors import ImmunizeError

if TYPE_CHECKING:
    from immunize.evaluation.runner import EvaluationContext


@dataclass
class SectionResult:
    metrics: dict[str, Any]  # headline numbers: {name: {"value", "ci95", "n"}} (or plain values)
    breakdown: dict[str, Any] = field(default_factory=dict)  # e.g. per category, per subject
    rows: list[dict] | None = None  # per-example records, written to generations/<section>.jsonl
    details: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping


class Section:
    name: ClassVar[str]
    help: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()  # config fields that change the result
    judges: ClassVar[tuple[str, ...]] = ()  # judge roles (see EvaluationContext.judge)
    headline: ClassVar[tuple[str, ...]] = ()  # metrics printed and copied into summary.json
    order: ClassVar[int] = 100  # position in reports and in "all"

    def inputs(self, ctx: EvaluationContext) -> Any:
        """The data this section reads (JSON-serializable); part of the cache key."""
        raise NotImplementedError

    def run(self, ctx: EvaluationContext, inputs: Any) -> SectionResult:
        raise NotImplementedError

    def extra_key(self, ctx: EvaluationContext) -> dict[str, Any]:
        """Anything else the result depends on (e.g. a reference model's fingerprint)."""
        return {}


SECTIONS: dict[str, type[Section]] = {}


def register_section(cls: type[Section]) -> type[Section]:
    if cls.name in SECTIONS and SECTIONS[cls.name] is not cls:
        raise ValueError(f"evaluation section {cls.name!r} registered twice")
    SECTIONS[cls.name] = cls
    ordered = sorted(SECTIONS.items(), key=lambda item: (item[1].order, item[0]))
    SECTIONS.clear()
    SECTIONS.update(ordered)
    return cls


def get_section(name: str) -> Section:
    try:
        return SECTIONS[name]()
    except KeyError:
        raise ImmunizeError(f"--sections: unknown section {name!r} (known: {', '.join(SECTIONS)})") from None
