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

import dataclasses
import typing
from pathlib import Path

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


def _with_defaults(base: type, defaults: dict[str, typing.Any], name: str) -> type:
    """``base`` with other defaults, as a module-level class (Trainer pickles its args into checkpoints)."""
    known = {f.name: f for f in dataclasses.fields(base)}
    types = typing.get_type_hints(base)  # real types: HfArgumentParser reads them from the new class
    fields = [(key, types[key], dataclasses.field(default=value, metadata=known[key].metadata))
              for key, value in defaults.items()]
    cls = dataclasses.make_dataclass(name, fields, bases=(base,))
    cls.__module__ = __name__
    cls.__doc__ = f"{base.__name__} with the alignment stage's defaults: {defaults}."
    return cls


AlignmentConfig = _with_defaults(SafetySFTConfig, ALIGNMENT_DEFAULTS, "AlignmentConfig")


def align(cfg: SafetySFTConfig) -> Path:
    """Run (or skip if complete, or resume) the alignment stage; returns the aligned model's directory."""
    from immunize.method_runner import run_defence

    return run_defence("safety-sft", cfg, kind="alignment")
