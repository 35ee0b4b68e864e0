"""Defences: a registry of methods that make a model resist harmful fine-tuning.

lm-evaluation-harness style: each defence module registers itself with ``@register_defence``,
naming its config dataclass (whose fields are the CLI flags and YAML keys of
``immunize defend --defence NAME``) and a ``run(config) -> Path`` that writes a standard
safetensors checkpoint to ``config.output_dir``. Adding a baseline touches only its own module
and the ``BUILTIN`` list below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from immunize.errors import ImmunizeError

# Modules imported on first lookup (they import torch/transformers; `immunize --help` must not).
BUILTIN: tuple[str, ...] = ("immunize.defences.none", "immunize.defences.repnoise")


@dataclass(frozen=True)
class Defence:
    name: str
    help: str
    config_class: type
    run: Callable[[object], Path]


_REGISTRY: dict[str, Defence] = {}
_loaded = False


def register_defence(name: str, config_class: type, help: str):
    """Class/function decorator: ``@register_defence("repnoise", RepNoiseConfig, "...")`` on ``run``."""

    def decorator(run: Callable[[object], Path]):
        if name in _REGISTRY and _REGISTRY[name].run is not run:
            raise ValueError(f"defence {name!r} is registered twice")
        _REGISTRY[name] = Defence(name=name, help=help, config_class=config_class, run=run)
        return run

    return decorator


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in BUILTIN:
            importlib.import_module(module)
        _loaded = True


def available_defences() -> dict[str, Defence]:
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def get_defence(name: str) -> Defence:
    defences = available_defences()
    if name not in defences:
        raise ImmunizeError(f"--defence {name!r}: unknown defence (known: {', '.join(defences)})")
    return defences[name]


__all__ = ["BUILTIN", "Defence", "available_defences", "get_defence", "register_defence"]
