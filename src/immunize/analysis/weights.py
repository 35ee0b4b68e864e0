"""Per-layer L2 distance between the weights of two models of one architecture.

This is the paper's "depth" figure: RepNoise is meant to change *every* layer, while an attack that
merely re-learns a refusal boundary tends to touch only the last few. Parameters are grouped by
the decoder-layer index in their name (``.layers.N.`` / ``.h.N.`` / ``.layer.N.`` / ``.blocks.N.``), so
the same code serves Llama, GPT-2, GPT-NeoX, OPT, Phi and friends without a per-architecture list.

Models may be plain ``transformers`` models (a merged LoRA checkpoint is one) or PEFT wrappers with
unmerged LoRA adapters; the latter are compared on their effective weights ``W + ΔW``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from immunize.errors import ImmunizeError
from immunize.hooks import unwrap_model

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_HEAD_MARKERS = ("lm_head", "embed_out", "project_out")
_EMBEDDING_MARKERS = ("embed", "wte", "wpe", "project_in")
EMBEDDINGS, HEAD = "embeddings", "head"


def _group(name: str) -> str:
    """``"embeddings"``, a decoder-layer index as a string, or ``"head"`` (final norm + LM head)."""
    if match := _LAYER.search(name):
        return match.group(1)
    if any(marker in name for marker in _HEAD_MARKERS):
        return HEAD
    if any(marker in name for marker in _EMBEDDING_MARKERS):
        return EMBEDDINGS
    return HEAD  # final norms (model.norm, ln_f, final_layer_norm, final_layernorm)


def _weights(model) -> dict[str, Callable[[], torch.Tensor]]:
    """Canonical parameter name → a function returning its effective weight (LoRA delta added).

    Tied parameters (an LM head sharing the embedding matrix) appear once per name, each marked by
    the identity of its storage so the caller can skip an alias that is tied in both models.
    """
    model = unwrap_model(model)
    for name, _ in model.named_parameters():
        if "lora_magnitude_vector" in name:
            raise ImmunizeError("weight distance: DoRA adapters are not supported unmerged; "
                                "merge them first (merge_and_unload)")
    deltas: dict[str, list[Callable[[], torch.Tensor]]] = {}
    for module_name, module in model.named_modules():
        # peft's LoraLayer: a base_layer plus per-adapter low-rank factors, unless already merged.
        if not (hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")):
            continue
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            continue
        known = set(getattr(module, "lora_A", {})) | set(getattr(module, "lora_embedding_A", {}))
        for adapter in module.active_adapters:
            if adapter in known:
                deltas.setdefault(module_name + ".weight", []).append(
                    lambda module=module, adapter=adapter: module.get_delta_weight(adapter))
    weights: dict[str, Callable[[], torch.Tensor]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if ".lora_" in name:
            continue
        canonical = name.replace(".base_layer.", ".")
        weights[canonical] = _effective(param, deltas.get(canonical, []))
    return weights


def _effective(param: torch.Tensor, deltas: list[Callable[[], torch.Tensor]]) -> Callable[[], torch.Tensor]:
    # Deferred, so only one layer's effective weight is materialized at a time.
    def weight() -> torch.Tensor:
        value = param.detach()
        for delta in deltas:
            value = value + delta().to(value.dtype)
        return value

    return weight


def _storage(model) -> dict[str, int]:
    """Parameter name → id of the first name sharing its storage (tied weights share one id)."""
    first: dict[int, int] = {}
    out = {}
    for index, (name, param) in enumerate(unwrap_model(model).named_parameters(remove_duplicate=False)):
        out[name.replace(".base_layer.", ".")] = first.setdefault(id(param), index)
    return out


def _order(group: str) -> tuple[int, int]:
    if group == EMBEDDINGS:
        return (0, 0)
    if group == HEAD:
        return (2, 0)
    return (1, int(group))


@torch.no_grad()
def weight_distance(model_a, model_b) -> list[dict]:
    """Per-layer L2 distance ``sqrt(Σ ||W_a − W_b||²)`` over the parameters of each layer.

    Returns one row per group, in network order: ``embeddings``, ``"0"`` … ``"L-1"`` (decoder
    layers), ``head`` (final norm and LM head). Each row: ``layer`` (str), ``l2``, ``relative``
    (``l2`` divided by the norm of model A's weights in that group: the fraction changed) and
    ``n_params``. A parameter tied to another in both models (an LM head sharing the embedding
    matrix) is counted once, under the embeddings.
    """
    weights_a, weights_b = _weights(model_a), _weights(model_b)
    missing_b = [n for n in weights_a if n not in weights_b]
    missing_a = [n for n in weights_b if n not in weights_a]
    if missing_a or missing_b:
        side, names = ("second", missing_b) if missing_b else ("first", missing_a)
        raise ImmunizeError(f"weight distance: the models differ in architecture: the {side} model lacks "
                            f"{len(names)} parameter(s), e.g. {names[0]!r}")
    storage_a, storage_b = _storage(model_a), _storage(model_b)
    seen_a: set[int] = set()
    seen_b: set[int] = set()
    squared: dict[str, float] = {}
    reference: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, get_a in weights_a.items():
        tied = storage_a[name] in seen_a and storage_b[name] in seen_b
        seen_a.add(storage_a[name])
        seen_b.add(storage_b[name])
        if tied:
            continue
        a, b = get_a(), weights_b[name]()
        if a.shape != b.shape:
            raise ImmunizeError(f"weight distance: parameter {name!r} has shape {tuple(a.shape)} in the "
                                f"first model and {tuple(b.shape)} in the second")
        group = _group(name)
        a32 = a.float()
        diff = a32 - b.to(a.device).float()
        squared[group] = squared.get(group, 0.0) + float(diff.pow(2).sum(dtype=torch.float64))
        reference[group] = reference.get(group, 0.0) + float(a32.pow(2).sum(dtype=torch.float64))
        counts[group] = counts.get(group, 0) + a.numel()
    rows = []
    for group in sorted(squared, key=_order):
        l2 = squared[group] ** 0.5
        norm = reference[group] ** 0.5
        rows.append({"layer": group, "l2": l2, "relative": l2 / norm if norm > 0 else 0.0,
                     "n_params": counts[group]})
    return rows
