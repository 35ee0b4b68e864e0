"""The judge registry: small named judges, loaded by name (``load_judge("harmfulness")``).

A name is either exact (``harmfulness``, ``refusal``, ``toxicity``, ``keyword-refusal``,
``perspective``) or a prefix followed by a model (``hf:<hub id or dir>``,
``llama-guard:<model>``). Options are keyword arguments, checked against what the judge accepts.
Heavy imports happen inside the factories, so importing the registry stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from immunize.errors import ImmunizeError
from immunize.judges.base import Judge


@dataclass(frozen=True)
class JudgeEntry:
    name: str  # exact name, or a prefix ending in ":"
    description: str
    factory: Callable[..., Judge]  # factory(argument_after_prefix_or_None, **options)
    options: Callable[[], Callable[..., Any]]  # what the options are checked against (lazy import)
    trained: bool = False  # built by `immunize judge train`

    @property
    def is_prefix(self) -> bool:
        return self.name.endswith(":")


_REGISTRY: dict[str, JudgeEntry] = {}


def register_judge(name: str, description: str, factory: Callable[..., Judge], *,
                   options: Callable[[], Callable[..., Any]] | None = None, trained: bool = False) -> None:
    """Add a judge (or, with a name ending in ':', a family of judges) to the registry."""
    _REGISTRY[name] = JudgeEntry(name, description, factory, options or (lambda: factory), trained)


def unregister_judge(name: str) -> None:
    _REGISTRY.pop(name, None)


def judge_entries() -> list[JudgeEntry]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _entry(spec: str) -> tuple[JudgeEntry, str | None]:
    if spec in _REGISTRY and not spec.endswith(":"):
        return _REGISTRY[spec], None
    prefix, sep, rest = spec.partition(":")
    if sep and f"{prefix}:" in _REGISTRY:
        return _REGISTRY[f"{prefix}:"], rest
    known = ", ".join(e.name + ("<model>" if e.is_prefix else "") for e in judge_entries())
    raise ImmunizeError(f"--judge: unknown judge {spec!r} (known: {known})")


def _check_options(spec: str, target: Callable[..., Any], options: dict[str, Any]) -> None:
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ImmunizeError(f"judge {spec}: unknown option(s) {', '.join(unknown)} "
                            f"(accepted: {', '.join(sorted(accepted)) or 'none'})")


def load_judge(spec: str, **options: Any) -> Judge:
    """The judge named ``spec``, configured by ``options`` (see `immunize judge list`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ImmunizeError("--judge: give a judge name (see `immunize judge list`)")
    entry, argument = _entry(spec.strip())
    if entry.is_prefix and not argument:
        raise ImmunizeError(f"--judge {spec}: name a model after {entry.name!r}, e.g. {entry.name}owner/name")
    _check_options(spec, entry.options(), options)
    return entry.factory(argument, **options)


def parse_options(items: Sequence[str], flag: str = "--judge-option") -> dict[str, Any]:
    """``["key=value", ...]`` → options; values are read as YAML scalars (1, 0.5, true, text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ImmunizeError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


# ---- the built-in judges -------------------------------------------------------------------------

def _trained(name: str) -> Callable[..., Judge]:
    def factory(_: str | None, *, root=None, encoder=None, device: str | None = None, batch_size: int = 64,
                threshold: float | None = None) -> Judge:
        from immunize.judges.trained import load_trained

        return load_trained(name, root=root, encoder=encoder, device=device, batch_size=batch_size,
                            threshold=threshold)

    return factory


def _register_lazy(name: str, description: str, module: str, class_name: str, *, takes_model: bool) -> None:
    """Register a judge class that is imported on first use; its signature gives the options."""

    def judge_class() -> type:
        return getattr(importlib.import_module(module), class_name)

    def factory(model: str | None, **options: Any) -> Judge:
        return judge_class()(model or "", **options) if takes_model else judge_class()(**options)

    register_judge(name, description, factory, options=judge_class)


def _register_builtins() -> None:
    from immunize.judges.specs import SPECS

    for spec in SPECS.values():
        register_judge(spec.name, spec.description, _trained(spec.name), trained=True)

    _register_lazy("keyword-refusal",
                   "refusal phrases in the first 200 characters (immunize.data.looks_like_refusal)",
                   "immunize.judges.keyword", "KeywordRefusalJudge", takes_model=False)
    _register_lazy("perspective",
                   "Perspective API TOXICITY of the response (needs $PERSPECTIVE_API_KEY and network)",
                   "immunize.judges.perspective", "PerspectiveJudge", takes_model=False)
    _register_lazy("hf:", "a Hugging Face sequence classifier; score = P(harmful label)",
                   "immunize.judges.hf", "HFClassifierJudge", takes_model=True)
    _register_lazy("llama-guard:",
                   "a Llama-Guard-style generative judge; score = P('unsafe') at the first token",
                   "immunize.judges.llama_guard", "LlamaGuardJudge", takes_model=True)


_register_builtins()
