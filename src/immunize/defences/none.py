"""The ``none`` defence: the undefended model, copied as a checkpoint so pipelines treat it alike.

Every attack and evaluation then reads a defended-model directory, whichever defence made it, and
the undefended baseline carries the same completion marker and provenance as the others.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from immunize.defences import register_defence
from immunize.errors import ImmunizeError

log = logging.getLogger(__name__)


@dataclass
class NoDefenceConfig:
    model: str = field(default="smollm2-135m-instruct",
                       metadata={"help": "alias, local dir, .gguf file or hub id"})
    output_dir: str = field(default="runs/defend-none", metadata={"help": "where the copied checkpoint goes"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the checkpoint"})


@register_defence("none", NoDefenceConfig, "no defence: copy the model's checkpoint (the baseline)")
def run(cfg: NoDefenceConfig) -> Path:
    from immunize.config import write_provenance
    from immunize.io import atomic_write_json
    from immunize.models import model_fingerprint, resolve_model_source
    from immunize.training import COMPLETE_MARKER, is_complete

    out = Path(cfg.output_dir)
    fingerprint = model_fingerprint(cfg.model)
    done = is_complete(out)
    if done:
        if done.get("defence") == "none" and done.get("base_model_fingerprint") == fingerprint:
            log.warning("%s: already complete; nothing to do", out)
            return out
        raise ImmunizeError(f"--output_dir {out}: holds a finished run of something else; "
                            "choose another directory")
    source = resolve_model_source(cfg.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if Path(source).is_dir() and any(Path(source).glob("*.safetensors")):
            for item in Path(source).iterdir():
                if item.is_file() and not item.name.startswith("."):
                    shutil.copy2(item, staging / item.name)
        else:  # a hub id (or a checkpoint without safetensors): load and save as safetensors
            from immunize.models import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(cfg.model, device="cpu", dtype="auto",
                                                        trust_remote_code=cfg.trust_remote_code)
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        if out.exists():
            if any(out.iterdir()):
                raise ImmunizeError(f"--output_dir {out}: exists and is not empty; choose another directory")
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_provenance(out, {"defence": cfg}, extra={"base_model_fingerprint": fingerprint})
    atomic_write_json(out / COMPLETE_MARKER, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                              "defence": "none", "base_model": cfg.model,
                                              "base_model_fingerprint": fingerprint})
    return out
