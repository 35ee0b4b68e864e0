"""Safety alignment: the ``safety-sft`` defence applied to the base model, with its own defaults.

The RepNoise and Immunization papers defend models that already refuse (Llama-2-chat). SmolLM2
barely refuses, so this stage first fine-tunes it on harmful prompts of the defence split answered
by real refusals, mixed with benign instructions and their answers (so it learns to refuse harm
without refusing everything): the "aligned base" every defence then starts from. It is the same
computation and data builder as the ``safety-sft`` defence (``immunize.defences.safety_sft``),
run by the same method runner, so it honours ``held_out_categories`` like every defence; only the
defaults in ``ALIGNMENT_DEFAULTS`` differ.
"""

from __future__ import annotations

import typing
from pathlib import Path

from immunize.defences.base import config_with_defaults
from immunize.defences.safety_sft import SafetySFTConfig

# Where the alignment stage departs from the safety-sft defence's (paper) defaults: a fixed,
# smaller mix of refusals and benign answers, and a higher learning rate for a model that starts
# far from refusing.
ALIGNMENT_DEFAULTS: dict[str, typing.Any] = {
    "num_harmful": 256,
    "num_benign": 256,
    "learning_rate": 5e-5,
    "output_dir": "runs/align",
}


AlignmentConfig = config_with_defaults(SafetySFTConfig, ALIGNMENT_DEFAULTS, "AlignmentConfig", __name__)


def align(cfg: SafetySFTConfig) -> Path:
    """Run (or skip if complete, or resume) the alignment stage; returns the aligned model's directory."""
    from immunize.method_runner import run_defence

    return run_defence("safety-sft", cfg, kind="alignment")
