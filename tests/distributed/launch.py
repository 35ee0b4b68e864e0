"""Launching the distributed tests' jobs: ``worker.py`` on one process or under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TIMEOUT = 600  # a hung collective fails the test instead of the suite


def launch(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, str(HERE / "worker.py")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            str(HERE / "worker.py")]


def base_env(write_log: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "IMMUNIZE_WRITE_LOG": str(write_log)}


def run_jobs(jobs: dict[str, tuple[int, list[str], dict[str, str]]], logs: Path) -> None:
    """Start every job, wait for all; fail with the tail of the log of one that did not end well."""
    running = {}
    for name, (ranks, argv, env) in jobs.items():
        log = (logs / f"{name}.log").open("w")
        running[name] = (log, subprocess.Popen([*launch(ranks), *argv], env=env, stdout=log,
                                               stderr=subprocess.STDOUT))
    failed = []
    for name, (log, process) in running.items():
        try:
            code = process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "timeout"
        log.close()
        if code != 0:
            tail = "\n".join((logs / f"{name}.log").read_text().splitlines()[-30:])
            failed.append(f"job {name} ended with {code}:\n{tail}")
    if failed:
        pytest.fail("\n\n".join(failed))
