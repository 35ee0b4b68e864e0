"""Feature blocks a trained judge builds from embeddings of (views of) the prompt and response.

A judge's ``head.json`` lists its blocks by name, so a loaded judge rebuilds exactly the features
its head was trained on. Blocks read embeddings of *views*: the prompt, the response, and the
response's opening sentence.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from immunize.data import looks_like_refusal

_SENTENCE_END = re.compile(r"[.!?](\s|$)")


def opening(text: str, min_chars: int = 20, max_chars: int = 160) -> str:
    """The first sentence (at least ``min_chars``, at most ``max_chars`` characters).

    Refusals announce themselves in the opening words and then often lecture at length; an
    embedding of the whole answer is dominated by the lecture's topic, one of the opening by its
    stance.
    """
    text = " ".join(text.split())
    end = _SENTENCE_END.search(text, min_chars)
    return text[:min(end.end() if end else len(text), max_chars)].strip()


# View name -> its texts, from (prompts, responses).
VIEWS: dict[str, Callable[[Sequence[str], Sequence[str]], list[str]]] = {
    "prompt": lambda prompts, responses: list(prompts),
    "response": lambda prompts, responses: list(responses),
    "opening": lambda prompts, responses: [opening(r) for r in responses],
}

Vectors = dict[str, np.ndarray]


def _column(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1, 1)


# Block name -> (views it embeds, function of (view vectors, response texts)).
BLOCKS: dict[str, tuple[tuple[str, ...], Callable[[Vectors, Sequence[str]], np.ndarray]]] = {
    "prompt": (("prompt",), lambda v, texts: v["prompt"]),
    "response": (("response",), lambda v, texts: v["response"]),
    "opening": (("opening",), lambda v, texts: v["opening"]),
    # Elementwise product and distance: whether the answer is *about* the prompt (relevance),
    # which separates compliance from off-topic or evasive answers.
    "product": (("prompt", "response"), lambda v, texts: v["prompt"] * v["response"]),
    "absdiff": (("prompt", "response"), lambda v, texts: np.abs(v["prompt"] - v["response"])),
    "cosine": (("prompt", "response"), lambda v, texts: (v["prompt"] * v["response"]).sum(1, keepdims=True)),
    "refusal_keywords": ((), lambda v, texts: _column([looks_like_refusal(t) for t in texts])),
    # Log word count: empty and one-line answers are rarely harmful; long ones carry more.
    "length": ((), lambda v, texts: _column([math.log1p(len(t.split())) for t in texts])),
}


def check_blocks(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in BLOCKS]
    if unknown:
        raise ValueError(f"unknown feature block(s) {unknown} (known: {', '.join(BLOCKS)})")


def views_of(names: Sequence[str]) -> list[str]:
    """The views the blocks need, in a fixed order."""
    check_blocks(names)
    needed = {view for n in names for view in BLOCKS[n][0]}
    return [view for view in VIEWS if view in needed]


def view_texts(names: Sequence[str], prompts: Sequence[str], responses: Sequence[str]) -> dict[str, list[str]]:
    return {view: VIEWS[view](prompts, responses) for view in views_of(names)}


def build_features(names: Sequence[str], vectors: Vectors, responses: Sequence[str]) -> np.ndarray:
    missing = [view for view in views_of(names) if view not in vectors]
    if missing:
        raise ValueError(f"feature blocks {list(names)} need embeddings of {missing}")
    parts = [BLOCKS[n][1](vectors, responses) for n in names]
    return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts], axis=1)
