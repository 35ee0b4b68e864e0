"""The one method runner: identity, resume, provenance, saving, marker and model card for every
method that writes a model (defences, the alignment stage, attacks).

- **Identity** follows one rule: every config field counts, except the few listed in
  ``NOT_IDENTITY`` (where files go, how progress is logged and checkpoints kept, how the work is
  placed on devices). A changed ``max_grad_norm`` or Adam setting therefore never resumes or skips
  an old run. Paths are replaced by what they hold: the model by its content fingerprint, the data
  by the hash of the examples built from it.
- **Claiming** an output directory: a run holds it under ``immunize.locks.run_lock`` (a second
  process fails at once, naming the holder); a directory whose identity differs is refused (one
  line, naming the options that differ) once it holds work (a checkpoint, a model, the marker).
  Identity is written only once the run has validated its inputs, and a run that saved nothing
  (it failed or was killed before its first checkpoint) is replaced, so it never blocks its
  corrected rerun.
- **Resume**: trainers resume from the newest checkpoint in the directory.
- **Saving** goes through ``trainer.save_model()`` (so FSDP/ZeRO-3 shards are gathered by the
  Trainer), then the tokenizer, the model card (``README.md`` with YAML metadata) and, last, the
  completion marker whose presence means "done".
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from enum import Enum
from pathlib import Path
from typing import Any

from immunize.config import write_provenance
from immunize.distributed import from_main, is_main, refuse_sharded_save, wait
from immunize.errors import ImmunizeError
from immunize.io import atomic_write_json, atomic_write_text, read_json, share_weights
from immunize.redact import is_secret, redact

log = logging.getLogger(__name__)

COMPLETE_MARKER = "immunize-complete.json"
IDENTITY_FILE = "immunize-run.json"
MODEL_CARD = "README.md"

# Fields that never change what a run computes. Everything else is identity.
NOT_IDENTITY = frozenset({
    # where things go and what is kept
    "output_dir", "keep_checkpoints", "config", "grid",
    # paths replaced by content hashes (model fingerprint, data hashes)
    "model", "data_root", "qa_source", "eval_source", "toxicity_source", "hh_source",
    "trust_remote_code", "model_init_kwargs",
    # logging and reporting
    "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
    "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name",
    "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "skip_memory_metrics",
    # evaluation inside the Trainer (our methods do not evaluate there)
    "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only",
    "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
    "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "do_train", "do_eval",
    "do_predict", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    # checkpoints and the hub
    "save_only_model", "save_strategy", "save_steps", "save_every_seconds", "save_on_each_node", "save_total_limit",
    "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy",
    "hub_always_push", "hub_revision", "resume_from_checkpoint", "restore_callback_states_from_checkpoint",
    # placement: the same computation on other devices or shards (activation checkpointing recomputes
    # the same values)
    "use_cpu", "local_rank", "accelerator_config", "parallelism_config", "ddp_find_unused_parameters",
    "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout", "fsdp",
    "fsdp_config", "deepspeed", "debug", "torch_empty_cache_steps", "activation_checkpointing",
    "activation_checkpointing_kwargs", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "torch_compile", "torch_compile_backend", "torch_compile_mode", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "dataset_num_proc", "precompute_ref_batch_size",
    "activation_offloading", "lens_chunk_tokens",
    # resistance-curve scoring during attacks (scores, not weights)
    "curve", "curve_every_steps", "curve_num_prompts", "curve_num_answers", "curve_max_new_tokens",
    "curve_batch_size", "curve_save_models",
})


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    return value


def config_identity(cfg: Any, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every init field of ``cfg`` but ``NOT_IDENTITY``, its class's ``not_identity`` (and ``exclude``),
    as plain JSON values.

    Values are read from the config itself (``to_dict`` masks ``*_token`` fields, which would hide a
    changed ``pad_token``); whole numbers given as floats count as the same value (YAML's ``1``
    and a flag's ``1.0`` are one epoch). Secret-like options (``immunize.redact``) never change what a
    run computes, so they never enter an identity, a model card or a stage key."""
    names = [f.name for f in dataclasses.fields(cfg) if f.init]
    # A method's own diagnostics (``not_identity`` of its config class) change no result either.
    skip = NOT_IDENTITY | exclude | frozenset(getattr(type(cfg), "not_identity", ()))
    return {name: _number(_plain(getattr(cfg, name, None))) for name in sorted(names)
            if name not in skip and not is_secret(name)}


def _number(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_SOURCE_FIELDS = ("qa_source", "eval_source", "toxicity_source", "hh_source")


def data_identity(cfg: Any) -> dict[str, Any]:
    """What the data options point at, by content: the data pack's MANIFEST (it lists every file's
    sha256) and each source option (a local file by its hash, a hub id by name)."""
    from immunize.io import file_sha256
    from immunize.paths import data_root as resolve_root

    root = resolve_root(getattr(cfg, "data_root", None), must_exist=False)
    manifest = Path(root) / "MANIFEST.json"
    out: dict[str, Any] = {"data_root": file_sha256(manifest) if manifest.is_file() else str(root)}
    for name in _SOURCE_FIELDS:
        value = getattr(cfg, name, None)
        if value:
            out[name] = file_sha256(value) if Path(value).is_file() else str(value)
    return out


def method_identity(method: str, cfg: Any, model_fingerprint: str, data_sha256: str | None) -> dict[str, Any]:
    """The identity of a run: the method, what it starts from, its data, every option, and the two
    facts of the machine that change the numbers (the resolved dtype, the number of processes)."""
    from immunize.models import choose_device, choose_dtype

    dtype = choose_dtype(getattr(cfg, "dtype", "auto"), choose_device("cpu" if cfg.use_cpu else None))
    return {"method": method, "model_fingerprint": model_fingerprint, "data_sha256": data_sha256,
            "data": data_identity(cfg), "dtype": str(dtype).removeprefix("torch."),
            "world_size": cfg.world_size, "options": config_identity(cfg)}


def processes(cfg: Any) -> dict[str, int]:
    """The number of processes, for keys and run ids, when it is not one: per-device batches (and
    RepNoise's batch statistics) make a run on N processes another computation than on one, while
    single-process keys stay what they always were."""
    return {"world_size": cfg.world_size} if cfg.world_size > 1 else {}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}." if key != "options" else "")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _changed(out: Path, identity: dict) -> list[str]:
    """The identity fields in which the run recorded in ``out`` differs from ``identity``."""
    path = out / IDENTITY_FILE
    return _differences(read_json(path).get("identity", {}), identity) if path.is_file() else []


def holds_work(out: Path) -> bool:
    """Whether ``out`` holds something a run computed: a checkpoint, a saved model or the marker."""
    return (out / COMPLETE_MARKER).is_file() or any(out.glob("checkpoint-*")) or any(out.glob("*.safetensors"))


def check_identity(out: Path, identity: dict, *, data: bool = True) -> None:
    """Refuse a directory that holds work of a run with another identity (``data=False``: before
    the data is built, everything but its hash).

    A run that never saved anything (it failed or was killed before its first checkpoint) does not
    count: its corrected rerun takes the directory over (``claim``)."""
    changed = [name for name in _changed(out, identity) if data or name != "data_sha256"]
    if changed and holds_work(out):
        raise ImmunizeError(f"--output_dir {out}: holds a run with different {', '.join(changed)}; "
                            "choose another --output_dir (or delete it) to start afresh")


def claim(out: Path, identity: dict) -> None:
    """Mark ``out`` as this run's (after its inputs are validated, right before it starts work)."""
    check_identity(out, identity)
    if changed := _changed(out, identity):
        log.warning("--output_dir %s: replacing a run with different %s that saved nothing", out, ", ".join(changed))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / IDENTITY_FILE, {"identity": identity})


def is_complete(output_dir: str | Path) -> dict | None:
    marker = Path(output_dir) / COMPLETE_MARKER
    return read_json(marker) if marker.is_file() else None


# ---- saving ---------------------------------------------------------------------------------

def _yaml_block(meta: dict[str, Any]) -> str:
    import json

    import yaml

    return yaml.safe_dump(json.loads(json.dumps(meta, default=str)), sort_keys=False, allow_unicode=True)


def data_licences(sources: list[str], data_root: str | None) -> list[str]:
    """Licences of the data-root files a method read, from the data pack's MANIFEST."""
    from immunize.paths import data_root as resolve_root

    root = resolve_root(data_root, must_exist=False)
    manifest_path = Path(root) / "MANIFEST.json"
    if not manifest_path.is_file():
        return []
    manifest = read_json(manifest_path)
    return sorted({str(manifest[s].get("licence")) for s in sources if s in manifest and manifest[s].get("licence")})


def write_model_card(out: Path, *, method: str, kind: str, base_model: str, base_fingerprint: str,
                     options: dict[str, Any], data: dict[str, Any] | None, licences: list[str],
                     description: str, extra: dict[str, Any] | None = None) -> None:
    """``README.md`` in Hugging Face model-card form: YAML metadata, then what was done and how."""
    meta = {
        "base_model": base_model,
        "library_name": "transformers",
        "tags": ["immunize", kind, method],
        "license": "other" if licences else None,
        "immunize": {"kind": kind, "method": method, "base_model_fingerprint": base_fingerprint,
                     "options": options, "data": data, "data_licences": licences, **(extra or {})},
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    lines = [
        "---", _yaml_block(redact(meta)).rstrip(), "---", "",
        f"# {method} ({kind})", "",
        description, "",
        f"- Base model: `{base_model}` (fingerprint `{base_fingerprint}`)",
        f"- Made by `immunize` ({kind} `{method}`); the options and data hashes are in the metadata above.",
    ]
    if licences:
        lines.append(f"- Trained on data under: {'; '.join(licences)}. Check these before any use or release.")
    lines += ["", "> Content warning: trained with harmful text, for safety research only.", ""]
    atomic_write_text(out / MODEL_CARD, "\n".join(lines))


def save_trained(trainer, tokenizer, *, merge_lora: bool) -> Path:
    """Save the trained model as one safetensors checkpoint in ``output_dir`` via ``trainer.save_model``."""
    out = Path(trainer.args.output_dir)
    if hasattr(trainer.model, "peft_config") and merge_lora:
        trainer.model = trainer.model.merge_and_unload()
        trainer.model_wrapped = trainer.model
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
    return out


def finish(out: Path, marker: dict[str, Any], *, keep_checkpoints: bool) -> None:
    """Drop intermediate checkpoints (unless kept), make the saved weights as readable as the files
    beside them (``share_weights``) and write the completion marker last (the main process only)."""
    if not is_main():
        return
    if not keep_checkpoints:
        for ckpt in out.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    share_weights(out)
    atomic_write_json(out / COMPLETE_MARKER, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **marker})


# ---- defences and the alignment stage -------------------------------------------------------------

def run_defence(name: str, cfg: Any, *, kind: str = "defence") -> Path:
    """Run (or skip, or resume) the registered defence ``name`` with config ``cfg``, holding its
    output directory throughout (another process using it fails at once)."""
    from immunize.locks import run_lock

    with run_lock(cfg.output_dir):
        return _run_defence(name, cfg, kind)


def _run_defence(name: str, cfg: Any, kind: str) -> Path:
    from immunize.defences import get_defence
    from immunize.defences.base import Defence
    from immunize.models import load_tokenizer, model_fingerprint
    from immunize.training import StepTimer, run_training

    defence = get_defence(name)
    out = Path(cfg.output_dir)
    base_fingerprint = model_fingerprint(cfg.model)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    # Other options are refused before the data is built: building it may load the model and a
    # judge to generate refusals (immunize.data.paired_refusals), which takes time and prints.
    check_identity(out, method_identity(name, cfg, base_fingerprint, None), data=False)
    data = defence.build_data(cfg, tokenizer)
    data_sha = data.summary.get("features_sha256") if data else None
    identity = method_identity(name, cfg, base_fingerprint, data_sha)
    check_identity(out, identity)
    if from_main(is_complete(out)):
        log.warning("%s: already complete with the same options; nothing to do", out)
        return out
    if defence.trains and (data is None or not data.features):
        raise ImmunizeError(f"--defence {name}: no training examples (check --num_samples and --max_length)")

    summary = data.summary if data else None
    if is_main():  # rank 0 holds the directory's lock and writes in it; the others wait for it
        claim(out, identity)
        write_provenance(out, {kind: cfg}, extra={"method": name, "kind": kind, "data": summary,
                                                  "base_model_fingerprint": base_fingerprint})
    wait()
    timer = StepTimer()
    record: dict[str, Any] = {}
    if defence.trains:
        model, tokenizer = defence.load_model(cfg)
        trainer = defence.build_trainer(cfg, model, tokenizer, data)
        if type(defence).save_extras is not Defence.save_extras:  # it saves more than the model
            refuse_sharded_save(trainer, f"--defence {name}")
        result = run_training(trainer)
        history = [e for e in trainer.state.log_history if "loss" in e]
        record = {"train_loss": run_loss(trainer.state.log_history, result.training_loss),
                  "first_log": history[0] if history else None, "last_log": history[-1] if history else None,
                  **timer.summary(trainer.state.global_step)}
        model = trainer.model
        extras = defence.save_extras(cfg, model, out) if is_main() else {}
        evaluated = defence.evaluated_model(cfg, model)
        if evaluated is not model:
            trainer.model = trainer.model_wrapped = evaluated
        save_trained(trainer, tokenizer, merge_lora=cfg.merge_lora)
    else:
        # Nothing trains: the model is built (the same on every rank) and saved once.
        model, tokenizer = defence.build_model(cfg)
        extras = {}
        if is_main():
            extras = defence.save_extras(cfg, model, out)
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
        record = timer.summary(0)
    if is_main():
        from immunize.defences import DEFENCES

        entry = DEFENCES.entry(name)
        write_model_card(out, method=name, kind=kind, base_model=cfg.model, base_fingerprint=base_fingerprint,
                         options=identity["options"], data=summary,
                         licences=data_licences(data.sources if data else [], cfg.data_root),
                         description=entry.help, extra={"keeps_capability": defence.keeps_capability,
                                                        "attack_adapter": defence.attack_adapter, **extras})
    finish(out, {"method": name, "kind": kind, "defence": name, "base_model": cfg.model,
                 "base_model_fingerprint": base_fingerprint, "options": identity["options"], "data": summary,
                 "keeps_capability": defence.keeps_capability, "attack_adapter": defence.attack_adapter,
                 **extras, **record}, keep_checkpoints=cfg.keep_checkpoints)
    wait()  # no rank reads the model (or moves on to the next stage) before the marker is written
    return out


def run_loss(log_history: list[dict], reported: float) -> float:
    """The mean training loss of the whole run, also after a resume.

    ``Trainer`` reports the mean over the steps *this process* ran; after a resume that is only the
    tail of the run. Each log holds the mean loss since the previous one, and the log history is
    restored from the checkpoint, whose step is always a logging step, as is the last step
    (``immunize.training.CheckpointPolicy``); so the logs weighted by the steps each covers give
    the mean over every step, whatever ``logging_steps`` is.
    """
    logs = sorted((e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e)
    if not logs:
        return float(reported)
    total, previous = 0.0, 0
    for step, loss in logs:
        total += loss * (step - previous)
        previous = step
    return float(total / previous)
