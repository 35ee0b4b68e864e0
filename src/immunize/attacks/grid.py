"""Budget grids and stable run ids.

A grid is a mapping of option names to value lists; its runs are the Cartesian product, in the
order the options and values were given. The same grid reads from flags
(``--grid learning_rate=3e-5,6e-5 num_samples=1000,4000``) or YAML
(``grid: {learning_rate: [3e-5, 6e-5], num_samples: [1000, 4000]}``).

A run id reads as its budget and ends in a hash of everything that changes the attack, e.g.
``sft-lr3e-05-n1000-e1-s42-1a2b3c4d``: the same config on the same model weights always gets the
same id (on any machine, under any output root), so a finished run is found and skipped.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from immunize.config import coerce_option, fingerprint, option_kind, option_types
from immunize.errors import ImmunizeError

# Options a grid cannot sweep: they name the sweep itself, its place on disk, or its config class.
_NOT_SWEEPABLE = {"grid", "output_dir", "attack", "config"}

def parse_grid(spec: Mapping[str, Any] | Sequence[str] | None) -> dict[str, list[Any]]:
    """``{"lr": [..]}`` (YAML) or ``["lr=3e-5,6e-5", ...]`` (flags) → ``{name: [raw values]}``."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, str):
        raise ImmunizeError(f"--grid {spec!r}: expected KEY=V1,V2 entries or a YAML mapping")
    else:
        items = []
        for entry in spec:
            if not isinstance(entry, str) or "=" not in entry:
                raise ImmunizeError(f"--grid {entry!r}: expected KEY=V1,V2,... "
                                    "(e.g. learning_rate=3e-5,6e-5)")
            key, _, values = entry.partition("=")
            items.append((key.strip(), [v.strip() for v in values.split(",")]))
    grid: dict[str, list[Any]] = {}
    for key, values in items:
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if key in grid:
            raise ImmunizeError(f"--grid: {key!r} given twice")
        if not values or any(v == "" for v in values):
            raise ImmunizeError(f"--grid {key}: empty value list")
        grid[key] = values
    return grid


def coerce(cls: type, name: str, raw: Any) -> Any:
    """A grid value (a flag's text, or a YAML scalar) as the option's type (``immunize.config``'s rules)."""
    hint = option_types(cls)[name]
    optional, kind = option_kind(hint)
    if typing.get_origin(kind) in (list, tuple, dict) or kind in (list, tuple, dict):
        raise ImmunizeError(f"--grid {name}: list- and dict-valued options cannot be swept")
    if optional and isinstance(raw, str) and raw.lower() in ("none", "null", "all"):
        return None  # num_samples=1000,all: every sample
    return coerce_option(hint, raw, f"--grid {name}")


def expand_grid(cfg: Any) -> list[tuple[dict[str, Any], Any]]:
    """``[(point, config)]``: one config per grid point (just ``cfg`` when there is no grid)."""
    grid = parse_grid(cfg.grid)
    cls = type(cfg)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in grid:
        if key not in names:
            raise ImmunizeError(f"--grid: unknown option {key!r} for attack {cfg.attack!r}")
        if key in _NOT_SWEEPABLE:
            raise ImmunizeError(f"--grid: {key!r} cannot be swept")
    typed = {key: [coerce(cls, key, v) for v in values] for key, values in grid.items()}
    points = [dict(zip(typed, combo, strict=True)) for combo in itertools.product(*typed.values())]
    seen: set[str] = set()
    out = []
    for point in points:
        key = repr(sorted(point.items()))
        if key in seen:
            raise ImmunizeError(f"--grid: the point {point} appears twice (a repeated value)")
        seen.add(key)
        out.append((point, dataclasses.replace(cfg, grid=None, **point)))
    return out


def identity(cfg: Any) -> dict[str, Any]:
    """What changes an attack (the run id hashes it): the one rule of ``immunize.method_runner``."""
    from immunize.method_runner import config_identity

    return config_identity(cfg)


def run_id(cfg: Any, model_fingerprint: str) -> str:
    """``{attack}[-lora]-lr{lr}-n{samples}-{e{epochs}|steps{max_steps}}-s{seed}-{hash8}``."""
    budget = f"steps{cfg.max_steps}" if cfg.max_steps and cfg.max_steps > 0 else f"e{cfg.num_train_epochs:g}"
    samples = "all" if cfg.num_samples is None else str(cfg.num_samples)
    from immunize.method_runner import data_identity, processes

    # The data by content too: a finished run is skipped by its id alone.
    digest = fingerprint({"attack": identity(cfg), "model": model_fingerprint, "data": data_identity(cfg),
                          **processes(cfg)}, length=8)
    lora = "-lora" if cfg.use_lora else ""
    return f"{cfg.attack}{lora}-lr{cfg.learning_rate:g}-n{samples}-{budget}-s{cfg.seed}-{digest}"
