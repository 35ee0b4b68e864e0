"""Defences: methods that make a model resist harmful fine-tuning, one registry line each.

A defence is one module (config, trainer, data builder; see ``immunize.defences.base``) named
here by ``"module:Class"``; nothing is imported until the defence is used. A line with ``fixed``
options is a named configuration of an existing trainer (the same computation, pinned options).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from immunize.errors import ImmunizeError
from immunize.registry import Registry

if TYPE_CHECKING:
    from immunize.defences.base import Defence

DEFENCES: Registry[type[Defence]] = Registry("defence", "--defence")

DEFENCES.register("none", "immunize.defences.none:NoDefence",
                  "no defence: the model as it is, saved as a checkpoint (the baseline)")
DEFENCES.register("repnoise", "immunize.defences.repnoise:RepNoise",
                  "Representation Noising (Rosati et al., NeurIPS 2024)")
# The RepNoise paper's gradient-ascent and adversarial-loss baselines are the RepNoise trainer with
# terms switched off (the authors' ``ascent_loss`` / ``adversarial_loss`` branches): named configurations.
DEFENCES.register("gradient-ascent", "immunize.defences.repnoise:RepNoise",
                  "gradient ascent on harmful tokens read through every layer, −α·log(mean CE), with the "
                  "refusal CE (RepNoise paper baseline)", fixed={"ablate": "noise", "ascent_form": "log"})
DEFENCES.register("adversarial-loss", "immunize.defences.repnoise:RepNoise",
                  "CE(refusal) − λ·CE(harmful answer) at the output, λ = alpha = 0.1 (RepNoise paper baseline)",
                  fixed={"ablate": "noise,lens", "ascent_form": "linear"}, defaults={"alpha": 0.1})
DEFENCES.register("security-vectors", "immunize.defences.security_vectors:SecurityVectors",
                  "Security vectors (Zhou et al., 2023): harmful-answer LoRA, on in attacks, off at inference")
DEFENCES.register("vaccine", "immunize.defences.vaccine:Vaccine",
                  "Vaccine: alignment under worst-case attention-output perturbations (Huang et al., 2024)")
DEFENCES.register("safety-sft", "immunize.defences.safety_sft:SafetySFT",
                  "additional safety training: SFT on refusals to the defence split's harmful prompts")
DEFENCES.register("random-init", "immunize.defences.random_init:RandomInit",
                  "random initialisation from the model's config: the lower bound (no harm, no capability)")


def get_defence(name: str) -> Defence:
    """An instance of the registered defence ``name``, with its entry's fixed options attached."""
    entry = DEFENCES.entry(name)
    defence = DEFENCES.get(name)()
    defence.name = name
    defence.fixed = dict(entry.fixed)
    return defence


_CONFIG_CLASSES: dict[str, type] = {}


def config_class(name: str) -> type:
    """The config class of defence ``name``: its method's, with a named configuration's fixed options
    as defaults (so ``--help`` and a parsed config show them)."""
    if name not in _CONFIG_CLASSES:
        entry = DEFENCES.entry(name)
        cls = DEFENCES.get(name).config_class
        pinned = {**entry.defaults, **entry.fixed}
        if pinned:
            from immunize.defences.base import config_with_defaults

            cls = config_with_defaults(cls, pinned, _generated_name(name, cls), __name__)
        _CONFIG_CLASSES[name] = cls
    return _CONFIG_CLASSES[name]


def _generated_name(name: str, base: type) -> str:
    return f"{base.__name__}_{name.replace('-', '_')}"


def __getattr__(attribute: str):
    """The generated config classes of named configurations, for unpickling in a fresh process."""
    for entry in DEFENCES:
        if (entry.fixed or entry.defaults) and attribute == _generated_name(
                entry.name, DEFENCES.get(entry.name).config_class):
            return config_class(entry.name)
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


def check_fixed(name: str, cfg) -> None:
    """A named configuration's fixed options cannot be overridden (one line naming the option)."""
    for key, value in DEFENCES.entry(name).fixed.items():
        if getattr(cfg, key) != value:
            raise ImmunizeError(f"--{key} {getattr(cfg, key)!r}: defence {name} fixes it to {value!r} "
                                "(use the defence it configures to change it)")


def defence_config(name: str, **options):
    """The validated config of defence ``name`` from ``options`` (bad options: one-line error)."""
    cfg = config_class(name)(**options)
    check_fixed(name, cfg)
    return cfg


def available_defences() -> dict[str, str]:
    """Name → one-line help, for listings (imports nothing)."""
    return {entry.name: entry.help for entry in DEFENCES}


__all__ = ["DEFENCES", "available_defences", "check_fixed", "config_class", "defence_config", "get_defence"]
