"""Evaluations of a (defended, attacked) model: a registry of sections, one result file each.

Sections (``SECTIONS``): harmfulness, overrefusal, toxicity, capability, perplexity, trainability.
``evaluate(model, tokenizer, config, output_dir)`` runs the selected ones and reuses results whose
key (model fingerprint + judge fingerprints + options + inputs) matches what is on disk.
"""

# Importing the section modules registers them.
from immunize.evaluation import capability as _capability  # noqa: F401
from immunize.evaluation import harmfulness as _harmfulness  # noqa: F401
from immunize.evaluation import perplexity as _perplexity  # noqa: F401
from immunize.evaluation import refusal as _refusal  # noqa: F401
from immunize.evaluation import toxicity as _toxicity  # noqa: F401
from immunize.evaluation import trainability as _trainability  # noqa: F401
from immunize.evaluation.capability import run_lm_eval, summarize_capability
from immunize.evaluation.config import SUITES, EvaluationConfig, resolve_suite
from immunize.evaluation.harmfulness import (
    HarmfulnessStepScorer,
    HarmfulPrompt,
    evaluate_harmfulness,
    load_harmful_prompts,
    score_harmfulness,
)
from immunize.evaluation.perplexity import answer_nll
from immunize.evaluation.registry import SECTIONS, Section, SectionResult, get_section, register_section
from immunize.evaluation.results import SCHEMA, SCHEMA_VERSION
from immunize.evaluation.runner import EvaluationContext, evaluate, run_section, weights_fingerprint
from immunize.evaluation.stats import bootstrap_ci, ratio_bootstrap_ci, summarize
from immunize.evaluation.trainability import finetune_and_score, rouge_scores

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "SECTIONS",
    "SUITES",
    "EvaluationConfig",
    "EvaluationContext",
    "HarmfulPrompt",
    "HarmfulnessStepScorer",
    "Section",
    "SectionResult",
    "answer_nll",
    "bootstrap_ci",
    "evaluate",
    "evaluate_harmfulness",
    "finetune_and_score",
    "get_section",
    "load_harmful_prompts",
    "ratio_bootstrap_ci",
    "register_section",
    "resolve_suite",
    "rouge_scores",
    "run_lm_eval",
    "run_section",
    "score_harmfulness",
    "summarize",
    "summarize_capability",
    "weights_fingerprint",
]
