"""Evaluations of a (defended, attacked) model: a registry of sections, one result file each.

Sections (``SECTIONS``; ``section_names()`` in report order): harmfulness, overrefusal, toxicity,
capability, perplexity, trainability.
``evaluate(model, tokenizer, config, output_dir)`` runs the selected ones and reuses results whose
key (model fingerprint + judge fingerprints + options + inputs) matches what is on disk.
"""

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
from immunize.evaluation.registry import SECTIONS, Section, SectionResult, get_section, section_names
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
    "resolve_suite",
    "rouge_scores",
    "run_lm_eval",
    "run_section",
    "score_harmfulness",
    "section_names",
    "summarize",
    "summarize_capability",
    "weights_fingerprint",
]
