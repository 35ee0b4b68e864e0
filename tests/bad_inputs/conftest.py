"""The shape every bad-input case shares: run a command in-process (``immunize.cli.main``), expect
exit status 2, exactly one line on stderr naming the file, row or option at fault, and nothing
written where the command would have written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from immunize.cli import main


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``roots`` with its size and mtime (directories: size 0)."""
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                stat = path.lstat()
                out[str(path)] = (0 if path.is_dir() else stat.st_size, stat.st_mtime_ns)
    return out


class Fails:
    """``fails(argv, "needle", untouched=[dir])``: the command exits 2 with one line holding the needle."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, argv: list[str], *needles: str, untouched: list[Path] = (), status: int = 2) -> str:
        before = snapshot(*untouched)
        self.capsys.readouterr()
        code = main([str(a) for a in argv])
        err = self.capsys.readouterr().err.strip()
        assert code == status, f"exit {code}, expected {status}; stderr: {err!r}"
        assert err and "\n" not in err, f"expected one line on stderr, got {err!r}"
        assert "Traceback" not in err
        for needle in needles:
            assert needle in err, f"{needle!r} not in {err!r}"
        after = snapshot(*untouched)
        added = sorted(set(after) - set(before))
        changed = sorted(p for p in set(before) & set(after) if before[p] != after[p] and not Path(p).is_dir())
        assert not added and not changed, f"written despite the error: {added + changed}"
        return err


@pytest.fixture
def fails(capsys) -> Fails:
    return Fails(capsys)
