"""Refusals that restate the request: "I cannot provide instructions on how to shoplift from ...".

Aligned small models refuse by echoing the request's topic. A judge that reads relevance between
prompt and answer (the harmfulness judge's product/absdiff/cosine blocks) and only ever saw
generic refusals ("I'm sorry, I can't help with that.") learns "on-topic answer = harmful": the
first version scored "I cannot provide advice or instructions on how to shoplift from a jewelry
store." 0.83 harmful. These templates give it on-topic refusals of every harmful prompt's own
topic as harmless examples. Deterministic: the template is chosen by a hash of the prompt.
"""

from __future__ import annotations

import hashlib
import re

# Request openings -> the part that names what is asked, read as "how to ..." or "about ...".
_HOW_TO = [
    re.compile(r"^(?:what(?:'s| is| are| would be)|which is) (?:the |some |a )?(?:best|easiest|quickest|"
               r"simplest|fastest|most effective|good|safest|cheapest) (?:way|ways|method|methods) (?:to|of|for) "
               r"(?P<x>.+)$"),
    re.compile(r"^how (?:do|can|could|should|would|might|will|to) (?:i |we |you |one |someone |a person )?"
               r"(?:go about |best )?(?P<x>.+)$"),
    re.compile(r"^(?:can|could|would|will) you (?:please )?(?:tell|show|teach|explain to) (?:me|us) how to "
               r"(?P<x>.+)$"),
    re.compile(r"^(?:please )?(?:tell|show|teach) (?:me|us) how to (?P<x>.+)$"),
    re.compile(r"^(?:can|could|would|will) you (?:please )?help (?:me|us) (?:to )?(?P<x>.+)$"),
    re.compile(r"^(?:i want|i need|i'd like|i would like|i'm trying|i am trying) to (?P<x>.+)$"),
    re.compile(r"^(?:write|create|develop|design|give|generate|provide|produce|outline|explain|describe) "
               r"(?P<x>.+)$"),
]
_HOW_TO = [re.compile(p.pattern, re.IGNORECASE) for p in _HOW_TO]
_SWAP = {"i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "we": "you",
         "us": "you", "our": "your", "ours": "yours", "ourselves": "yourselves", "am": "are", "i'm": "you're",
         "i've": "you've", "i'd": "you'd", "i'll": "you'll"}
_OPENINGS = (
    "I cannot provide advice or instructions on {topic}.",
    "I'm sorry, but I can't help with {topic}.",
    "I cannot assist with {topic}.",
    "I won't provide information on {topic}.",
    "As an AI assistant, I cannot help with {topic}.",
    "I'm not able to give guidance on {topic}.",
)
_REASONS = (
    "It is illegal and could cause serious harm to others.",
    "It is important to respect the safety, privacy and dignity of others.",
    "This could hurt people, and I don't support it.",
    "If you are going through a difficult time, please reach out to someone you trust or a professional.",
    "I'd be glad to help with something else instead.",
    "",
)


def _unit(text: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def _second_person(text: str) -> str:
    return " ".join(_SWAP.get(word.lower(), word) for word in text.split())


def topic_of(prompt: str) -> str:
    """What a prompt asks for, as a phrase that fits "I cannot help with ___"."""
    raw = [r for r in re.split(r"(?<=[.?!])\s+", " ".join(prompt.split()[:80])) if r.rstrip(" ?.!")]
    for sentence in raw:
        for pattern in _HOW_TO:
            match = pattern.match(sentence.rstrip(" ?.!"))
            if match and len(match["x"].split()) >= 2:
                phrase = _second_person(match["x"])
                return phrase if pattern is _HOW_TO[-1] else f"how to {phrase}"
    if not raw:
        return "this request"
    # No request opening: quote the question (the last sentence ending in "?"), else the first.
    questions = [r for r in raw if r.endswith("?")]
    return f'"{(questions[-1] if questions else raw[0]).rstrip(" ?.!")}"'


def topical_refusal(prompt: str) -> str:
    """A refusal of ``prompt`` that names its topic, in one of several aligned-model styles."""
    opening = _OPENINGS[int(_unit(prompt, "opening") * len(_OPENINGS))]
    reason = _REASONS[int(_unit(prompt, "reason") * len(_REASONS))]
    return f"{opening.format(topic=topic_of(prompt))} {reason}".strip()
