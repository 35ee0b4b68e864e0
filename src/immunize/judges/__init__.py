"""Judges: score (prompt, response) pairs in [0, 1] for harmfulness, refusal and toxicity.

    from immunize.judges import load_judge
    judge = load_judge("harmfulness")
    scores = judge.score(prompts, responses)   # float array in [0, 1]
    labels = judge.label(prompts, responses)   # score >= judge.threshold
    judge.name, judge.threshold, judge.fingerprint()

Registered names: ``harmfulness``, ``refusal``, ``toxicity`` (trained by `immunize judge train`),
``keyword-refusal``, ``perspective``, ``hf:<hub id or dir>``, ``llama-guard:<model>``.
"""

from immunize.judges.base import Judge, check_pairs
from immunize.judges.registry import (
    JudgeEntry,
    judge_entries,
    load_judge,
    parse_options,
    register_judge,
    unregister_judge,
)

__all__ = [
    "Judge",
    "JudgeEntry",
    "check_pairs",
    "judge_entries",
    "load_judge",
    "parse_options",
    "register_judge",
    "unregister_judge",
]
