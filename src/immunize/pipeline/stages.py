"""Stage caching and progress for the pipeline.

A stage's directory is named by a hash of everything it depends on (upstream stage keys, its own
config, data hashes), so a re-run reuses finished stages, an interrupted stage resumes inside its
own directory (trainers resume from their last checkpoint), and changing one knob recomputes only
the stages downstream of it.

In a launched job (``immunize.distributed``) every rank runs a stage's work (training needs them
all; evaluation shares its generation out), or only the main process for ``every_rank=False``
stages; the main process alone writes the marker and prints progress, and no rank starts the next
stage before the marker is written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from immunize.config import fingerprint
from immunize.distributed import from_main, is_main, on_main, wait
from immunize.io import atomic_write_json, read_json
from immunize.redact import redact

STAGE_MARKER = "stage.json"


@dataclass
class Progress:
    """One line per stage with elapsed time and an ETA from the stages run so far."""

    total: int
    stream: Any = field(default_factory=lambda: sys.stdout)
    started: float = field(default_factory=time.perf_counter)
    done: int = 0
    computed_seconds: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    remaining_weight: float = 0.0

    def eta(self) -> str:
        if not self.computed_seconds:
            return "?"
        per_unit = sum(self.computed_seconds) / max(sum(self.weights), 1e-9)
        seconds = per_unit * self.remaining_weight
        return f"{seconds / 60:.1f} min"

    def line(self, text: str) -> None:
        if not is_main():  # one progress display per job
            return
        elapsed = time.perf_counter() - self.started
        print(f"[{self.done}/{self.total} {elapsed / 60:5.1f} min] {text}", file=self.stream, flush=True)


@dataclass
class Stage:
    kind: str  # align, defend, attack, evaluate, analysis ...
    label: str  # human-readable, e.g. "repnoise" or "none@sft-lr3e-05-n256"
    key: dict  # everything the result depends on
    weight: float = 1.0  # rough relative cost, for the ETA

    @property
    def key_hash(self) -> str:
        return fingerprint(self.key, 12)


class StageRunner:
    def __init__(self, root: Path, progress: Progress):
        self.root = root
        self.progress = progress

    def path(self, stage: Stage) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in stage.label)
        return self.root / "stages" / f"{stage.kind}-{safe}-{stage.key_hash}"

    def run(self, stage: Stage, fn: Callable[[Path], dict], *, every_rank: bool = True) -> tuple[Path, dict]:
        """Run ``fn(stage_dir)`` unless the stage already finished; returns (dir, record).

        ``every_rank=False``: only the main process runs ``fn`` (the others get its record)."""
        path = self.path(stage)
        marker = path / STAGE_MARKER
        self.progress.remaining_weight -= stage.weight
        # The main process's marker decides for every rank (one path for all, on any file system).
        if (record := from_main(read_json(marker) if marker.is_file() else None)) is not None:
            self.progress.done += 1
            self.progress.line(f"{stage.kind} {stage.label}: cached ({path.name})")
            return path, record["result"]
        self.progress.line(f"{stage.kind} {stage.label}: running (ETA of the rest {self.progress.eta()})")
        path.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        # Every rank goes on with the main process's record (the one the marker keeps).
        result = from_main(fn(path)) if every_rank else on_main(lambda: fn(path))
        seconds = time.perf_counter() - start
        if is_main():
            atomic_write_json(marker, {"kind": stage.kind, "label": stage.label, "key": redact(stage.key),
                                       "seconds": round(seconds, 2), "result": result})
        wait()
        self.progress.done += 1
        self.progress.computed_seconds.append(seconds)
        self.progress.weights.append(stage.weight)
        self.progress.line(f"{stage.kind} {stage.label}: done in {seconds:.0f} s")
        return path, result
