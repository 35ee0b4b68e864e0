"""One lazy registry type for every family of plug-ins: defences, attacks, judges, encoders, sections.

As in lm-evaluation-harness, an entry is registered by one line that names its target as
``"module:attribute"``; nothing is imported until the entry is first used, so ``immunize --help``
and listing names stay instant. An entry may carry *fixed options*: a named configuration of an
existing method (e.g. ``gradient-ascent`` is the RepNoise trainer with its noise term off), which
the method's config receives and a user may not override; and *defaults* of its own, which a user may.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from immunize.errors import ImmunizeError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    target: str  # "package.module:Attribute"
    help: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)  # options this named configuration pins
    defaults: dict[str, Any] = field(default_factory=dict)  # its own defaults (a user may override them)
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific facts known without importing

    def load(self) -> T:
        module, _, attribute = self.target.partition(":")
        if not attribute:
            raise ValueError(f"registry target {self.target!r} must read 'module:attribute'")
        return getattr(importlib.import_module(module), attribute)


class Registry(Generic[T]):
    """Names → lazily imported targets. ``kind`` names the family in error messages ("defence")."""

    def __init__(self, kind: str, flag: str):
        self.kind, self.flag = kind, flag
        self._entries: dict[str, Entry[T]] = {}
        self._loaded: dict[str, T] = {}

    def register(self, name: str, target: str, help: str = "", *, fixed: dict[str, Any] | None = None,
                 defaults: dict[str, Any] | None = None, **extra: Any) -> None:
        entry = Entry(name, target, help, dict(fixed or {}), dict(defaults or {}), extra)
        if name in self._entries and self._entries[name] != entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def register_object(self, name: str, obj: T, help: str = "", **extra: Any) -> None:
        """Register an already-imported object (plug-ins defined in user code and tests)."""
        self._entries[name] = Entry(name, f"<object {obj!r}>", help, {}, {}, extra)
        self._loaded[name] = obj

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
        self._loaded.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[name] for name in self.names())

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise ImmunizeError(f"{self.flag} {name!r}: unknown {self.kind} (known: {', '.join(self.names())})")
        return self._entries[name]

    def get(self, name: str) -> T:
        entry = self.entry(name)
        if name not in self._loaded:
            self._loaded[name] = entry.load()
        return self._loaded[name]


__all__ = ["Entry", "Registry"]
