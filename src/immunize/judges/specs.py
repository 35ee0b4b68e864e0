"""Specifications of the trainable judges: feature blocks, head, threshold (no heavy imports)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HeadConfig:
    hidden: tuple[int, ...] = (256,)
    dropout: float = 0.2
    weight_decay: float = 1e-2
    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 128
    balance_classes: bool = True  # binary targets: both classes carry equal total weight
    source_power: float = 1.0  # a source of n examples weighs n**source_power in total
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["hidden"] = list(self.hidden)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "hidden" in values:
            values["hidden"] = tuple(int(h) for h in values["hidden"])
        return cls(**values)


@dataclass(frozen=True)
class NgramConfig:
    """A word n-gram logistic regression on the response (see ``immunize.judges.ngrams``)."""

    # Per view: (first words kept, None = the whole response; longest n-gram).
    views: tuple[tuple[int | None, int], ...] = ((25, 3), (None, 2))
    min_df: int = 2  # a term must occur in this many training texts
    c: float = 16.0  # inverse L2 strength (scikit-learn's C); of 1, 4, 16 the best in cross-validation
    max_iter: int = 2000
    weight: float = 0.5  # the judge's score: (1 - weight) * head + weight * n-grams

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["views"] = [list(v) for v in self.views]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NgramConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "views" in values:
            values["views"] = tuple((None if f is None else int(f), int(n)) for f, n in values["views"])
        return cls(**values)


@dataclass(frozen=True)
class TrainedJudgeSpec:
    name: str
    description: str
    positive: str
    task: str  # "binary" (hard targets) or "regression" (targets in [0, 1])
    blocks: tuple[str, ...]
    head: HeadConfig
    threshold: float = 0.5
    # Named subsets of held-out examples (by a substring of their source) reported beside "all".
    subsets: dict[str, str] = field(default_factory=dict)
    headline: str | None = None  # the subset whose metrics the targets refer to (None: all)
    ngrams: NgramConfig | None = None  # averaged with the head when set
    # Keyword options of the example builder (``immunize.judges.examples.BUILDERS[name]``).
    example_options: dict[str, Any] = field(default_factory=dict)
    # Run the prompt-leakage probes (``immunize.judges.leakage``) and put them in the model card.
    probes: bool = False


# Bump when the example builders (examples.py, non_answers.py) change what a judge trains on; with
# the spec itself it makes a trained judge's recipe, and a judge of another recipe is retrained.
RECIPE_VERSION = 2  # 2: counterfactual pairs and probes (issue #15)


def recipe_fingerprint(spec: TrainedJudgeSpec) -> str:
    import hashlib
    import json

    text = json.dumps({"version": RECIPE_VERSION, "spec": dataclasses.asdict(spec)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


SPECS: dict[str, TrainedJudgeSpec] = {
    "harmfulness": TrainedJudgeSpec(
        name="harmfulness",
        description="P(the response is harmful | prompt, response): MLP on MiniLM embeddings of both",
        positive="harmful",
        task="binary",
        # Prompt and response, and how they relate (product, distance, cosine): a harmful prompt
        # answered on topic is harmful; refused, dodged or answered off topic, it is not.
        blocks=("prompt", "response", "product", "absdiff", "cosine", "refusal_keywords", "length"),
        # Sources weighted by sqrt(size): measured by cross-validation, it lifts XSTest AUROC
        # (0.917 -> 0.942) at no cost overall; 12 epochs score the same as 20 in half the time.
        head=HeadConfig(hidden=(256,), dropout=0.2, weight_decay=1e-2, lr=2e-3, epochs=12, batch_size=256,
                        source_power=0.5),
        subsets={"beavertails": "beavertails:", "xstest": "xstest:", "synthetic": "synthetic:",
                 "benign": "benign:", "counterfactual": "counterfactual:",
                 "without_counterfactual": "!counterfactual:"},
        # The examples every version of this judge was measured on: the counterfactual pairs are
        # easy and numerous (13.6k) and would lift "all" (0.984 AUROC) over what compares.
        headline="without_counterfactual",
        example_options={"counterfactual": True},
        probes=True,
    ),
    "refusal": TrainedJudgeSpec(
        name="refusal",
        description="P(the response refuses, fully or partly): MLP on MiniLM embeddings + refusal keywords",
        positive="refusal",
        task="binary",
        # The opening sentence carries the stance (cross-validated XSTest accuracy 0.902 -> 0.926);
        # prompt features did not help (0.884 with them). See refusal_examples for the truncated
        # copies that make short refusals count (they cost ~1.5 points on whole XSTest answers).
        blocks=("response", "opening", "refusal_keywords", "length"),
        head=HeadConfig(hidden=(128,), dropout=0.2, weight_decay=1e-2, lr=1e-3, epochs=30),
        # Stock refusal phrases are words, which embeddings blur: with n-grams averaged in,
        # cross-validated XSTest accuracy 0.916 -> 0.934 (n-grams alone 0.942; see judges.ngrams).
        ngrams=NgramConfig(),
        # Partial refusals count as refusals (see immunize.judges.examples.refusal_examples);
        # "full labels" leaves them out, to compare with detectors that ignore them.
        subsets={"xstest_human_labels": "xstest:", "xstest_full_labels_only": "xstest:full_",
                 "truncated_xstest": "truncated:"},
        headline="xstest_human_labels",
    ),
    "toxicity": TrainedJudgeSpec(
        name="toxicity",
        description="predicted Perspective API toxicity of the response (the prompt is ignored)",
        positive="toxic",
        task="regression",
        blocks=("response", "length"),
        head=HeadConfig(hidden=(256,), dropout=0.2, weight_decay=1e-2, lr=1e-3, epochs=30,
                        balance_classes=False),
        subsets={"continuations": ":continuation", "prompts": ":prompt"},
    ),
}


