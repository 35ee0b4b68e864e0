"""Training examples for the trained judges, built from the data root.

Every example carries a ``group``: the prompt whose hash (``immunize.data.splits.prompt_position``)
puts it in a cross-validation fold, so no prompt is ever on both sides of a held-out evaluation.
Synthetic pairs (a refusal or an unrelated benign answer given to a harmful prompt) draw their
answer only from texts whose own prompt lies in the same fold, so no answer text leaks either.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from immunize.data import (
    load_benign_answers,
    load_decodingtrust,
    load_labelled_completions,
    load_qa,
    load_toxicity_prompts,
    looks_like_refusal,
)
from immunize.data.beavertails import QA_FILE
from immunize.data.corpora import first_turns
from immunize.data.readers import read_table, require
from immunize.data.refusals import SAFE_RESPONSE_FILES, XSTEST_FILES
from immunize.data.splits import normalize_prompt, prompt_position
from immunize.errors import ImmunizeError
from immunize.io import file_sha256
from immunize.judges.features import opening
from immunize.judges.topical_refusals import topical_refusal
from immunize.paths import data_root

BENIGN_FILES = {"alpaca_eval": "benign/alpaca_eval.json", "benign_alpaca": "benign/BenignAlpaca.jsonl",
                "benign_saferlhf": "benign/BenignSafeRLHF.jsonl"}
HARMFUL_ANSWERS_FILE = "harmful_prompts/HarmfulSafeRLHF-100.jsonl"
ADVBENCH_FILE = "harmful_prompts/advbench_behaviors.csv"
TOXICITY_FILES = ("decodingtrust/toxic_prompts.jsonl", "decodingtrust/nontoxic_prompts.jsonl",
                  "decodingtrust/training_dataset.jsonl")
EMPTY_ANSWERS = ("", " ", "\n", "...")
TRUNCATE_WORDS = 60
# The harmfulness judge trains on the BeaverTails prompts whose hash falls in this share (with every
# answer to them and their synthetic non-answers). Embedding the long BeaverTails answers was most of
# a cold judge build, which the README's first run pays for; with half of them (~5k harmful answers)
# the cross-validated AUROC is 0.970 instead of 0.976 (accuracy 92.2% instead of 93.6%), built in
# 169 s instead of 378 s on 2 cores (together with the encoder's cut at 64 word pieces).
HARMFULNESS_QA_SHARE = 0.5


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    target: float  # 1 = the judge's positive (harmful, refusal, toxic); in [0, 1] for regression
    source: str
    group: str  # the prompt that decides the example's fold


@dataclass
class ExampleSet:
    examples: list[Example]
    files: dict[str, str] = field(default_factory=dict)  # data-root-relative path -> sha256

    def counts(self) -> dict[str, dict[str, float]]:
        """Per source: number of examples and the mean target (the positive rate)."""
        n: Counter[str] = Counter()
        total: Counter[str] = Counter()
        for ex in self.examples:
            n[ex.source] += 1
            total[ex.source] += ex.target
        return {s: {"n": n[s], "mean_target": round(total[s] / n[s], 4)} for s in sorted(n)}


def in_trained_share(prompt: str) -> bool:
    """Whether the harmfulness judge trains on this BeaverTails prompt (``HARMFULNESS_QA_SHARE`` of
    them, by a hash of the normalized prompt: two spellings of one question fall on the same side)."""
    return stable_unit(normalize_prompt(prompt), "harmfulness-qa") < HARMFULNESS_QA_SHARE


def fold_of(group: str, folds: int) -> int:
    return min(int(prompt_position(group) * folds), folds - 1)


def stable_unit(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by the text: deterministic choices that do not depend on order."""
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


class FoldPool:
    """Answer texts indexed by the fold of the prompt they were written for."""

    def __init__(self, items: list[tuple[str, str]], folds: int):
        self.by_fold: dict[int, list[str]] = {}
        for origin, text in sorted(set(items)):
            self.by_fold.setdefault(fold_of(origin, folds), []).append(text)

    def draw(self, prompt: str, folds: int, salt: str) -> str | None:
        texts = self.by_fold.get(fold_of(prompt, folds))
        if not texts:
            return None
        return texts[int(stable_unit(prompt, salt) * len(texts))]


def _hashes(root: Path, rels) -> dict[str, str]:
    return {rel: file_sha256(root / rel) for rel in sorted(rels)}


def harmful_answer_pairs(root: Path) -> list[tuple[str, str]]:
    out = []
    for i, row in enumerate(read_table(root / HARMFUL_ANSWERS_FILE)):
        where = f"{HARMFUL_ANSWERS_FILE}: row {i + 1}"
        user, answer = first_turns(row, where)
        if not user or not answer:
            raise ImmunizeError(f"{where}: needs a user and an assistant message")
        out.append((user.strip(), answer.strip()))
    return out


def advbench_prompts(root: Path) -> list[str]:
    rows = read_table(root / ADVBENCH_FILE)
    for i, row in enumerate(rows):
        require(row, ("Behavior",), f"{ADVBENCH_FILE}: row {i + 2}")
    return [row["Behavior"].strip() for row in rows if row["Behavior"].strip()]


def _refusal_pool_items(root: Path) -> list[tuple[str, str]]:
    """(prompt it answered, refusal text): human-labelled XSTest refusals and hand-written ones."""
    items = [(c.prompt, c.completion) for c in load_labelled_completions(root) if c.label == "2_full_refusal"]
    for rel in SAFE_RESPONSE_FILES:
        for i, row in enumerate(read_table(root / rel)):
            require(row, ("Behavior", "Safe_Response"), f"{rel}: row {i + 2}")
            items.append((row["Behavior"].strip(), row["Safe_Response"].strip()))
    # A few "refusals" open by complying; a refusal example must read as one on its own.
    return [(p, t) for p, t in items if t and looks_like_refusal(t)]


def harmfulness_examples(root: str | Path | None = None, *, folds: int = 5, counterfactual: bool = True,
                         ) -> ExampleSet:
    """P(harmful | prompt, response).

    Harmful: BeaverTails ``is_safe=false`` answers, the HarmfulSafeRLHF-100 answers, XSTest full
    compliance with unsafe (``contrast_*``) prompts. Safe: BeaverTails ``is_safe=true``, benign
    instruction→answer pairs, every XSTest answer to a safe prompt and every refusal of an unsafe
    one, and four kinds of non-answers to harmful prompts (BeaverTails and AdvBench): a real
    refusal, a templated refusal that names the prompt's topic (see ``topical_refusals``), an
    unrelated benign answer (off-topic), an empty answer. Each harmful prompt gets one of the four,
    chosen by its hash (30% / 30% / 27% / 13%). XSTest partial refusals of unsafe prompts are left
    out: they refuse and comply at once, so neither label is right. BeaverTails enters through the
    ``HARMFULNESS_QA_SHARE`` of its prompts picked by hash.

    With ``counterfactual`` (see ``counterfactual_examples``) the prompt stops predicting the label:
    the same hand-written non-answers under many harmful prompts are safe, and harmful answers
    moved under innocuous prompts are harmful.
    """
    root = data_root(root)
    examples: list[Example] = []
    qa = [row for row in load_qa(root=root) if in_trained_share(row.prompt)]
    for row in qa:
        examples.append(Example(row.prompt, row.response, 0.0 if row.is_safe else 1.0,
                                "beavertails:safe" if row.is_safe else "beavertails:unsafe", row.prompt))
    harmful_answers = harmful_answer_pairs(root)
    for prompt, answer in harmful_answers:
        examples.append(Example(prompt, answer, 1.0, "harmful-safe-rlhf-100", prompt))
    benign_items = []
    for name in BENIGN_FILES:
        for item in load_benign_answers(name, root=root):
            if item.output:
                examples.append(Example(item.instruction, item.output, 0.0, f"benign:{name}",
                                        item.instruction))
                benign_items.append((item.instruction, item.output))
    for c in load_labelled_completions(root):
        unsafe_prompt = c.prompt_type.startswith("contrast")
        if unsafe_prompt and c.label == "3_partial_refusal":
            continue
        harmful = unsafe_prompt and c.label == "1_full_compliance"
        kind = "unsafe-prompt" if unsafe_prompt else "safe-prompt"
        examples.append(Example(c.prompt, c.completion, float(harmful), f"xstest:{kind}:{c.label[2:]}",
                                c.prompt))

    refusals = FoldPool(_refusal_pool_items(root), folds)
    off_topic = FoldPool(benign_items, folds)
    harmful_prompts = sorted({r.prompt for r in qa if not r.is_safe} | set(advbench_prompts(root)))
    for prompt in harmful_prompts:
        u = stable_unit(prompt, "harmfulness-synthetic")
        if u < 0.3:
            answer, source = refusals.draw(prompt, folds, "refusal"), "synthetic:refusal"
        elif u < 0.6:
            answer, source = topical_refusal(prompt), "synthetic:topical-refusal"
        elif u < 0.87:
            answer, source = off_topic.draw(prompt, folds, "off-topic"), "synthetic:off-topic"
        else:
            answer = EMPTY_ANSWERS[int(stable_unit(prompt, "empty") * len(EMPTY_ANSWERS))]
            source = "synthetic:empty"
        if answer is not None:
            examples.append(Example(prompt, answer, 0.0, source, prompt))
    if counterfactual:
        unsafe = [(r.prompt, r.response) for r in qa if not r.is_safe] + harmful_answers
        instructions = FoldPool([(instruction, instruction) for instruction, _ in benign_items], folds)
        examples += counterfactual_examples([*harmful_prompts, *(p for p, _ in harmful_answers)], unsafe,
                                            instructions, folds)
    # The leakage probe's answers are measured as never seen: a data row that happens to be one
    # ("No." is a BeaverTails answer, labelled unsafe) is left out of training.
    from immunize.judges.leakage import probe_answer_keys
    from immunize.judges.non_answers import plain_text

    probes = probe_answer_keys()
    examples = [ex for ex in examples if plain_text(ex.response) not in probes]
    files = [QA_FILE, HARMFUL_ANSWERS_FILE, ADVBENCH_FILE, *BENIGN_FILES.values(), *XSTEST_FILES,
             *SAFE_RESPONSE_FILES]
    return ExampleSet(examples, _hashes(root, files))


COUNTERFACTUAL_NON_ANSWERS = 3  # per harmful prompt
COUNTERFACTUAL_MOVED_SHARE = 0.25  # of the harmful answers, moved under an innocuous prompt


def counterfactual_examples(harmful_prompts: list[str], harmful_answers: list[tuple[str, str]],
                            benign: FoldPool, folds: int) -> list[Example]:
    """Pairs in which the prompt says nothing about the label.

    BeaverTails answers offensive prompts mostly harmfully, so a judge that reads the prompt learns
    the prompt's offensiveness as a prior: the first version scored "I don't know." 0.57 on average
    under harmful prompts of other benchmarks. Here every harmful prompt also gets
    ``COUNTERFACTUAL_NON_ANSWERS`` non-answers from the training half of
    ``immunize.judges.leakage.NON_ANSWERS`` (safe), and a hashed share of the harmful answers is
    moved under a benign instruction of the same fold (harmful: the harm is in the answer). The
    other half of the non-answers is kept for the leakage probe.
    """
    from immunize.judges.leakage import non_answers
    from immunize.judges.non_answers import generated_non_answers

    by_kind: dict[str, list[str]] = {}
    for kind, text in [*non_answers("train"), *generated_non_answers()]:
        by_kind.setdefault(kind, []).append(text)
    kinds = sorted(by_kind)

    def non_answer(prompt: str, k: int) -> str:
        # The kind first, so the 500-odd templated refusals do not crowd out the other kinds.
        texts = by_kind[kinds[int(stable_unit(f"{prompt}\0{k}", "counterfactual-kind") * len(kinds))]]
        return texts[int(stable_unit(f"{prompt}\0{k}", "counterfactual-text") * len(texts))]

    out = []
    for prompt in sorted(set(harmful_prompts)):
        for answer in sorted({non_answer(prompt, k) for k in range(COUNTERFACTUAL_NON_ANSWERS)}):
            out.append(Example(prompt, answer, 0.0, "counterfactual:non-answer", prompt))
    for origin, answer in sorted(set(harmful_answers)):
        if stable_unit(answer, "counterfactual-moved") >= COUNTERFACTUAL_MOVED_SHARE:
            continue
        prompt = benign.draw(origin, folds, "counterfactual-moved")
        if prompt is not None:
            # The group stays the answer's own prompt: its fold holds both the answer and the instruction.
            out.append(Example(prompt, answer, 1.0, "counterfactual:harmful-under-benign-prompt", origin))
    return out


def refusal_examples(root: str | Path | None = None, *, folds: int = 5) -> ExampleSet:
    """Does the response refuse? XSTest human labels: full and partial refusal → 1, compliance → 0.

    A partial refusal ("I can't help with that. That said, here is ...") counts as a refusal, as
    in XSTest's own refusal rates: the model declined at least in part, which is what over-refusal
    and refusal-rate metrics count; whether it then leaked harm is the harmfulness judge's call.

    XSTest's answers are long, but evaluations generate short or cut-off answers (RepNoise: 50
    tokens) and small models refuse in one sentence. Trained on whole XSTest answers only, the
    judge scored "I'm sorry, but I can't help with that." 0.42; so every XSTest answer also
    enters cut to its first 60 words, and every full refusal as its opening sentence, with its
    human label and its prompt's fold (partial refusals only whole: cut short, a partial refusal
    may keep only its compliant part). Hand-written refusals add positives; benign and
    BeaverTails answers add compliant negatives in other styles than XSTest's three models.
    """
    root = data_root(root)
    examples = []
    for c in load_labelled_completions(root):
        label, refused = c.label[2:], float(c.label != "1_full_compliance")
        examples.append(Example(c.prompt, c.completion, refused, f"xstest:{label}", c.prompt))
        if label == "partial_refusal":
            # Cut short, a partial refusal may keep only its compliant part: the label would lie.
            continue
        cut = " ".join(c.completion.split()[:TRUNCATE_WORDS])
        if cut != " ".join(c.completion.split()):
            examples.append(Example(c.prompt, cut, refused, f"truncated:first-{TRUNCATE_WORDS}-words:{label}",
                                    c.prompt))
        first = opening(c.completion)
        if refused and first != " ".join(c.completion.split()):
            examples.append(Example(c.prompt, first, refused, f"truncated:opening:{label}", c.prompt))
    for rel in SAFE_RESPONSE_FILES:
        for i, row in enumerate(read_table(root / rel)):
            require(row, ("Behavior", "Safe_Response"), f"{rel}: row {i + 2}")
            if looks_like_refusal(row["Safe_Response"]):
                examples.append(Example(row["Behavior"].strip(), row["Safe_Response"].strip(), 1.0,
                                        "handwritten-refusal", row["Behavior"].strip()))
    for name in ("benign_alpaca", "benign_saferlhf"):
        for item in load_benign_answers(name, root=root):
            if item.output:
                examples.append(Example(item.instruction, item.output, 0.0, f"benign:{name}",
                                        item.instruction))
    # BeaverTails unsafe answers comply by definition; a hashed 10% keeps them from dominating.
    # Small aligned models refuse in one sentence that restates the request; a hashed 5% of the
    # harmful prompts get such a refusal (see immunize.judges.topical_refusals).
    qa = load_qa(root=root)
    for row in qa:
        if not row.is_safe and stable_unit(row.response, "refusal-negatives") < 0.1:
            examples.append(Example(row.prompt, row.response, 0.0, "beavertails:unsafe", row.prompt))
    for prompt in sorted({row.prompt for row in qa if not row.is_safe}):
        if stable_unit(prompt, "refusal-topical") < 0.05:
            examples.append(Example(prompt, topical_refusal(prompt), 1.0, "synthetic:topical-refusal", prompt))
    files = [*XSTEST_FILES, *SAFE_RESPONSE_FILES, BENIGN_FILES["benign_alpaca"],
             BENIGN_FILES["benign_saferlhf"], QA_FILE]
    return ExampleSet(examples, _hashes(root, files))


def toxicity_examples(root: str | Path | None = None, *, folds: int = 5) -> ExampleSet:
    """Texts with their Perspective API toxicity: RealToxicityPrompts prompts and continuations.

    Both halves of a row are scored texts; both are used, grouped by the row's prompt. Each
    distinct text is kept once (DecodingTrust's training rows repeat RealToxicityPrompts ones).
    """
    root = data_root(root)
    rows = [*load_toxicity_prompts("toxic", root=root), *load_toxicity_prompts("nontoxic", root=root),
            *load_decodingtrust(root=root)]
    seen: set[str] = set()
    examples = []
    for row in rows:
        for part, text, score in (("prompt", row.prompt, row.prompt_toxicity),
                                  ("continuation", row.continuation, row.continuation_toxicity)):
            if score is None or not text.strip() or text in seen:
                continue
            seen.add(text)
            corpus = "realtoxicityprompts" if row.kind in ("toxic", "nontoxic") else "decodingtrust"
            source = f"{corpus}:{part}"
            examples.append(Example("", text, float(score), source, row.prompt))
    return ExampleSet(examples, _hashes(root, TOXICITY_FILES))


BUILDERS: dict[str, Callable[..., ExampleSet]] = {
    "harmfulness": harmfulness_examples,
    "refusal": refusal_examples,
    "toxicity": toxicity_examples,
}
