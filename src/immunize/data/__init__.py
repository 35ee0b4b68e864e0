"""Data: loaders (local path or hub id, same schema), disjoint splits, defence pairs."""

from immunize.data.beavertails import CATEGORIES, EvalPrompt, QARow, load_eval_prompts, load_qa
from immunize.data.corpora import (
    DataToText,
    Instruction,
    PreferencePair,
    ToxicityRow,
    load_benign_answers,
    load_data_to_text,
    load_decodingtrust,
    load_harmless_instructions,
    load_hh_harmless,
    load_toxicity_prompts,
)
from immunize.data.pairs import HarmfulPair, build_pairs, harmful_rows
from immunize.data.refusals import (
    LabelledCompletion,
    RefusalBank,
    load_labelled_completions,
    looks_like_refusal,
)
from immunize.data.splits import (
    BeaverTailsSplits,
    CategorySplit,
    build_splits,
    load_splits,
    normalize_prompt,
    split_of,
)

__all__ = [
    "CATEGORIES",
    "BeaverTailsSplits",
    "CategorySplit",
    "DataToText",
    "EvalPrompt",
    "HarmfulPair",
    "Instruction",
    "LabelledCompletion",
    "PreferencePair",
    "QARow",
    "RefusalBank",
    "ToxicityRow",
    "build_pairs",
    "build_splits",
    "harmful_rows",
    "load_benign_answers",
    "load_data_to_text",
    "load_decodingtrust",
    "load_eval_prompts",
    "load_harmless_instructions",
    "load_hh_harmless",
    "load_labelled_completions",
    "load_qa",
    "load_splits",
    "load_toxicity_prompts",
    "looks_like_refusal",
    "normalize_prompt",
    "split_of",
]
