"""`immunize models`: list model aliases and cached checkpoints; optionally materialize one."""

from __future__ import annotations

from dataclasses import dataclass, field

from immunize.config import parse_config

HELP = "list model aliases and cached checkpoints (--prepare NAME converts/caches one)"


@dataclass
class ModelsConfig:
    prepare: str | None = field(default=None, metadata={"help": "alias, .gguf file or directory to load once"})
    chat: str | None = field(default=None, metadata={"help": "with --prepare: one chat turn to send the model"})
    max_new_tokens: int = field(default=48, metadata={"help": "length of the --chat reply"})


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def main(argv: list[str]) -> int:
    (cfg,) = parse_config([ModelsConfig], argv, prog="immunize models", description=HELP)
    from immunize.models.aliases import ALIASES
    from immunize.models.loading import cached_checkpoints, models_cache

    if cfg.prepare:
        return _prepare(cfg)
    print("aliases:")
    for alias in ALIASES.values():
        try:
            where = str(alias.gguf_path())
        except Exception as err:  # the alias's package is missing: say how to install it
            where = f"not installed ({err})"
        print(f"  {alias.name:<24} {alias.description}\n  {'':<24} {where}")
    print(f"\ncached checkpoints in {models_cache()}:")
    cached = cached_checkpoints()
    for path, size in cached:
        print(f"  {path.name:<48} {_size(size):>10}")
    if not cached:
        print("  (none yet: the first use of an alias converts it)")
    return 0


def _prepare(cfg: ModelsConfig) -> int:
    import time

    import torch

    from immunize.models import load_model_and_tokenizer, resolve_model_source
    from immunize.prompts import render_prompt

    start = time.perf_counter()
    source = resolve_model_source(cfg.prepare)
    resolved = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(cfg.prepare)
    loaded = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.prepare}: {source}")
    print(f"  {type(model).__name__}, {n_params / 1e6:.1f}M parameters, {model.dtype}, {model.device}")
    print(f"  resolve/convert {resolved - start:.1f}s, load {loaded - resolved:.1f}s")
    if cfg.chat:
        fmt = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        inputs = tokenizer(render_prompt(tokenizer, cfg.chat, fmt), return_tensors="pt",
                           add_special_tokens=fmt == "plain").to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        print(f"  user: {cfg.chat}\n  model: {reply}")
    return 0
