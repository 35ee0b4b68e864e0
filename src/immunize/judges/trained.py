"""The judges that `immunize judge train` builds: a small head on frozen sentence embeddings.

Each lives in ``<cache>/judges/<name>/``: ``head.safetensors`` (weights), ``head.json`` (feature
blocks, architecture, threshold, encoder identity), ``model_card.json`` and ``README.md`` (data
hashes, counts, held-out metrics), and for a judge whose spec adds one, an n-gram model
(``ngrams.json``, ``ngrams.safetensors``) whose score is averaged with the head's. Loading takes
a second or two: the encoder, then a tiny head.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from immunize.errors import ImmunizeError
from immunize.io import read_json
from immunize.judges.base import Judge
from immunize.judges.encoders import EmbeddingCache, TextEncoder, embed_texts, make_encoder
from immunize.judges.features import build_features, check_blocks, view_texts
from immunize.judges.heads import WEIGHTS_FILE, load_head
from immunize.judges.ngrams import JSON_FILE as NGRAM_JSON
from immunize.judges.ngrams import WEIGHTS_FILE as NGRAM_WEIGHTS
from immunize.judges.ngrams import NgramModel
from immunize.paths import cache_dir

FORMAT_VERSION = 1
META_FILE = "head.json"
CARD_FILE = "model_card.json"


def embed_views(encoder: TextEncoder, views: dict[str, list[str]], *, cache: EmbeddingCache | None = None,
                progress=None) -> dict[str, np.ndarray]:
    """Embed every view in one pass, so a text shared by views (or rows) is encoded once."""
    names = list(views)
    flat = [text for name in names for text in views[name]]
    vectors = embed_texts(encoder, flat, cache=cache, progress=progress)
    out, start = {}, 0
    for name in names:
        out[name] = vectors[start:start + len(views[name])]
        start += len(views[name])
    return out


def ensemble(head_scores: np.ndarray, ngram_scores: np.ndarray, weight: float) -> np.ndarray:
    """A judge's score when it has an n-gram model beside its head: the weighted mean of the two."""
    return (1.0 - weight) * np.asarray(head_scores) + weight * np.asarray(ngram_scores)


def features_of(blocks, encoder: TextEncoder, prompts: list[str], responses: list[str], *,
                cache: EmbeddingCache | None = None, progress=None) -> np.ndarray:
    """The feature matrix of ``blocks`` for (prompt, response) pairs: what a trained head reads."""
    views = embed_views(encoder, view_texts(blocks, prompts, responses), cache=cache, progress=progress)
    return build_features(blocks, views, responses)


def predict(head, ngrams: NgramModel | None, weight: float | None, features: np.ndarray,
            responses: list[str]) -> np.ndarray:
    """A trained judge's scores: its head's, averaged with its n-gram model's when it has one."""
    scores = head.predict(features)
    return scores if ngrams is None else ensemble(scores, ngrams.predict(responses), weight)


def judge_files(directory: Path) -> list[Path]:
    """The files a trained judge scores with (its head, and its n-gram model when it has one)."""
    files = [directory / WEIGHTS_FILE, directory / META_FILE]
    if (directory / NGRAM_JSON).is_file():
        files += [directory / NGRAM_JSON, directory / NGRAM_WEIGHTS]
    return files


def judges_dir() -> Path:
    return cache_dir() / "judges"


def judge_dir(name: str, root: str | Path | None = None) -> Path:
    return (Path(root) if root is not None else judges_dir()) / name


def read_card(name: str, root: str | Path | None = None) -> dict[str, Any] | None:
    path = judge_dir(name, root) / CARD_FILE
    return read_json(path) if path.is_file() else None


def trained_state(root: str | Path | None = None) -> dict[str, str | None]:
    """Per trainable judge: a hash of its head's files (None when not trained), without loading it.

    Cached pipeline stages that scored with a judge key on this, so retraining the judges
    recomputes what they judged instead of reusing scores from the old heads.
    """
    from immunize.judges.specs import SPECS

    state: dict[str, str | None] = {}
    for name in SPECS:
        directory = judge_dir(name, root)
        files = judge_files(directory)
        if all(f.is_file() for f in files):
            digest = hashlib.sha256()
            for f in files:
                digest.update(f.read_bytes())
            state[name] = digest.hexdigest()[:16]
        else:
            state[name] = None
    return state


def outdated(name: str, root: str | Path | None = None) -> str | None:
    """Why the trained judge ``name`` can no longer be loaded, or None (it can, or it is not trained).

    A head is only valid on the encoder it was trained on; after an upgrade that changes the
    encoder's identity (or the file format), the run retrains it up front instead of failing at its
    first evaluation.
    """
    meta_path = judge_dir(name, root) / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = read_json(meta_path)
        if meta.get("format_version") != FORMAT_VERSION:
            return f"format version {meta.get('format_version')} is not {FORMAT_VERSION}"
        wanted = meta["encoder"]
        current = make_encoder(wanted["name"]).identity
    except (ImmunizeError, AttributeError, KeyError, TypeError, ValueError) as err:
        return f"cannot check {meta_path} ({err})"
    if current != wanted["identity"]:
        return f"trained on encoder {wanted['identity']}, the current one is {current}"
    from immunize.judges.specs import SPECS, recipe_fingerprint

    # A judge trained on other examples (say, before the counterfactual pairs) scores differently:
    # keeping it would keep its flaws under a new version's name.
    if name in SPECS and meta.get("recipe") != recipe_fingerprint(SPECS[name]):
        return "trained by an earlier recipe (examples or head settings have changed since)"
    return None


class TrainedJudge(Judge):
    """A head trained by `immunize judge train`, on top of the encoder it was trained with."""

    def __init__(self, directory: str | Path, *, encoder: TextEncoder | None = None,
                 device: str | None = None, batch_size: int = 64, threshold: float | None = None):
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise ImmunizeError(f"judge {directory.name!r} is not trained yet (no {meta_path}); "
                                f"run `immunize judge train --judges {directory.name}`")
        meta = read_json(meta_path)
        try:
            if meta.get("format_version") != FORMAT_VERSION:
                raise ImmunizeError(f"{meta_path}: format version {meta.get('format_version')} is not "
                                    f"{FORMAT_VERSION}; re-run `immunize judge train --judges "
                                    f"{directory.name}`")
            self.name = str(meta["name"])
            self.positive = str(meta["positive"])
            self.threshold = float(meta["threshold"] if threshold is None else threshold)
            self.blocks = tuple(meta["blocks"])
            check_blocks(self.blocks)
            wanted = meta["encoder"]
            self.ngrams_weight = float(meta["ngrams_weight"]) if "ngrams_weight" in meta else None
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ImmunizeError(f"{meta_path}: malformed ({err}); re-run `immunize judge train`") from None
        self.encoder = encoder or make_encoder(wanted["name"], device=device, batch_size=batch_size)
        if self.encoder.identity != wanted["identity"]:
            raise ImmunizeError(
                f"judge {self.name!r} was trained on encoder {wanted['identity']} but "
                f"{self.encoder.identity} was given; re-run `immunize judge train --judges {self.name}`")
        self.head = load_head(directory, meta["head"])
        self.ngrams = NgramModel.load(directory) if self.ngrams_weight is not None else None
        # Load the encoder's weights now: a missing package or device fails at load_judge, and the
        # first score() call is not the slow one.
        self.encoder.load()
        self.directory = directory
        self.meta = meta
        digest = hashlib.sha256()
        for path in judge_files(directory):
            if path.name != META_FILE:
                digest.update(path.read_bytes())
        digest.update(json.dumps(meta, sort_keys=True).encode())
        digest.update(self.encoder.identity.encode())
        self._fingerprint = digest.hexdigest()[:16]

    def features(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return features_of(self.blocks, self.encoder, prompts, responses)

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return predict(self.head, self.ngrams, self.ngrams_weight, self.features(prompts, responses), responses)

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "encoder": self.encoder.identity, "directory": str(self.directory)}


def load_trained(name: str, *, root: str | Path | None = None, encoder: TextEncoder | None = None,
                 device: str | None = None, batch_size: int = 64, threshold: float | None = None) -> TrainedJudge:
    """The trained judge ``name`` from ``root`` (default: the cache); its options are checked by name."""
    return TrainedJudge(judge_dir(name, root), encoder=encoder, device=device, batch_size=batch_size,
                        threshold=threshold)
