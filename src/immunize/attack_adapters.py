"""Attack-time adapters: a frozen PEFT LoRA adapter that a defended checkpoint ships beside its
weights, switched on while the model is fine-tuned and off whenever it is scored or saved.

A defence that sets ``Defence.attack_adapter`` (e.g. security vectors, Zhou et al. 2023) saves its
adapter into that subfolder of the checkpoint and names it in the completion marker. Every attack
run (``immunize.attacks.runner``) then trains the checkpoint's weights with the adapter attached:

- **Forward**: exactly PEFT's LoRA forward for an unmerged adapter, ``y + B(A(dropout(x)))·s``
  with ``s = alpha / r`` (``alpha / √r`` for rsLoRA), computed in fp32 like PEFT's default
  adapter autocast, dropout active in train mode only.
- **Frozen and invisible**: A and B are non-persistent buffers of the adapted modules, applied by
  forward hooks (``immunize.hooks.HookSet``). They are no parameters, so no optimizer sees them,
  and they are not in any state dict, so the Trainer's checkpoints (and their resume), the curve's
  saved models and the final checkpoint hold the trained weights only, and an attack's own LoRA
  is the only adapter that ``merge_and_unload`` can merge. PEFT modules would be visible to all of
  these: a ``PeftModel``'s checkpoints keep adapters only (a resumed full fine-tune would lose its
  trained weights), and a merge merges every active adapter.
- **Where**: the modules are named by the adapter's own weight keys and resolved on the unwrapped
  model; a module an attack's LoRA has wrapped since is adapted at its base layer, so the result
  is the same whichever was attached first.
- **Off**: ``adapter_disabled(model)`` while the resistance curve scores the model; leaving the
  ``attack_adapter`` block removes the hooks and buffers before the attacked model is saved.

Only plain LoRA adapters on linear layers (``nn.Linear``, GPT-2's ``Conv1D``) are accepted; any
adapter option that changes the forward (DoRA, per-module ranks, biases, ...) is refused with one
line naming it, rather than applied wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from immunize.errors import ImmunizeError
from immunize.hooks import HookSet, unwrap_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's key prefix: the keys after it are module paths of the causal LM
_ATTRIBUTE = "immunize_attack_adapter"  # on the unwrapped model: the adapter attached to it
_BUFFER_A, _BUFFER_B = "immunize_attack_adapter_A", "immunize_attack_adapter_B"

# adapter_config.json options that do not change an unmerged LoRA forward (which modules carry
# the adapter is read from the weights; how it was initialized does not matter once trained).
_HARMLESS = frozenset({
    "peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "fan_in_fan_out",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "init_lora_weights",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size",
    "ensure_weight_tying",
})


def declared_adapter(model_dir: str | Path) -> Path | None:
    """The attack-time adapter folder that the checkpoint ``model_dir`` declares, or None."""
    from immunize.method_runner import is_complete

    path = Path(model_dir)
    marker = is_complete(path) if path.is_dir() else None
    name = (marker or {}).get("attack_adapter")
    if not name:
        return None
    folder = path / name
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / file).is_file():
            raise ImmunizeError(f"{folder}: the checkpoint declares this attack-time adapter but {file} is missing")
    return folder


def _number(config: dict, key: str, where: Path) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ImmunizeError(f"{where}: '{key}' must be a number, got {value!r}")
    return float(value)


class AttackAdapter:
    """A PEFT LoRA adapter folder, read and checked; ``attach`` applies it to models (frozen)."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        from immunize.io import file_sha256, read_json

        self.folder = Path(folder)
        config_path = self.folder / ADAPTER_CONFIG
        config = read_json(config_path)
        if config.get("peft_type") != "LORA":
            raise ImmunizeError(f"{config_path}: peft_type {config.get('peft_type')!r}: only LORA adapters "
                                "can be attached at attack time")
        for key, value in sorted(config.items()):
            if key not in _HARMLESS and value not in (None, False, {}, [], ""):
                raise ImmunizeError(f"{config_path}: option {key}={value!r} changes the LoRA forward and "
                                    "is not supported for attack-time adapters")
        if config.get("bias", "none") != "none":
            raise ImmunizeError(f"{config_path}: bias={config['bias']!r}: attack-time adapters carry no biases")
        self.r = int(_number(config, "r", config_path))
        self.alpha = _number(config, "lora_alpha", config_path)
        self.dropout = _number(config, "lora_dropout", config_path)
        if self.r < 1 or not 0 <= self.dropout < 1:
            raise ImmunizeError(f"{config_path}: r={self.r}, lora_dropout={self.dropout}: need r >= 1 and "
                                "0 <= lora_dropout < 1")
        self.scaling = self.alpha / (math.sqrt(self.r) if config.get("use_rslora") else self.r)

        weights_path = self.folder / ADAPTER_WEIGHTS
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(weights_path).items():
            body = key.removeprefix(_PREFIX)
            for part in ("A", "B"):
                suffix = f".lora_{part}.weight"
                if key.startswith(_PREFIX) and body.endswith(suffix):
                    # fp32 whatever the file holds, as PEFT's default adapter autocast
                    pairs.setdefault(body.removesuffix(suffix), {})[part] = tensor.float()
                    break
            else:
                raise ImmunizeError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight of a module")
        if not pairs:
            raise ImmunizeError(f"{weights_path}: no LoRA weights")
        for path, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise ImmunizeError(f"{weights_path}: module {path} has lora_{''.join(pair)} but not both A and B")
            a, b = pair["A"], pair["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != self.r or b.shape[1] != self.r:
                raise ImmunizeError(f"{weights_path}: module {path}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                                    f"are not a rank-{self.r} pair")
        self.weights = dict(sorted(pairs.items()))
        self.sha256 = file_sha256(weights_path)
        self.enabled = True
        self._hooks: HookSet | None = None
        self._attached: list[tuple[nn.Module, list[nn.Module]]] = []

    def facts(self) -> dict[str, Any]:
        """What model cards and completion markers record about the adapter."""
        return {"weights_sha256": self.sha256, "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "scaling": self.scaling, "modules": len(self.weights),
                "module_names": sorted({p.rsplit(".", 1)[-1] for p in self.weights})}

    # ---- attaching -------------------------------------------------------------------------------

    def __enter__(self) -> AttackAdapter:
        self._hooks = HookSet()
        return self

    def __exit__(self, *exc) -> None:
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.remove()
        for root, modules in self._attached:
            for module in modules:
                delattr(module, _BUFFER_A)
                delattr(module, _BUFFER_B)
            delattr(root, _ATTRIBUTE)
        self._attached.clear()

    def attach(self, model: nn.Module) -> None:
        """Apply the adapter to ``model`` (plain, PEFT-wrapped or distributed) until the block ends."""
        if self._hooks is None:
            raise RuntimeError("AttackAdapter.attach: use it inside its `with` block")
        root = unwrap_model(model)
        if getattr(root, _ATTRIBUTE, None) is not None:
            raise RuntimeError("AttackAdapter.attach: the model already carries an attack-time adapter")
        modules = [self._target(root, path) for path in self.weights]
        for module, pair in zip(modules, self.weights.values(), strict=True):
            # Buffers follow the module through .to() and device placement; non-persistent ones
            # stay out of every state dict.
            device = module.weight.device
            module.register_buffer(_BUFFER_A, pair["A"].to(device), persistent=False)
            module.register_buffer(_BUFFER_B, pair["B"].to(device), persistent=False)
            self._hooks.forward(module, self._add_delta)
        setattr(root, _ATTRIBUTE, self)
        self._attached.append((root, modules))

    def _target(self, root: nn.Module, path: str) -> nn.Module:
        try:
            module = root.get_submodule(path)
        except AttributeError:
            raise ImmunizeError(f"{self.folder}: the adapter adapts {path}, which this model does not have "
                                "(an adapter of another architecture?)") from None
        base = module.get_base_layer() if callable(getattr(module, "get_base_layer", None)) else module
        dims = _linear_dims(base)
        pair = self.weights[path]
        if dims is None or dims != (pair["A"].shape[1], pair["B"].shape[0]):
            raise ImmunizeError(f"{self.folder}: {path} is {type(base).__name__} {dims}; the adapter needs a "
                                f"linear layer {pair['A'].shape[1]} → {pair['B'].shape[0]}")
        return base

    def _add_delta(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled:
            return None
        if not args:
            raise RuntimeError("attack-time adapter: the adapted layer was called without a positional input")
        a, b = getattr(module, _BUFFER_A), getattr(module, _BUFFER_B)
        x = nn.functional.dropout(args[0].to(a.dtype), self.dropout, module.training)
        delta = nn.functional.linear(nn.functional.linear(x, a), b) * self.scaling
        return (output + delta).to(output.dtype)


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer: ``nn.Linear`` or GPT-2's transposed ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        fan_in, fan_out = module.weight.shape
        return int(fan_in), int(fan_out)
    return None


@contextmanager
def attack_adapter(model_dir: str | Path, model: nn.Module) -> Iterator[AttackAdapter | None]:
    """Attach the adapter that checkpoint ``model_dir`` declares (if any) to ``model`` for the block;
    yields it, or None when the checkpoint declares none."""
    folder = declared_adapter(model_dir)
    if folder is None:
        yield None
        return
    with AttackAdapter(folder) as adapter:
        adapter.attach(model)
        yield adapter


def adapter_of(model: nn.Module) -> AttackAdapter | None:
    """The attack-time adapter attached to ``model`` (through any wrapper), or None."""
    return getattr(unwrap_model(model), _ATTRIBUTE, None)


def attach_like(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the adapter ``source`` carries (a DPO reference is the attack's starting policy)."""
    if (adapter := adapter_of(source)) is not None:
        adapter.attach(target)


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Switch the attack-time adapter of ``model`` off for the block (a no-op without one)."""
    adapter = adapter_of(model)
    if adapter is None:
        yield
        return
    previous, adapter.enabled = adapter.enabled, False
    try:
        yield
    finally:
        adapter.enabled = previous
