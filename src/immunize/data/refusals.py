"""Real refusals: a bank of human-labelled refusal texts, and a keyword refusal check.

The bank holds refusals of *unsafe* requests only: the XSTest completions that annotators labelled
``2_full_refusal`` on the unsafe contrast prompts (type ``contrast_*``), and the hand-written safe
responses. XSTest's refusals of its safe prompts ("I can't tell you how to kill a Python
process") are left out: paired with a harmful question they teach refusing something else. Every
text was written for another question, so the bank is only an explicit fallback
(``--refusals bank``, ``--refusal_fallback bank``; see ``immunize.data.paired_refusals``); a prompt
draws its text by a stable hash.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from immunize.data.readers import read_table, require
from immunize.errors import ImmunizeError
from immunize.paths import data_root

XSTEST_FILES = (
    "refusals/xstest_completions_llama2new.csv",
    "refusals/xstest_completions_llama2orig.csv",
    "refusals/xstest_completions_mistralguard.csv",
)
SAFE_RESPONSE_FILES = (
    "refusals/adv_training_behaviors_safe_responses.csv",
    "refusals/adv_training_behaviors_safe_responses_longer.csv",
)
LABELS = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")


@dataclass(frozen=True)
class LabelledCompletion:
    prompt: str
    completion: str
    label: str  # one of LABELS (human annotation)
    prompt_type: str  # XSTest type; "contrast_*" marks an unsafe prompt
    source: str


def load_labelled_completions(root=None) -> list[LabelledCompletion]:
    base = data_root(root)
    out = []
    for rel in XSTEST_FILES:
        for i, row in enumerate(read_table(base / rel)):
            where = f"{rel}: row {i + 2}"
            require(row, ("prompt", "completion", "final_label", "type"), where)
            if row["final_label"] not in LABELS:
                raise ImmunizeError(f"{where}: unknown final_label {row['final_label']!r}")
            out.append(LabelledCompletion(row["prompt"], row["completion"].strip(), row["final_label"],
                                          row["type"], rel))
    return out


_REFUSAL_PATTERNS = re.compile(
    r"\b(i can(?:'|’)?t|i cannot|i can not|i won(?:'|’)?t|i will not|i(?:'|’)m (?:sorry|not able|unable)|"
    r"i am (?:sorry|not able|unable)|i apologi[sz]e|as an ai|i must (?:decline|refuse)|i(?:'|’)m afraid|"
    r"not (?:appropriate|ethical|legal) (?:for me )?to|i do not (?:provide|assist|support)|"
    r"i don(?:'|’)t (?:provide|assist|support|think i can)|cannot (?:help|assist|provide|fulfill)|"
    r"can(?:'|’)?t (?:help|assist|provide|fulfill)|against my (?:programming|guidelines|policy)|"
    r"unable to (?:help|assist|provide|comply)|i refuse|i(?:'|’)d rather not)\b",
    re.IGNORECASE,
)


def looks_like_refusal(text: str, *, window: int = 200) -> bool:
    """Keyword check on the start of a response (refusals announce themselves early)."""
    return bool(_REFUSAL_PATTERNS.search(text.strip()[:window]))


def _clean(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    # Cut at a sentence end so the refusal still reads as a whole answer.
    cut = text[:max_chars]
    end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
    return cut[: end + 1] if end > 40 else cut.rsplit(" ", 1)[0] + "."


def is_bank_completion(completion: LabelledCompletion) -> bool:
    """A human-labelled full refusal of an unsafe XSTest prompt."""
    return completion.label == "2_full_refusal" and completion.prompt_type.startswith("contrast_")


class RefusalBank:
    """Distinct real refusals of unsafe requests, drawn per prompt by a stable hash."""

    def __init__(self, texts: list[str]):
        unique = sorted(set(t for t in texts if t))
        if not unique:
            raise ImmunizeError("refusal bank is empty")
        self.texts = unique

    @classmethod
    def from_data(cls, root=None, *, max_chars: int = 400) -> RefusalBank:
        base = data_root(root)
        texts = [_clean(c.completion, max_chars) for c in load_labelled_completions(root) if is_bank_completion(c)]
        for rel in SAFE_RESPONSE_FILES:
            for i, row in enumerate(read_table(base / rel)):
                require(row, ("Safe_Response",), f"{rel}: row {i + 2}")
                texts.append(_clean(row["Safe_Response"], max_chars))
        # Keep texts that read as refusals on their own: a few "refusals" start by complying.
        return cls([t for t in texts if looks_like_refusal(t)])

    def __len__(self) -> int:
        return len(self.texts)

    def for_prompt(self, prompt: str, salt: str = "") -> str:
        digest = hashlib.sha256((salt + prompt).encode("utf-8")).digest()
        return self.texts[int.from_bytes(digest[:8], "big") % len(self.texts)]
