"""BeaverTails harmful QA and evaluation prompts.

Each QA row keeps its own 14-way category dict: categories are read from the same JSON object as
the prompt and response, so they cannot drift out of alignment with the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from immunize.data.readers import check_type, load_rows, typed
from immunize.errors import ImmunizeError

CATEGORIES: tuple[str, ...] = (
    "animal_abuse",
    "child_abuse",
    "controversial_topics,politics",
    "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance",
    "financial_crime,property_crime,theft",
    "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety",
    "non_violent_unethical_behavior",
    "privacy_violation",
    "self_harm",
    "sexually_explicit,adult_content",
    "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
)
QA_FILE = "beavertails/qa.jsonl"
EVAL_FILE = "beavertails/eval_prompts.jsonl"


def parse_categories(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Category names from a list and/or comma-joined text, in ``CATEGORIES`` order.

    BeaverTails names contain commas themselves ("terrorism,organized_crime"), so comma-joined text
    is read by longest match against the known names, never by a plain split.
    """
    items = [value] if isinstance(value, str) else list(value or [])
    found: set[str] = set()
    for item in items:
        parts = [p.strip() for p in str(item).split(",") if p.strip()]
        while parts:
            match = next((k for k in range(len(parts), 0, -1) if ",".join(parts[:k]) in CATEGORIES), None)
            if match is None:
                raise ImmunizeError(f"--held_out_categories: unknown category {parts[0]!r} in {item!r} "
                                    f"(known: {' '.join(CATEGORIES)})")
            found.add(",".join(parts[:match]))
            parts = parts[match:]
    return [c for c in CATEGORIES if c in found]


@dataclass(frozen=True)
class QARow:
    prompt: str
    response: str
    categories: tuple[str, ...]  # the categories flagged true for this row, in CATEGORIES order
    is_safe: bool


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    category: str


def _qa_row(raw: dict, where: str) -> QARow:
    prompt, response = typed(raw, "prompt", str, where), typed(raw, "response", str, where)
    cats = typed(raw, "category", dict, where)  # the 14 BeaverTails categories → true/false
    unknown = set(cats) - set(CATEGORIES)
    if unknown:
        raise ImmunizeError(f"{where}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {sorted(unknown)}")
    for name, flag in cats.items():
        check_type(flag, bool, f"field 'category' entry {name!r}", where)
    return QARow(
        prompt=prompt,
        response=response,
        categories=tuple(c for c in CATEGORIES if cats.get(c)),
        is_safe=typed(raw, "is_safe", bool, where),
    )


def load_qa(source=None, *, root=None, split: str = "30k_train") -> list[QARow]:
    rows = load_rows(source, QA_FILE, root=root, split=split)
    name = source or QA_FILE
    return [_qa_row(raw, f"{name}: row {i + 1}") for i, raw in enumerate(rows)]


def load_eval_prompts(source=None, *, root=None, split: str = "test") -> list[EvalPrompt]:
    rows = load_rows(source, EVAL_FILE, root=root, split=split)
    name = source or EVAL_FILE
    out = []
    for i, raw in enumerate(rows):
        where = f"{name}: row {i + 1}"
        prompt, category = typed(raw, "prompt", str, where), typed(raw, "category", str, where)
        if category not in CATEGORIES:
            raise ImmunizeError(f"{where}: unknown category {category!r}")
        out.append(EvalPrompt(prompt=prompt, category=category))
    return out
