"""Shared fixtures. Offline mode is set before anything imports transformers."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import shutil
from pathlib import Path

import pytest

from immunize.paths import data_root as _data_root

REAL_DATA = _data_root(must_exist=False)


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"data root {REAL_DATA} not present")
    return REAL_DATA


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("IMMUNIZE_CACHE", str(cache))
    return cache


@pytest.fixture
def small_data_root(tmp_path, real_data_root) -> Path:
    """A writable copy of the small files of the data root (for malformed-input tests)."""
    root = tmp_path / "data"
    for rel in ("beavertails/eval_prompts.jsonl", "refusals/adv_training_behaviors_safe_responses.csv",
                "tasks/viggo/valid.csv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real_data_root / rel, root / rel)
    qa = (real_data_root / "beavertails/qa.jsonl").read_text().splitlines()[:200]
    (root / "beavertails/qa.jsonl").write_text("\n".join(qa) + "\n")
    manifest = json.loads((real_data_root / "MANIFEST.json").read_text())
    (root / "MANIFEST.json").write_text(json.dumps({k: v for k, v in manifest.items()
                                                    if (root / k).is_file()}))
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from immunize.testing import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread; with two on a loaded 2-core machine they can stall."""
    import torch

    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
