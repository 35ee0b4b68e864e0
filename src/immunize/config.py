"""Configuration: dataclasses whose fields are both CLI flags and YAML keys.

``parse_config`` builds an argument parser from one or more dataclasses (a
``TrainingArguments`` subclass works too), reads ``--config file.yaml`` if given, and lets
flags override the file. Unknown YAML keys are an error naming the key and the file, so a typo
never silently falls back to a default. YAML values are typed by ``coerce_option`` (the one rule
for command files, recipe entries and grids) and every parsed config goes through
``check_numbers`` (finite floats, positive learning rates).
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import functools
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from immunize.errors import ImmunizeError
from immunize.io import atomic_write_json, atomic_write_text, read_text
from immunize.paths import _PROJECT_ROOT
from immunize.redact import redact, redact_argv


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ImmunizeError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(read_text(path))  # read_text: bytes that are not UTF-8 name their offset
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ImmunizeError(f"{path}{where}: malformed YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ImmunizeError(f"{path}: a config file must be a mapping of option names to values")
    return data


def positional(argv: list[str], option: str) -> list[str]:
    """``COMMAND VALUE [options]`` as ``COMMAND --option VALUE [options]``: a first argument that is
    not a flag names the one thing the command works on (a run directory, a labels file)."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv = [f"--{option}", argv[0], *argv[1:]]
    return argv


def parse_config(types: Sequence[type], argv: Sequence[str] | None, *, prog: str, description: str = "",
                 values: dict[str, Any] | None = None, source: str | None = None):
    """Parse ``argv`` into one instance per dataclass in ``types`` (YAML first, flags override).

    ``values`` (read from the file ``source`` by the caller) replace reading ``--config`` here, for
    commands that take part of a recipe apart first (``immunize run``'s method entries).
    """
    # Imported here: transformers is slow to import and `immunize --help` should stay instant.
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)

    class Parser(HfArgumentParser):
        def error(self, message):  # one line naming the flag, not argparse's usage screen and exit
            raise ImmunizeError(f"{self.prog}: {message}")

    parser = Parser(list(types), prog=prog, description=description)
    parser.add_argument("--config", help="YAML file whose keys are this command's options; flags override it")
    if values is None and known.config:
        values, source = load_yaml(known.config), known.config
    if values:
        hints = {name: hint for t in types for name, hint in option_types(t).items()}
        allowed = {f.name for t in types for f in dataclasses.fields(t) if f.init}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ImmunizeError(f"{source}: unknown option(s) {', '.join(unknown)} for `{prog}`")
        # Typed before they become defaults: argparse converts only text defaults, and only as one value.
        parser.set_defaults(**{key: coerce_option(hints[key], value, f"{source}: --{key}")
                               for key, value in values.items()})
    try:
        parsed = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)
    except (ValueError, TypeError) as err:
        raise ImmunizeError(f"{prog}: invalid option value: {err}") from None
    # HfArgumentParser appends the namespace of extra arguments (our --config) last.
    configs = tuple(p for p in parsed if dataclasses.is_dataclass(p))
    for cfg in configs:
        check_numbers(cfg)
    return configs


# ---- option values: YAML (and flag text) to the types of the config fields ------------------------

# A YAML string means what the same text means as a flag; for booleans that is HfArgumentParser's
# reading (transformers.hf_argparser.string_to_bool).
_BOOLEANS = {"true": True, "t": True, "yes": True, "y": True, "1": True,
             "false": False, "f": False, "no": False, "n": False, "0": False}
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
_EXPECTED_LIST = {bool: "a list of true/false values", int: "a list of integers", float: "a list of numbers",
                  str: "a list of text values"}
# ``Annotated[list[str] | None, MAPPING_TOO]``: the option also takes a YAML mapping (an attack grid).
MAPPING_TOO = "a mapping is also accepted"


@functools.cache
def option_types(cls: type) -> dict[str, Any]:
    """Each field's type hint (resolved once per class: slow on ``TrainingArguments``)."""
    return typing.get_type_hints(cls, include_extras=True)


def coerce_option(hint: Any, value: Any, flag: str) -> Any:
    """``value`` (from YAML, or a flag's text) as an option of type ``hint``; else a one-line error.

    Only what is unambiguous: text read as the same flag text would be (``"8e-5"`` → 8e-05, ``"3"``
    → 3, ``"no"`` → False), a whole number as an int (64.0 → 64), an int as a float, a number as
    text, a scalar as a one-item list, a list of scalars as a comma list for text options
    (``ablate: [noise, ascent]``). Types read by nobody here (enums, unions of several types, dicts)
    are left to the parser and the config's own checks.
    """
    if typing.get_origin(hint) is typing.Annotated and MAPPING_TOO in hint.__metadata__ and isinstance(value, Mapping):
        return value
    optional, kind = option_kind(hint)
    if value is None:
        if optional or (kind not in _EXPECTED and not _is_list(kind)):
            return None
        raise ImmunizeError(f"{flag}: expected {_EXPECTED.get(kind, 'a list')}, got null")
    if _is_list(kind):
        item = (typing.get_args(kind) or (None,))[0]
        items = value if isinstance(value, list) else [value]
        if item not in _EXPECTED:
            return items
        try:
            return [_scalar(item, v) for v in items]
        except ValueError:
            raise ImmunizeError(f"{flag}: expected {_EXPECTED_LIST[item]}, got {value!r}") from None
    if kind is str and isinstance(value, list) and all(_is_plain(v) for v in value):
        return ",".join(str(v) for v in value)
    if kind in _EXPECTED:
        try:
            return _scalar(kind, value)
        except ValueError:
            raise ImmunizeError(f"{flag}: expected {_EXPECTED[kind]}, got {value!r}") from None
    if isinstance(value, (list, dict)) and not _holds_containers(hint):
        raise ImmunizeError(f"{flag}: expected a single value, got {value!r}")
    return value


def option_kind(hint: Any) -> tuple[bool, Any]:
    """(whether None is allowed, the one other type: ``None`` when the union holds several)."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        others = [a for a in args if a is not type(None)]
        return type(None) in args, others[0] if len(others) == 1 else None
    return False, hint


def _is_list(kind: Any) -> bool:
    return kind is list or typing.get_origin(kind) is list


def _holds_containers(hint: Any) -> bool:
    return hint in (list, tuple, dict) or typing.get_origin(hint) in (list, tuple, dict) or any(
        _holds_containers(a) for a in typing.get_args(hint))


def _is_plain(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _scalar(kind: type, value: Any) -> Any:
    """One value as ``kind`` (bool, int, float or str); ``ValueError`` where that would be a guess."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _BOOLEANS:
            return _BOOLEANS[str(value).strip().lower()]
        raise ValueError(value)
    if not _is_plain(value):  # True is an int to Python; never a number or a name here
        raise ValueError(value)
    if kind is str:
        return str(value)
    if isinstance(value, str):
        value = _number(value)
    if kind is float:
        return float(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    raise ValueError(value)


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def check_numbers(cfg: Any) -> None:
    """Every float option finite, every learning rate positive, else a one-line error.

    NaN passes every range check (``nan < 0`` is false), so a config's own checks let it through;
    a learning rate of 0 trains nothing, yet the run completes and is reported as if it had.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name, None)
        if not f.init or isinstance(value, bool):
            continue
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ImmunizeError(f"--{f.name} {_shown(value)}: must be a finite number")
        if f.name.endswith("learning_rate") and isinstance(value, (int, float)) and value <= 0:
            raise ImmunizeError(f"--{f.name} {_shown(value)}: must be positive")


def check_at_least(cfg: Any, minimum: int, *names: str) -> None:
    """Each named option (unless unset) is at least ``minimum``, else a one-line error naming it."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ImmunizeError(f"--{name} {_shown(value)}: must be at least {minimum}")


def _shown(value: Any) -> str:
    """A value as a flag would give it: ``0``, ``nan``, ``8e-05``, ``1 nan`` for a list."""
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dataclasses.asdict(cfg)


def fingerprint(obj: Any, length: int = 16) -> str:
    """A stable short hash of any JSON-serializable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


_TRACKED_PACKAGES = (
    "immunize", "torch", "transformers", "accelerate", "peft", "trl", "datasets",
    "lm_eval", "sentence-transformers", "numpy",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(root: Path = _PROJECT_ROOT) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("-dirty" if dirty else "")


# The command being run, as the user typed it: ``immunize.cli.main`` sets it for the duration of one
# command, so a command called in-process (tests, notebooks) records its own argv, not the host's.
COMMAND: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("immunize_command", default=None)


def write_provenance(out_dir: str | Path, configs: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write ``config.yaml`` (the resolved config) and ``provenance.json`` next to a run's outputs,
    secret-like option values masked in both (``immunize.redact``)."""
    out_dir = Path(out_dir)
    resolved = redact({name: config_to_dict(cfg) for name, cfg in configs.items()})
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(json.loads(json.dumps(resolved, default=str)),
                                                               sort_keys=False))
    atomic_write_json(
        out_dir / "provenance.json",
        {
            "command": redact_argv(COMMAND.get() or sys.argv),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_revision": git_revision(),
            "versions": package_versions(),
            "config_fingerprint": fingerprint(resolved),
            **redact(extra or {}),
        },
    )
