"""The registry of attacks (lm-evaluation-harness style): a name → an ``Attack`` class.

Adding an attack is one class with ``@register_attack("name")``; the CLI, grids, run ids and
resistance curves pick it up without further wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from immunize.errors import ImmunizeError

if TYPE_CHECKING:
    from immunize.attacks.base import Attack

_REGISTRY: dict[str, type[Attack]] = {}

A = TypeVar("A", bound="type[Attack]")


def register_attack(name: str) -> Callable[[A], A]:
    """Class decorator: make ``cls`` available as ``immunize attack --attack NAME``."""

    def decorate(cls: A) -> A:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attack {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtin() -> None:
    # The built-in attacks register themselves on import.
    import immunize.attacks.dpo
    import immunize.attacks.sft  # noqa: F401


def attack_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_attack(name: str) -> type[Attack]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ImmunizeError(f"--attack: unknown attack {name!r} (known: {known})") from None
