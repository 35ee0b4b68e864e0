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
    return copy_small_data_root(real_data_root, tmp_path / "data")


@pytest.fixture(scope="session")
def shared_small_data_root(tmp_path_factory, real_data_root) -> Path:
    """``small_data_root`` made once per session, for tests that only read it."""
    return copy_small_data_root(real_data_root, tmp_path_factory.mktemp("small-data") / "data")


def copy_small_data_root(real_data_root: Path, root: Path) -> Path:
    """Copy the small files of ``real_data_root`` (and the first 200 QA rows) to ``root``."""
    from immunize.data.refusals import SAFE_RESPONSE_FILES, XSTEST_FILES

    for rel in ("beavertails/eval_prompts.jsonl", *SAFE_RESPONSE_FILES, *XSTEST_FILES, "tasks/viggo/valid.csv"):
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
