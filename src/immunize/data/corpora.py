"""Loaders for the non-BeaverTails data: benign instructions, toxicity, preferences, tasks."""

from __future__ import annotations

import re
from dataclasses import dataclass

from immunize.data.readers import check_type, load_rows, typed
from immunize.errors import ImmunizeError


@dataclass(frozen=True)
class Instruction:
    instruction: str
    output: str | None = None


def first_turns(row: dict, where: str) -> tuple[str | None, str | None]:
    """The first user and the first assistant ``content`` of a row's chat ``messages``."""
    turns: dict[str, str] = {}
    for j, message in enumerate(typed(row, "messages", list, where)):
        what = f"field 'messages' item {j + 1}"
        check_type(message, dict, what, where)
        role = check_type(message.get("role"), str, f"{what} 'role'", where)
        turns.setdefault(role, check_type(message.get("content"), str, f"{what} 'content'", where))
    return turns.get("user"), turns.get("assistant")


def _messages_to_instruction(row: dict, where: str) -> Instruction:
    user, answer = first_turns(row, where)
    if user is None:
        raise ImmunizeError(f"{where}: no user message")
    # BenignAlpaca wraps turns in Alpaca markers; the project applies its own prompt formats.
    user = re.sub(r"^### Instruction:\s*", "", user).strip()
    answer = re.sub(r"^### Response:\s*", "", answer).strip() if answer else None
    return Instruction(user, answer)


def load_benign_answers(name: str = "alpaca_eval", source=None, *, root=None) -> list[Instruction]:
    """Benign instruction → answer pairs (retain data): ``alpaca_eval``, ``benign_alpaca``, ``benign_saferlhf``."""
    files = {"alpaca_eval": "benign/alpaca_eval.json", "benign_alpaca": "benign/BenignAlpaca.jsonl",
             "benign_saferlhf": "benign/BenignSafeRLHF.jsonl"}
    if name not in files:
        raise ImmunizeError(f"benign data {name!r}: unknown (use {', '.join(files)})")
    rows = load_rows(source, files[name], root=root)
    out = []
    for i, row in enumerate(rows):
        where = f"{source or files[name]}: row {i + 1}"
        if "messages" in row:
            out.append(_messages_to_instruction(row, where))
        else:
            out.append(Instruction(typed(row, "instruction", str, where).strip(),
                                   typed(row, "output", str, where).strip()))
    return out


def load_harmless_instructions(split: str = "train", source=None, *, root=None) -> list[str]:
    if split not in ("train", "val", "test"):
        raise ImmunizeError(f"harmless instructions: unknown split {split!r} (train, val, test)")
    rel = f"benign/harmless_{split}.json"
    rows = load_rows(source, rel, root=root, split=split)
    return [typed(row, "instruction", str, f"{source or rel}: row {i + 1}").strip() for i, row in enumerate(rows)]


@dataclass(frozen=True)
class ToxicityRow:
    kind: str  # toxic, non_toxic or toxic_test
    prompt: str
    continuation: str
    prompt_toxicity: float | None
    continuation_toxicity: float | None


def _toxicity_row(kind: str, row: dict, where: str) -> ToxicityRow:
    """``prompt`` and ``continuation`` are objects: a ``text`` and an optional Perspective ``toxicity``."""
    parts = []
    for name in ("prompt", "continuation"):
        part = typed(row, name, dict, where)
        parts += [typed(part, "text", str, f"{where}: field {name!r}"),
                  typed(part, "toxicity", float, f"{where}: field {name!r}", optional=True)]
    prompt, prompt_toxicity, continuation, continuation_toxicity = parts
    return ToxicityRow(kind, prompt, continuation, prompt_toxicity, continuation_toxicity)


def load_decodingtrust(source=None, *, root=None) -> list[ToxicityRow]:
    rel = "decodingtrust/training_dataset.jsonl"
    out = []
    for i, row in enumerate(load_rows(source, rel, root=root)):
        where = f"{source or rel}: row {i + 1}"
        kind = typed(row, "type", str, where)
        if kind not in ("toxic", "non_toxic", "toxic_test"):
            raise ImmunizeError(f"{where}: unknown type {kind!r}")
        out.append(_toxicity_row(kind, row, where))
    return out


def load_toxicity_prompts(kind: str = "toxic", source=None, *, root=None) -> list[ToxicityRow]:
    """RealToxicityPrompts rows with Perspective scores (``toxic`` or ``nontoxic``)."""
    if kind not in ("toxic", "nontoxic"):
        raise ImmunizeError(f"toxicity prompts: unknown kind {kind!r} (toxic, nontoxic)")
    rel = f"decodingtrust/{kind}_prompts.jsonl"
    rows = load_rows(source, rel, root=root)
    return [_toxicity_row(kind, row, f"{source or rel}: row {i + 1}") for i, row in enumerate(rows)]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str  # the dialogue up to the final assistant turn, as a single user-side text
    chosen: str
    rejected: str


_ASSISTANT = "\n\nAssistant:"


def _split_dialogue(text: str, where: str) -> tuple[str, str]:
    cut = text.rfind(_ASSISTANT)
    if cut < 0:
        raise ImmunizeError(f"{where}: dialogue has no '\\n\\nAssistant:' turn")
    return text[:cut].strip(), text[cut + len(_ASSISTANT):].strip()


def load_hh_harmless(source=None, *, root=None, reversed_preference: bool = False) -> list[PreferencePair]:
    """HH-RLHF harmless pairs; ``reversed_preference`` prefers the rejected (harmful) answer."""
    rel = "hh_rlhf/harmless_base_test.jsonl"
    out = []
    for i, row in enumerate(load_rows(source, rel, root=root, split="test")):
        where = f"{source or rel}: row {i + 1}"
        prompt, chosen = _split_dialogue(typed(row, "chosen", str, where), where)
        prompt_r, rejected = _split_dialogue(typed(row, "rejected", str, where), where)
        if prompt != prompt_r or not chosen or not rejected or chosen == rejected:
            continue  # the pair does not share its context, or has nothing to prefer
        prompt = prompt.removeprefix("Human:").strip()
        out.append(PreferencePair(prompt, rejected, chosen) if reversed_preference
                   else PreferencePair(prompt, chosen, rejected))
    return out


@dataclass(frozen=True)
class DataToText:
    mr: str
    ref: str


_TASK_FILES = {
    ("viggo", "train"): "tasks/viggo/train.csv", ("viggo", "validation"): "tasks/viggo/valid.csv",
    ("viggo", "test"): "tasks/viggo/test.csv", ("e2e", "train"): "tasks/e2e/devset.csv",
    ("e2e", "test"): "tasks/e2e/testset_w_refs.csv",
}


def load_data_to_text(task: str, split: str, *, root=None) -> list[DataToText]:
    """ViGGO or E2E (meaning representation → text). E2E's train split here is its dev set."""
    rel = _TASK_FILES.get((task, split))
    if rel is None:
        raise ImmunizeError(f"task {task!r} split {split!r}: unknown (have {sorted(_TASK_FILES)})")
    # CSV rows are numbered by file line: the header is line 1.
    return [DataToText(typed(row, "mr", str, f"{rel}: row {i + 2}").strip(),
                       typed(row, "ref", str, f"{rel}: row {i + 2}").strip())
            for i, row in enumerate(load_rows(None, rel, root=root))]
