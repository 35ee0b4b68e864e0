"""The judge registry: small named judges, loaded by name (``load_judge("harmfulness")``).

A name is either exact (``harmfulness``, ``refusal``, ``toxicity``, ``keyword-refusal``,
``perspective``) or a prefix followed by a model (``hf:<hub id or dir>``,
``llama-guard:<model>``). Each built-in is one ``JUDGES.register`` line naming its class (or
factory) as ``"module:attribute"``, imported on first use, so listing judges stays cheap. A judge
is built as ``target(**options)``, or ``target(model, **options)`` for a prefix family; options are
checked against the target's keyword-only parameters. The trained judges are ``load_trained`` with
their name fixed, one per specification in ``immunize.judges.specs``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from immunize.errors import ImmunizeError
from immunize.judges.base import Judge
from immunize.judges.specs import SPECS
from immunize.registry import Entry, Registry

JUDGES: Registry[Callable[..., Judge]] = Registry("judge", "--judge")

for _spec in SPECS.values():
    JUDGES.register(_spec.name, "immunize.judges.trained:load_trained", _spec.description,
                    fixed={"name": _spec.name}, trained=True)
JUDGES.register("keyword-refusal", "immunize.judges.keyword:KeywordRefusalJudge",
                "refusal phrases in the first 200 characters (immunize.data.looks_like_refusal)")
JUDGES.register("perspective", "immunize.judges.perspective:PerspectiveJudge",
                "Perspective API TOXICITY of the response (needs $PERSPECTIVE_API_KEY and network)")
JUDGES.register("hf:", "immunize.judges.hf:HFClassifierJudge",
                "a Hugging Face sequence classifier; score = P(harmful label)")
JUDGES.register("llama-guard:", "immunize.judges.llama_guard:LlamaGuardJudge",
                "a Llama-Guard-style generative judge; score = P('unsafe') at the first token")


@dataclass(frozen=True)
class JudgeEntry:
    """A registered judge as listings see it (nothing imported)."""

    name: str  # exact name, or a prefix ending in ":"
    description: str
    trained: bool = False  # built by `immunize judge train`

    @property
    def is_prefix(self) -> bool:
        return self.name.endswith(":")


def register_judge(name: str, description: str, judge: Callable[..., Judge], *, trained: bool = False) -> None:
    """Add a judge class or factory (or, with a name ending in ':', a family of judges taking a model)."""
    JUDGES.register_object(name, judge, description, trained=trained)


def unregister_judge(name: str) -> None:
    JUDGES.unregister(name)


def _view(entry: Entry) -> JudgeEntry:
    return JudgeEntry(entry.name, entry.help, bool(entry.extra.get("trained")))


def judge_entries() -> list[JudgeEntry]:
    return [_view(entry) for entry in JUDGES]


def find_judge(spec: Any, flag: str = "--judge") -> tuple[Entry, str | None]:
    """The entry of ``spec`` and, for a prefix family, the model named after the prefix; an unknown
    name is a one-line error naming ``flag`` (nothing is imported, so configs check names early)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ImmunizeError(f"{flag}: give a judge name (see `immunize judge list`)")
    spec = spec.strip()
    if spec in JUDGES and not spec.endswith(":"):
        return JUDGES.entry(spec), None
    prefix, sep, rest = spec.partition(":")
    if sep and f"{prefix}:" in JUDGES:
        if not rest:
            raise ImmunizeError(f"{flag} {spec}: name a model after {prefix + ':'!r}, e.g. {prefix}:owner/name")
        return JUDGES.entry(f"{prefix}:"), rest
    known = ", ".join(e.name + ("<model>" if e.is_prefix else "") for e in judge_entries())
    raise ImmunizeError(f"{flag} {spec!r}: unknown judge (known: {known})")


def _check_options(spec: str, target: Callable[..., Any], fixed: dict[str, Any], options: dict[str, Any]) -> None:
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} - set(fixed)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ImmunizeError(f"judge {spec}: unknown option(s) {', '.join(unknown)} "
                            f"(accepted: {', '.join(sorted(accepted)) or 'none'})")


def load_judge(spec: str, **options: Any) -> Judge:
    """The judge named ``spec``, configured by ``options`` (see `immunize judge list`)."""
    entry, model = find_judge(spec)
    target = JUDGES.get(entry.name)
    _check_options(spec, target, entry.fixed, options)
    if model is None:
        return target(**entry.fixed, **options)
    return target(model, **entry.fixed, **options)


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
