"""Where immunize reads data and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

from immunize.errors import ImmunizeError

# src/immunize/paths.py -> the project root is three levels up (editable installs and checkouts).
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """``$IMMUNIZE_CACHE``, else ``$XDG_CACHE_HOME/immunize``, else ``~/.cache/immunize``."""
    if env := os.environ.get("IMMUNIZE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "immunize"


DATA_SUFFIXES = (".jsonl", ".json", ".csv")


def _holds_data(path: Path) -> bool:
    """An empty directory (a mount not yet filled, a wrong folder) fails here, naming itself, not
    later as a missing file or an empty table. Stops at the first file found."""
    if (path / "MANIFEST.json").is_file():
        return True
    return any(p.suffix in DATA_SUFFIXES and p.is_file() for p in path.rglob("*"))


def data_root(override: str | Path | None = None, *, must_exist: bool = True) -> Path:
    """Resolve the local data root: the flag, then ``$IMMUNIZE_DATA``, then ``../shared/data``."""
    candidates: list[tuple[str, Path]] = []
    if override:
        candidates.append(("--data-root", Path(override).expanduser()))
    elif env := os.environ.get("IMMUNIZE_DATA"):
        candidates.append(("$IMMUNIZE_DATA", Path(env).expanduser()))
    else:
        candidates.append(("project default", _PROJECT_ROOT.parent / "shared" / "data"))
        candidates.append(("working directory", Path.cwd().parent / "shared" / "data"))
    for origin, path in candidates:
        if path.is_dir():
            if must_exist and not _holds_data(path):
                raise ImmunizeError(f"data root {path} ({origin}): holds no MANIFEST.json and no data files "
                                    f"({', '.join(DATA_SUFFIXES)})")
            return path.resolve()
    if not must_exist:
        return candidates[0][1]
    tried = "; ".join(f"{origin}: {path}" for origin, path in candidates)
    raise ImmunizeError(f"data root not found (tried {tried}); pass --data-root or set $IMMUNIZE_DATA")
