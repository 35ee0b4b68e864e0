"""Refusals of harmful prompts that answer the question asked: the refusal half of every pair.

Each prompt gets its refusal from the source ``--refusals`` names; the prompts it gives nothing go
through ``--refusal_fallback``, a comma list tried in order:

- ``own``: the model's own greedy answer to the plain question (the training prompt format, no
  instruction), kept when the refusal judge says it refuses by the evaluation's refusal-gate rule
  (``immunize.judges.gate``: its opening scores at least ``--refusal_threshold``, 0.9, and no later
  window complies, so a refusal followed by help is not kept). The RepNoise paper's construction
  for defences, which start from an aligned model: the stability term keeps refusals the model
  already gives, on the pair's own topic.
- ``instructed``: its greedy answer when the question follows an instruction to refuse
  (``INSTRUCTION``), kept when the judge says it refuses; for the alignment stage, whose base
  barely refuses on its own. The judge reads the answer against the plain question.
- ``topical``: a templated refusal that restates the request (``immunize.judges.topical_refusals``);
  on-topic, needs no model, settles every prompt.
- ``bank``: a human-written refusal of *another* unsafe request (``RefusalBank``), drawn by hash;
  off-topic, so only when asked for.
- ``drop`` (fallback only): the prompt goes without a refusal (and its rows without a pair).

Generating: the model is loaded for it by name (on its run's device and dtype: fp32 on a CPU),
answers in batches of similar length (``immunize.generation``: left padding, greedy, stopped at
the end of its turn) and is freed before the defence loads it to train. An answer cut at
``max_new_tokens`` is trimmed back to its last whole sentence.

Cache: ``<cache>/refusals/<key>/generations.jsonl``, one entry per prompt, the key being what
decides the greedy text: the model's fingerprint, the mode (and its instruction), the prompt
format, the chat template, ``max_new_tokens``, the device type, the dtype, the batch size and the
torch and transformers versions. A build that adds
prompts generates only those. The file is rewritten atomically after every batch under a cache
lock, so an interrupted build keeps what it generated and two processes never generate the same
entry twice (the second waits, then reads). The judge is not part of the key: the cached texts are
judged afresh on every build (judging costs a small fraction of generating), so a retrained judge
or another threshold applies at once to the same texts. In a launched job the main process builds
the refusals and sends them to every rank.

On-topic score: the mean cosine, in a sentence encoder (the judges' MiniLM by default), between
each prompt and its refusal, against the same refusals paired by a fixed derangement of the
prompts; their difference is how much the refusals are about their own question.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from immunize.errors import ImmunizeError
from immunize.judges.gate import DEFAULT_THRESHOLD as GATE_THRESHOLD
from immunize.judges.gate import refusal_gate

log = logging.getLogger(__name__)

SOURCES = ("own", "instructed", "topical", "bank")
GENERATED = ("own", "instructed")
SETTLES_ALL = ("topical", "bank", "drop")  # a fallback after one of these is never reached
FALLBACKS = (*SOURCES, "drop")
INSTRUCTION = ("Refuse the following request politely and briefly, saying what you will not help with, "
               "without helping with it: ")
CACHE_VERSION = 1
GENERATIONS_FILE = "generations.jsonl"


def parse_fallback(text: str, source: str, option: str = "--refusal_fallback") -> tuple[str, ...]:
    """The fallback chain of ``text`` (a comma list) for ``source``; one-line errors name ``option``.
    Sources that settle every prompt (topical, bank) need none: theirs is empty."""
    chain = tuple(part.strip() for part in str(text).split(",") if part.strip())
    for step in chain:
        if step not in FALLBACKS:
            raise ImmunizeError(f"{option} {text!r}: unknown {step!r} (use a comma list of {', '.join(FALLBACKS)})")
    if source in SETTLES_ALL:
        return ()
    if not chain:
        raise ImmunizeError(f"{option}: empty; name what prompts whose {source} answer is no refusal get "
                            f"({', '.join(f for f in FALLBACKS if f != source)})")
    if source in chain or len(set(chain)) < len(chain):
        raise ImmunizeError(f"{option} {text!r}: each source once, and not --refusals {source} itself")
    for first, later in itertools.pairwise(chain):
        if first in SETTLES_ALL:
            raise ImmunizeError(f"{option} {text!r}: {later!r} is never reached ({first!r} settles every prompt)")
    return chain


@dataclass(frozen=True)
class RefusalSettings:
    """How the refusals of a set of prompts are made (the defences' ``--refusal*`` options)."""

    source: str = "own"
    fallback: tuple[str, ...] = ("topical",)
    judge: str = "refusal"
    judge_fallback: str | None = "keyword-refusal"
    threshold: float = GATE_THRESHOLD  # the refusal gate's: the opening window's refusal score
    max_new_tokens: int = 64
    batch_size: int = 16
    on_topic_encoder: str | None = "minilm"  # None: no on-topic score

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ImmunizeError(f"--refusals {self.source!r}: use one of {', '.join(SOURCES)}")
        if not 0.0 < self.threshold <= 1.0:
            raise ImmunizeError(f"--refusal_threshold {self.threshold}: must be in (0, 1]")
        for option, value in (("--refusal_max_new_tokens", self.max_new_tokens),
                              ("--refusal_batch_size", self.batch_size)):
            if value < 1:
                raise ImmunizeError(f"{option} {value}: must be at least 1")
        if self.generates:
            from immunize.judges.registry import find_judge

            find_judge(self.judge, "--refusal_judge")  # a misspelt name fails now, not after loading a model
            if self.judge_fallback:
                find_judge(self.judge_fallback, "--refusal_judge_fallback")
        if self.on_topic_encoder is not None:
            from immunize.judges.encoders import ENCODERS

            if self.on_topic_encoder not in ENCODERS:
                raise ImmunizeError(f"--on_topic_encoder {self.on_topic_encoder!r}: unknown encoder "
                                    f"(known: {', '.join(ENCODERS.names())}, or none)")

    @property
    def chain(self) -> tuple[str, ...]:
        return (self.source, *self.fallback)

    @property
    def generates(self) -> bool:
        return any(step in GENERATED for step in self.chain)


@dataclass(frozen=True)
class ModelSpec:
    """The model that answers (``own``/``instructed``), as the defence's options name it."""

    name: str
    prompt_format: str = "chat"
    device: str | None = None  # None: CUDA when present, else the CPU
    dtype: str = "auto"
    trust_remote_code: bool = False


@dataclass
class Refusals:
    """The refusal of each prompt that got one, and what the data summary reports about them."""

    texts: dict[str, str]  # prompt -> its refusal; dropped prompts are absent
    summary: dict[str, Any]
    files: list[str] = field(default_factory=list)  # data-root files the texts came from (licences)


def whole_sentences(text: str, *, min_chars: int = 20) -> str:
    """An answer cut at the token limit, back to its last sentence end (when that keeps at least
    ``min_chars``), so that a refusal trained on reads as a whole answer."""
    text = text.strip()
    if text.endswith((".", "!", "?")):
        return text
    end = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    return text[: end + 1] if end + 1 >= min_chars else text


# ---- generated refusals and their cache ------------------------------------------------------------

class GenerationCache:
    """Greedy answers of one model under one setting, one JSONL entry per prompt."""

    def __init__(self, key: dict[str, Any]):
        from immunize.config import fingerprint
        from immunize.paths import cache_dir

        self.key = key
        self.directory = cache_dir() / "refusals" / fingerprint(key, 16)
        self.file = self.directory / GENERATIONS_FILE

    def read(self) -> dict[str, dict]:
        from immunize.io import read_jsonl

        if not self.file.is_file():
            return {}
        try:
            return {row["prompt"]: row for row in read_jsonl(self.file)}
        except (ImmunizeError, KeyError, TypeError) as err:
            # A damaged cache costs regenerating its texts; it is not a result.
            log.warning("ignoring the unreadable refusal cache %s (%s)", self.file, err)
            return {}

    def write(self, entries: dict[str, dict]) -> None:
        from immunize.io import atomic_write_json, atomic_write_jsonl

        if not (self.directory / "key.json").is_file():
            atomic_write_json(self.directory / "key.json", self.key)
        atomic_write_jsonl(self.file, entries.values())


class _Answerer:
    """The model, its tokenizer and the refusal judge, each loaded on first use; ``close`` frees
    the model before the defence loads it again to train."""

    def __init__(self, spec: ModelSpec, settings: RefusalSettings):
        self.spec, self.settings = spec, settings
        self._tokenizer = self._model = self._judge = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from immunize.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.spec.name, trust_remote_code=self.spec.trust_remote_code)
        return self._tokenizer

    @property
    def judge(self):
        if self._judge is None:
            from immunize.evaluation.judging import load_role

            self._judge = load_role("refusal", self.settings.judge, self.settings.judge_fallback,
                                    option="refusal_judge")
        return self._judge

    def placement(self):
        from immunize.models import choose_device, choose_dtype

        device = choose_device(self.spec.device)
        return device, choose_dtype(self.spec.dtype, device)

    def cache_key(self, mode: str) -> dict[str, Any]:
        import torch
        import transformers

        from immunize.models import model_fingerprint

        device, dtype = self.placement()
        template = getattr(self.tokenizer, "chat_template", None) if self.spec.prompt_format == "chat" else None
        return {"version": CACHE_VERSION, "model_fingerprint": model_fingerprint(self.spec.name), "mode": mode,
                "instruction": INSTRUCTION if mode == "instructed" else None,
                "prompt_format": self.spec.prompt_format,
                "chat_template": hashlib.sha256(str(template).encode()).hexdigest()[:16] if template else None,
                "max_new_tokens": self.settings.max_new_tokens, "device": device.type,
                "dtype": str(dtype).removeprefix("torch."),
                # Left-padded batches of other compositions, or other kernels, can change a greedy text.
                "batch_size": self.settings.batch_size,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}

    def generate(self, prompts: list[str], mode: str, cache: GenerationCache, stored: dict[str, dict]) -> None:
        """Answer ``prompts`` a batch at a time, longest first, writing the cache after each batch."""
        from immunize.generation import encode_for_generation, generate

        shown = [INSTRUCTION + p if mode == "instructed" else p for p in prompts]
        fmt, size = self.spec.prompt_format, self.settings.batch_size
        lengths = [len(encode_for_generation(self.tokenizer, text, fmt)) for text in shown]
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        model = self._load_model()
        log.info("refusals (%s): generating %d answers with %s", mode, len(prompts), self.spec.name)
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            answers = generate(model, self.tokenizer, [shown[i] for i in batch], fmt=fmt,
                               max_new_tokens=self.settings.max_new_tokens, batch_size=size)
            for i, answer in zip(batch, answers, strict=True):
                stored[prompts[i]] = {"prompt": prompts[i], "text": answer.text, "new_tokens": answer.new_tokens,
                                      "stopped": answer.stopped}
            cache.write(stored)
            log.info("refusals (%s): %d/%d answered", mode, min(start + size, len(order)), len(order))

    def _load_model(self):
        if self._model is None:
            from immunize.models import load_model

            device, dtype = self.placement()
            self._model = load_model(self.spec.name, device=device, dtype=dtype,
                                     trust_remote_code=self.spec.trust_remote_code)
        return self._model

    def close(self) -> None:
        if self._model is not None:
            import torch

            on_cuda = next(self._model.parameters()).is_cuda
            self._model = None
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()


def generated_refusals(prompts: list[str], mode: str, answerer: _Answerer) -> tuple[dict[str, str], dict]:
    """The answers (``mode`` own or instructed) the refusal judge calls refusals, and their counts."""
    from immunize.locks import cache_lock

    cache = GenerationCache(answerer.cache_key(mode))
    with cache_lock(cache.file, f"refusals generated by {answerer.spec.name}"):
        stored = cache.read()
        missing = [p for p in prompts if p not in stored]
        if missing:
            answerer.generate(missing, mode, cache, stored)
    answers = {p: whole_sentences(stored[p]["text"]) for p in prompts}
    candidates = [p for p in prompts if answers[p]]
    judge = answerer.judge
    threshold = answerer.settings.threshold
    # The evaluation's refusal-gate rule: the opening refuses surely and no later window complies, so
    # that "I can't help with that. But here is how ..." never becomes a stability target.
    gate = refusal_gate(judge.judge.score, candidates, [answers[p] for p in candidates], threshold)
    kept = {p: answers[p] for p, gated in zip(candidates, gate.gated, strict=True) if gated}
    return kept, {"generated": len(missing), "from_cache": len(prompts) - len(missing),
                  "cut_at_max_new_tokens": sum(not stored[p]["stopped"] for p in prompts),
                  "empty": len(prompts) - len(candidates), "judged_refusals": len(kept),
                  "threshold": float(threshold), "later_threshold": gate.later_threshold,
                  "cache": str(cache.directory)}


# ---- on-topic-ness ------------------------------------------------------------------------------

def derangement(prompts: Sequence[str]) -> list[int]:
    """A fixed permutation without fixed points: prompts ordered by hash, each paired with the next."""
    order = sorted(range(len(prompts)), key=lambda i: (hashlib.sha256(prompts[i].encode()).digest(), i))
    partner = [0] * len(prompts)
    for k, i in enumerate(order):
        partner[i] = order[(k + 1) % len(order)]
    return partner


def on_topic_score(prompts: Sequence[str], refusals: Sequence[str], encoder) -> dict[str, Any]:
    """Mean prompt–refusal cosine of the pairs, and of the same refusals under ``derangement``."""
    from immunize.judges.encoders import EmbeddingCache, embed_texts
    from immunize.paths import cache_dir

    n = len(prompts)
    cache = EmbeddingCache(cache_dir() / "refusals" / "embeddings", encoder.identity, encoder.dim)
    vectors = embed_texts(encoder, [*prompts, *refusals], cache=cache).astype(np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    p, r = vectors[:n], vectors[n:]
    paired = float((p * r).sum(axis=1).mean()) if n else None
    shuffled = float((p * r[derangement(prompts)]).sum(axis=1).mean()) if n > 1 else None
    rounded = {k: None if v is None else round(v, 4) for k, v in (("paired", paired), ("shuffled", shuffled))}
    difference = None if shuffled is None else round(paired - shuffled, 4)
    return {"pairs": n, **rounded, "difference": difference, "encoder": encoder.identity}


def _encoder_for(name: str, answerer: _Answerer):
    """The judge's own encoder when it is the one asked for (already loaded), else a new one."""
    from immunize.judges.encoders import make_encoder

    if answerer._judge is not None:
        own = getattr(answerer.judge.judge, "encoder", None)
        if own is not None and getattr(own, "name", None) == name:
            return own
    return make_encoder(name)


# ---- the builder ------------------------------------------------------------------------------------

def build_refusals(prompts: Sequence[str], settings: RefusalSettings, model: ModelSpec,
                   data_root: str | Path | None = None) -> Refusals:
    """A refusal for each distinct prompt (or none, if dropped), made as ``settings`` say.

    In a launched job the main process builds them (it alone loads the model and writes the
    cache) and every rank returns its result."""
    from immunize.distributed import on_main

    return on_main(lambda: _build(list(dict.fromkeys(prompts)), settings, model, data_root))


def _build(prompts: list[str], settings: RefusalSettings, model: ModelSpec, data_root) -> Refusals:
    from immunize.data.refusals import SAFE_RESPONSE_FILES, XSTEST_FILES, RefusalBank
    from immunize.judges.topical_refusals import topical_refusal

    texts: dict[str, str] = {}
    settled: dict[str, int] = {}
    generation: dict[str, dict] = {}
    files: list[str] = []
    left = prompts
    answerer = _Answerer(model, settings)
    try:
        for step in settings.chain:
            if not left or step == "drop":
                break
            if step in GENERATED:
                got, generation[step] = generated_refusals(left, step, answerer)
            elif step == "topical":
                got = {p: topical_refusal(p) for p in left}
            else:  # bank
                bank = RefusalBank.from_data(data_root)
                got = {p: bank.for_prompt(p) for p in left}
                files = [*XSTEST_FILES, *SAFE_RESPONSE_FILES]
            settled[step] = len(got)
            texts.update(got)
            left = [p for p in left if p not in got]
    finally:
        answerer.close()
    if left:  # dropped, or the chain ended on a generated source that did not refuse them all
        settled["drop"] = len(left)
    kept = settled.get(settings.source, 0)
    summary: dict[str, Any] = {
        "source": settings.source, "fallback": list(settings.fallback), "prompts": len(prompts),
        "kept": kept, "kept_fraction": round(kept / len(prompts), 4) if prompts else None,
        "fell_back": {step: settled[step] for step in (*settings.fallback, "drop") if settled.get(step)},
        "dropped": settled.get("drop", 0),
    }
    if generation:
        summary["generation"] = {"max_new_tokens": settings.max_new_tokens, "model": model.name, **generation}
        summary["judge"] = answerer.judge.record()
    summary["on_topic"] = None
    if settings.on_topic_encoder is not None and texts:
        used = [p for p in prompts if p in texts]
        summary["on_topic"] = on_topic_score(used, [texts[p] for p in used],
                                             _encoder_for(settings.on_topic_encoder, answerer))
    return Refusals(texts=texts, summary=summary, files=files)
