"""Resolve a model name to weights on disk and load it on a sensible device and dtype.

Sources, in order: a named alias, a local ``.gguf`` file, a local Hugging Face directory, a hub id.
GGUF weights are dequantized once into an fp32 safetensors checkpoint under the cache directory,
so later loads take about a second instead of a full dequantization.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import torch

from immunize.distributed import is_distributed, local_rank
from immunize.errors import ImmunizeError
from immunize.io import atomic_write_text, publish_dir, read_json
from immunize.locks import cache_lock
from immunize.models.aliases import ALIASES
from immunize.paths import cache_dir

log = logging.getLogger(__name__)

_FINGERPRINT_SIDECAR = ".immunize-fingerprint.json"


def models_cache() -> Path:
    return cache_dir() / "models"


def choose_device(preference: str | None = None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else CPU; anything else is passed to torch.

    In a launched job, ``auto`` and a bare ``cuda`` mean this process's own GPU (``LOCAL_RANK``),
    never GPU 0 for every rank."""
    if preference in (None, "", "auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank()) if is_distributed() else torch.device("cuda")
    if preference in (None, "", "auto"):
        return torch.device("cpu")
    try:
        return torch.device(preference)
    except RuntimeError:
        raise ImmunizeError(f"--device: unknown device {preference!r} (use auto, cpu, cuda or cuda:N)") from None


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def choose_dtype(preference: str | None, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, else fp32 (CPUs without bf16 units run bf16 >100x slower)."""
    if preference in (None, "", "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[preference]
    except KeyError:
        raise ImmunizeError(f"--dtype: unknown dtype {preference!r} (use auto, {', '.join(_DTYPES)})") from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_source(name: str) -> str:
    """Return a local directory (materializing aliases and GGUF files) or the hub id unchanged."""
    if name in ALIASES:
        return str(_gguf_checkpoint(ALIASES[name].gguf_path()))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(_gguf_checkpoint(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ImmunizeError(f"model {name!r}: directory has no config.json (not a Hugging Face checkpoint)")
        _check_config(path / "config.json")
        return str(path.resolve())
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return name
    raise ImmunizeError(
        f"model {name!r}: not a known alias ({', '.join(ALIASES)}), an existing directory or .gguf file, "
        "or an owner/name hub id"
    )


def _check_config(path: Path) -> None:
    """A checkpoint's ``config.json`` is a JSON object naming an architecture transformers knows.

    Read here because transformers reports both deep inside loading, as a multi-line ValueError
    or an OSError, and only once the run has started writing. A config with ``auto_map`` defines
    its own architecture in remote code, which transformers itself accepts or refuses.
    """
    from transformers import CONFIG_MAPPING, __version__

    config = read_json(path)
    if not isinstance(config, dict):
        raise ImmunizeError(f"{path}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is not None and "auto_map" not in config and (
            not isinstance(model_type, str) or model_type not in CONFIG_MAPPING):
        raise ImmunizeError(f"{path}: unknown model_type {model_type!r} "
                            f"(not an architecture transformers {__version__} knows)")


def conversion_target(gguf: Path) -> Path:
    """Where the fp32 copy of ``gguf`` lives in the cache (a changed file gets a new copy)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return models_cache() / f"{gguf.stem}-fp32-{key}"


def _gguf_checkpoint(gguf: Path) -> Path:
    target = conversion_target(gguf)
    if not _converted(target):
        # Another process on this machine may be converting the same file: wait, then reuse its copy.
        with cache_lock(target, f"the fp32 copy of {gguf.name}"):
            if not _converted(target):
                _dequantize(gguf, target)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def _dequantize(gguf: Path, target: Path) -> None:
    """Write ``gguf`` as an fp32 safetensors checkpoint into ``target`` (staged, then swapped in)."""
    log.info("dequantizing %s to fp32 safetensors in %s (once)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained (it carries a quantization config); rebuild a
    # plain model from the same config without it and copy the dequantized weights across.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "immunize-source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        publish_dir(staging, target)  # replaces an incomplete earlier conversion
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_model_source(name)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of every loss and attention, so any id works; eos is standard.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name)
    device = device if isinstance(device, torch.device) else choose_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else choose_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImmunizeError(f"model {name!r}: could not load ({first})") from None
    return model.to(device)


def load_model_and_tokenizer(name: str, **kwargs):
    trust = kwargs.get("trust_remote_code", False)
    return load_model(name, **kwargs), load_tokenizer(name, trust_remote_code=trust)


def model_fingerprint(name: str) -> str:
    """A content hash of a local checkpoint (config + weights), cached beside it; hub ids hash by name."""
    source = resolve_model_source(name)
    path = Path(source)
    if not path.is_dir():
        return "hub:" + source
    files = sorted(p for p in path.iterdir() if p.suffix in {".json", ".safetensors"} and not p.name.startswith("."))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    sidecar = path / _FINGERPRINT_SIDECAR
    try:
        cached = json.loads(sidecar.read_text())
        if cached.get("stamp") == stamp:
            return cached["fingerprint"]
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 22), b""):
                digest.update(chunk)
    value = digest.hexdigest()[:16]
    # Read-only checkpoints are fine: the hash is recomputed next time.
    # Every process of a launched job hashes the checkpoint; each machine's first one keeps the hash
    # (atomically: machines may share the file system).
    if local_rank() == 0:
        with contextlib.suppress(OSError):
            atomic_write_text(sidecar, json.dumps({"stamp": stamp, "fingerprint": value}))
    return value


def cached_checkpoints() -> list[tuple[Path, int]]:
    root = models_cache()
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            out.append((entry, sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())))
    return out
