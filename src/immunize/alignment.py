"""Safety alignment: the ``safety-sft`` defence applied to the base model, with its own defaults.

The RepNoise and Immunization papers defend models that already refuse (Llama-2-chat). SmolLM2
barely refuses, so this stage first fine-tunes it on harmful prompts of the defence split, each
answered by a refusal of that very question, mixed with benign instructions and their answers (so
it learns to refuse harm without refusing everything): the "aligned base" every defence then
starts from. The refusals are the base model's own answers when told to refuse (``instructed``),
kept when the refusal judge says they refuse, and templated refusals that restate the request
(``topical``) for the rest: the base's plain answers (``own``, the defences' default) are mostly
no refusals at all, and a bank text written for another question teaches refusing the wrong
thing. Generating costs about 0.75 s per prompt on a 2-core CPU (SmolLM2, 64 tokens, batches of
16, loading and judging included: 49 s for 64 prompts, measured in recipes/repnoise_ablations.yaml),
so about 3 minutes for the 256 prompts here, once per base model (cached); ``--refusals topical``
skips it.

It is the same computation and data builder as the ``safety-sft`` defence
(``immunize.defences.safety_sft``), run by the same method runner, so it honours
``held_out_categories`` like every defence; only the defaults in ``ALIGNMENT_DEFAULTS`` differ.
"""

from __future__ import annotations

import typing
from pathlib import Path

from immunize.defences.base import config_with_defaults
from immunize.defences.safety_sft import SafetySFTConfig

# Where the alignment stage departs from the safety-sft defence's (paper) defaults: a fixed,
# smaller mix of refusals and benign answers, a higher learning rate for a model that starts
# far from refusing, and refusals it is told to give (its own are mostly no refusals).
ALIGNMENT_DEFAULTS: dict[str, typing.Any] = {
    "num_harmful": 256,
    "num_benign": 256,
    "learning_rate": 5e-5,
    "refusals": "instructed",
    "refusal_fallback": "topical",
    "output_dir": "runs/align",
}


AlignmentConfig = config_with_defaults(SafetySFTConfig, ALIGNMENT_DEFAULTS, "AlignmentConfig", __name__)


def align(cfg: SafetySFTConfig) -> Path:
    """Run (or skip if complete, or resume) the alignment stage; returns the aligned model's directory."""
    from immunize.method_runner import run_defence

    return run_defence("safety-sft", cfg, kind="alignment")
