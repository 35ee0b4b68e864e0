"""Configuration: dataclasses whose fields are both CLI flags and YAML keys.

``parse_config`` builds an argument parser from one or more dataclasses (a
``TrainingArguments`` subclass works too), reads ``--config file.yaml`` if given, and lets
flags override the file. Unknown YAML keys are an error naming the key and the file, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from immunize.errors import ImmunizeError
from immunize.io import atomic_write_json, atomic_write_text
from immunize.paths import _PROJECT_ROOT


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImmunizeError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ImmunizeError(f"{path}{where}: malformed YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ImmunizeError(f"{path}: a config file must be a mapping of option names to values")
    return data


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

    parser = HfArgumentParser(list(types), prog=prog, description=description)
    parser.add_argument("--config", help="YAML file whose keys are this command's options; flags override it")
    if values is None and known.config:
        values, source = load_yaml(known.config), known.config
    if values:
        allowed = {f.name for t in types for f in dataclasses.fields(t) if f.init}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ImmunizeError(f"{source}: unknown option(s) {', '.join(unknown)} for `{prog}`")
        parser.set_defaults(**_comma_lists(types, values))
    try:
        parsed = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)
    except (ValueError, TypeError) as err:
        raise ImmunizeError(f"{prog}: invalid option value: {err}") from None
    # HfArgumentParser appends the namespace of extra arguments (our --config) last.
    return tuple(p for p in parsed if dataclasses.is_dataclass(p))


def _comma_lists(types: Sequence[type], values: dict[str, Any]) -> dict[str, Any]:
    """YAML lists given to comma-list text options (``ablate: [noise, ascent]``) as that text."""
    import typing

    hints: dict[str, Any] = {}
    for t in types:
        hints.update(typing.get_type_hints(t))
    return {key: ",".join(str(v) for v in value)
            if hints.get(key) is str and isinstance(value, list)
            and all(isinstance(v, (str, int, float)) for v in value) else value
            for key, value in values.items()}


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


def write_provenance(out_dir: str | Path, configs: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write ``config.yaml`` (the resolved config) and ``provenance.json`` next to a run's outputs."""
    out_dir = Path(out_dir)
    resolved = {name: config_to_dict(cfg) for name, cfg in configs.items()}
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(json.loads(json.dumps(resolved, default=str)),
                                                               sort_keys=False))
    atomic_write_json(
        out_dir / "provenance.json",
        {
            "command": sys.argv,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_revision": git_revision(),
            "versions": package_versions(),
            "config_fingerprint": fingerprint(resolved),
            **(extra or {}),
        },
    )
