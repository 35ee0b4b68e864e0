"""Where a decoder's layers, attention, MLPs, final norm and LM head live, per architecture, and hooks
on them.

A pyvene-style table (``ARCHITECTURES``) keyed by ``config.model_type`` names the module paths; no
method hard-codes ``model.model.layers``. Paths are resolved on the *unwrapped* model (DDP, FSDP1,
``torch.compile`` and PEFT wrappers removed), so the same table serves a plain model, a distributed
one and a LoRA-wrapped one: PEFT injects its adapters inside these modules, never around them.

``HookSet`` is the only way methods register hooks: a context manager that removes every hook it
registered when the block ends, error or not, so hooks never pile up across steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from immunize.errors import ImmunizeError


@dataclass(frozen=True)
class HookPoints:
    """Module paths of one architecture (dotted, relative to the ``*ForCausalLM`` model)."""

    layers: str  # the ModuleList of decoder layers; a layer's output is the residual stream after it
    mlp: str  # inside a layer: the module whose output is the feed-forward (MLP) output
    # inside a layer: the self-attention module; its output[0] is the attention output after the
    # output projection, before the residual add
    attention: str
    final_norm: str | None  # the norm applied to the last residual stream before the LM head
    lm_head: str = "lm_head"
    # Modules applied between the final norm and the LM head, in order (OPT's project_out).
    pre_head: tuple[str, ...] = ()


_LLAMA_LIKE = HookPoints(layers="model.layers", mlp="mlp", attention="self_attn", final_norm="model.norm")

ARCHITECTURES: dict[str, HookPoints] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gpt_neox": HookPoints(layers="gpt_neox.layers", mlp="mlp", attention="attention",
                           final_norm="gpt_neox.final_layer_norm"),
    "gpt2": HookPoints(layers="transformer.h", mlp="mlp", attention="attn", final_norm="transformer.ln_f"),
    # OPT has no MLP module: fc2 is the feed-forward output (before dropout and the residual add).
    # final_layer_norm is None and project_out absent for some sizes; resolution allows that.
    "opt": HookPoints(layers="model.decoder.layers", mlp="fc2", attention="self_attn",
                      final_norm="model.decoder.final_layer_norm", pre_head=("model.decoder.project_out",)),
    "phi": HookPoints(layers="model.layers", mlp="mlp", attention="self_attn", final_norm="model.final_layernorm"),
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / FSDP1 / ``torch.compile`` / PEFT wrappers down to the causal LM."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    wrappers: tuple[type, ...] = (DataParallel, DistributedDataParallel)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrappers += (FullyShardedDataParallel,)
    except ImportError:  # torch built without distributed support
        pass
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
            model = model.get_base_model()
        else:
            return model


def _get(root: nn.Module, path: str, model_type: str, *, optional: bool = False) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        if not hasattr(obj, part):
            if optional:
                return None
            raise ImmunizeError(
                f"architecture {model_type!r}: module {path!r} (immunize.hooks.ARCHITECTURES) not found "
                f"in {type(root).__name__}; the table entry does not match this model"
            )
        obj = getattr(obj, part)
    if obj is None and optional:
        return None
    if not isinstance(obj, nn.Module):
        raise ImmunizeError(f"architecture {model_type!r}: {path!r} is not a module in {type(root).__name__}")
    return obj


@dataclass
class ResolvedHookPoints:
    model_type: str
    layers: list[nn.Module]
    mlps: list[nn.Module]
    attentions: list[nn.Module]
    final_norm: nn.Module | None
    pre_head: list[nn.Module]
    lm_head: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head sees for a residual-stream vector: final norm, then any pre-head modules."""
        for module in (self.final_norm, *self.pre_head):
            if module is not None:
                hidden = module(hidden)
        return hidden


def resolve_hook_points(model: nn.Module) -> ResolvedHookPoints:
    """Resolve the table entry for ``model`` (wrapped or not); unsupported architectures fail clearly."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    points = ARCHITECTURES.get(model_type)
    if points is None:
        raise ImmunizeError(
            f"architecture {model_type!r} ({type(base).__name__}) has no entry in the hook-point table "
            f"immunize.hooks.ARCHITECTURES (supported: {', '.join(sorted(ARCHITECTURES))}); add one there"
        )
    layers = _get(base, points.layers, model_type)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ImmunizeError(f"architecture {model_type!r}: {points.layers!r} is not a non-empty ModuleList")
    mlps = [_get(layer, points.mlp, model_type) for layer in layers]
    attentions = [_get(layer, points.attention, model_type) for layer in layers]
    return ResolvedHookPoints(
        model_type=model_type,
        layers=list(layers),
        mlps=mlps,  # type: ignore[arg-type]
        attentions=attentions,  # type: ignore[arg-type]
        final_norm=_get(base, points.final_norm, model_type, optional=True) if points.final_norm else None,
        pre_head=[m for p in points.pre_head if (m := _get(base, p, model_type, optional=True)) is not None],
        lm_head=_get(base, points.lm_head, model_type),  # type: ignore[arg-type]
    )


def output_tensor(output):
    """A module's main output: decoder layers return a tensor or a tuple whose first item is one."""
    return output[0] if isinstance(output, (tuple, list)) else output


def input_tensor(args: tuple, kwargs: dict, name: str = "hidden_states"):
    """The main input of a module call, whether passed positionally or by keyword."""
    return args[0] if args else kwargs[name]


class HookSet:
    """Registers forward hooks for the duration of a ``with`` block, then removes every one of them."""

    def __init__(self):
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, output)`` after ``module`` runs."""
        self._handles.append(module.register_forward_hook(fn))

    def pre_forward(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, kwargs)`` before ``module`` runs (keyword arguments included)."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
