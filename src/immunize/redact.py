"""Secrets never reach a file: wherever a command line or a config is recorded (``provenance.json``,
``config.yaml``, ``results.json``, model cards, stage markers) the values of secret-like options are
replaced by ``<redacted>``.

An option is secret-like when its name (the last part of a dotted recipe flag such as
``--attacks.sft.hub_token``) holds ``password``, ``passwd``, ``secret``, ``credential(s)`` or
``apikey``, ends in ``_key`` (``api_key``, ``access_key``; a bare ``key`` is a cache key in our
records), or ends in ``token`` (``hub_token``, ``auth_token``, ``token``). The tokenizer's special
tokens (``pad_token``, ``eos_token`` …) are settings, not secrets, and stay readable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "<redacted>"

_SECRET_WORDS = frozenset({"password", "passwd", "secret", "credential", "credentials", "apikey"})
# transformers' SPECIAL_TOKENS_ATTRIBUTES (bos_token, eos_token, ...): text the tokenizer inserts.
_SPECIAL_TOKENS = frozenset({"pad", "bos", "eos", "unk", "sep", "cls", "mask"})


def is_secret(name: str) -> bool:
    """Whether an option or field called ``name`` (``--hub_token``, ``api-key``, ``a.b.password``) holds a secret."""
    words = name.lstrip("-").rsplit(".", 1)[-1].lower().replace("-", "_").split("_")
    if _SECRET_WORDS & set(words):
        return True
    if words[-1] == "key":
        return len(words) > 1
    if words[-1] == "token":
        return len(words) == 1 or words[-2] not in _SPECIAL_TOKENS
    return False


def redact_argv(argv: Iterable[Any]) -> list[str]:
    """``argv`` with the value of every secret-like option masked, in all three spellings:
    ``--hub_token VALUE``, ``--hub_token=VALUE`` and ``KEY=VALUE`` items (``--judge_option api_key=...``)."""
    out: list[str] = []
    hide_next = False
    for arg in map(str, argv):
        if hide_next and not arg.startswith("--"):
            out.append(REDACTED)
            hide_next = False
            continue
        name, sep, _ = arg.partition("=")
        if sep and is_secret(name):
            out.append(f"{name}={REDACTED}")
            hide_next = False
        else:
            out.append(arg)
            hide_next = arg.startswith("-") and not sep and is_secret(arg)
    return out


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (mappings and lists, to any depth) with secret-like fields' text masked.

    Only text is masked: a secret is text, while numbers under such names are measurements
    (``nll_per_token``) that a report needs."""
    if isinstance(obj, Mapping):
        return {key: REDACTED if is_secret(str(key)) and isinstance(value, str) and value else redact(value)
                for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(value) for value in obj]
    return obj
