"""Loaders for the non-BeaverTails data: benign instructions, toxicity, preferences, tasks."""

from __future__ import annotations

import re
from dataclasses import dataclass

from immunize.data.readers import load_rows, require
from immunize.errors import ImmunizeError


@dataclass(frozen=True)
class Instruction:
    instruction: str
    output: str | None = None


def _messages_to_instruction(messages: list, where: str) -> Instruction:
    if not isinstance(messages, list):
        raise ImmunizeError(f"{where}: 'messages' must be a list")
    user = next((m["content"] for m in messages if m.get("role") == "user"), None)
    answer = next((m["content"] for m in messages if m.get("role") == "assistant"), None)
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
            out.append(_messages_to_instruction(row["messages"], where))
        else:
            require(row, ("instruction", "output"), where)
            out.append(Instruction(str(row["instruction"]).strip(), str(row["output"]).strip()))
    return out


def load_harmless_instructions(split: str = "train", source=None, *, root=None) -> list[str]:
    if split not in ("train", "val", "test"):
        raise ImmunizeError(f"harmless instructions: unknown split {split!r} (train, val, test)")
    rows = load_rows(source, f"benign/harmless_{split}.json", root=root, split=split)
    for i, row in enumerate(rows):
        require(row, ("instruction",), f"{source or f'benign/harmless_{split}.json'}: row {i + 1}")
    return [str(r["instruction"]).strip() for r in rows]


@dataclass(frozen=True)
class ToxicityRow:
    kind: str  # toxic, non_toxic or toxic_test
    prompt: str
    continuation: str
    prompt_toxicity: float | None
    continuation_toxicity: float | None


def load_decodingtrust(source=None, *, root=None) -> list[ToxicityRow]:
    rel = "decodingtrust/training_dataset.jsonl"
    out = []
    for i, row in enumerate(load_rows(source, rel, root=root)):
        where = f"{source or rel}: row {i + 1}"
        require(row, ("type", "prompt", "continuation"), where)
        if row["type"] not in ("toxic", "non_toxic", "toxic_test"):
            raise ImmunizeError(f"{where}: unknown type {row['type']!r}")
        prompt, cont = row["prompt"], row["continuation"]
        if not isinstance(prompt, dict) or not isinstance(cont, dict) or "text" not in prompt or "text" not in cont:
            raise ImmunizeError(f"{where}: 'prompt' and 'continuation' must be objects with a 'text' field")
        out.append(ToxicityRow(row["type"], prompt["text"], cont["text"], prompt.get("toxicity"),
                               cont.get("toxicity")))
    return out


def load_toxicity_prompts(kind: str = "toxic", *, root=None) -> list[ToxicityRow]:
    """RealToxicityPrompts rows with Perspective scores (``toxic`` or ``nontoxic``)."""
    if kind not in ("toxic", "nontoxic"):
        raise ImmunizeError(f"toxicity prompts: unknown kind {kind!r} (toxic, nontoxic)")
    rel = f"decodingtrust/{kind}_prompts.jsonl"
    out = []
    for i, row in enumerate(load_rows(None, rel, root=root)):
        where = f"{rel}: row {i + 1}"
        require(row, ("prompt", "continuation"), where)
        out.append(ToxicityRow(kind, row["prompt"]["text"], row["continuation"]["text"],
                               row["prompt"].get("toxicity"), row["continuation"].get("toxicity")))
    return out


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
        require(row, ("chosen", "rejected"), where)
        prompt, chosen = _split_dialogue(row["chosen"], where)
        prompt_r, rejected = _split_dialogue(row["rejected"], where)
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
    rows = load_rows(None, rel, root=root)
    for i, row in enumerate(rows):
        require(row, ("mr", "ref"), f"{rel}: row {i + 2}")
    return [DataToText(r["mr"].strip(), r["ref"].strip()) for r in rows]
