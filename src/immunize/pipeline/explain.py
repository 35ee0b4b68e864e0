"""Depth analysis for a run: where the defence changed the model and why an attack can or cannot undo it.

Runs on held-out data only: harmful pairs from the held-out BeaverTails split (never seen by the
defence or the attack) and harmless pairs from AlpacaEval answers.
"""

from __future__ import annotations

from typing import Any

from immunize.data import load_benign_answers, load_splits
from immunize.models import load_model_and_tokenizer
from immunize.prompts import encode


def analysis_pairs(cfg, tokenizer, n: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``n`` harmful and ``n`` harmless (prompt, answer) pairs whose answers fit in ``max_length``."""
    splits = load_splits(root=cfg.data_root)

    def fitting(pairs):
        out, seen = [], set()
        for prompt, answer in pairs:
            fits = encode(tokenizer, prompt, answer, cfg.prompt_format, cfg.max_length).n_answer_tokens
            if prompt in seen or not fits:
                continue
            seen.add(prompt)
            out.append((prompt, answer))
            if len(out) == n:
                break
        return out

    harmful = fitting((row.prompt, row.response) for row in splits.heldout)
    harmless = fitting((b.instruction, b.output) for b in load_benign_answers("alpaca_eval", root=cfg.data_root)
                       if b.output)
    return harmful, harmless


def spread_layers(num_layers: int, count: int = 4) -> list[int]:
    """``count`` hidden-state indices from the first decoder layer's output to the last."""
    if num_layers <= count:
        return list(range(1, num_layers + 1))
    return sorted({round(1 + i * (num_layers - 1) / (count - 1)) for i in range(count)})


def depth_analysis(models: dict[str, str], cfg, defences: list[str], baseline: str = "none") -> dict[str, Any]:
    """``models`` maps labels (aligned, <defence>, <defence>@<budget>) to checkpoint paths; the
    ``baseline`` defence's attacked model is compared with ``aligned``."""
    from immunize.analysis import logit_lens, representation_pca, weight_distance

    loaded = {label: load_model_and_tokenizer(path, device="cpu", dtype=cfg.dtype) for label, path in models.items()}
    harmful, harmless = analysis_pairs(cfg, loaded["aligned"][1], cfg.analysis_examples)
    labels = list(models)
    aligned = loaded["aligned"][0]
    distances: dict[str, list[dict]] = {}
    for label in labels:
        if label == "aligned":
            continue
        if "@" in label:
            defence = label.split("@", 1)[0]
            start = "aligned" if defence == baseline else defence
            distances[f"{label} vs {start}"] = weight_distance(loaded[start][0], loaded[label][0])
        else:
            distances[f"{label} vs aligned"] = weight_distance(aligned, loaded[label][0])
    num_layers = aligned.config.num_hidden_layers
    layers = cfg.analysis_layers or spread_layers(num_layers)
    # Before/after the defence (and after the attack) on axes fitted to the aligned model.
    pca = representation_pca({label: loaded[label] for label in labels}, harmful, harmless, layers,
                             cfg.prompt_format, max_length=cfg.max_length)
    lens = {label: logit_lens(model, tok, harmful, cfg.prompt_format, max_length=cfg.max_length,
                              answer_tokens=cfg.analysis_lens_tokens)
            for label, (model, tok) in loaded.items()}
    return {"weight_distance": distances, "pca": pca, "logit_lens": lens,
            "data": {"harmful": len(harmful), "harmless": len(harmless), "source": "held-out split / AlpacaEval",
                     "lens_answer_tokens": cfg.analysis_lens_tokens}}
