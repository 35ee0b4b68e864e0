"""Vaccine: perturbation-aware alignment (Huang, Hu and Liu, 2024, arXiv 2402.01109).

Alignment (SFT on safe answers) that stays aligned when its hidden activations drift: each step
minimises the alignment loss under the worst-case perturbation, within norm ρ, of every decoder
layer's attention output,

    min_w  max_{‖ε‖ ≤ ρ}  L(w; a_l + ε_l for every layer l),

with the inner maximum taken to first order, in closed form:

    ε_l = ρ · g_l / ‖g‖,   g_l = ∂L/∂a_l,   ‖g‖ = sqrt(Σ_l ‖g_l‖²_F)   (+1e-7 in the denominator).

Reference code: ``git-disl/Vaccine`` at commit ``8937f685a549065be24772130190cb61aac1ad26``,
``trainer.py`` (``VaccineTrainer.training_step`` and its ``pre_first_step`` / ``after_first_step``
/ ``pre_second_step`` hooks), with ``train.py`` and ``script/alignment/Vaccine.sh`` for the settings.

How one micro-step runs (``VaccineTrainer.training_step``):

1. Pass 1. A forward on the batch with a zero *probe* added to the attention output ``a_l`` of every
   layer (output[0] of the architecture's attention module in ``immunize.hooks.ARCHITECTURES``:
   after the output projection, before the residual add, as the reference's hooks on
   ``LlamaAttention`` / ``OPTAttention``). ``torch.autograd.grad`` of the alignment loss with
   respect to the probes gives every g_l exactly, and computes no weight gradient at all.
2. ε from the g_l (a constant: no gradient flows through it).
3. Pass 2. A forward with ε_l added to each a_l, and a backward that accumulates the weight
   gradients the optimizer uses.

The alignment loss L is the next-token cross-entropy on the answer tokens (labels -100 elsewhere,
one shift), averaged over the micro-batch's answer tokens (the model's own mean, as in the
reference). The logs carry, averaged over the micro-steps since the last log: ``alignment_loss``
(L before the perturbation), ``perturbed_loss`` (L under ε, the loss that is trained) and
``perturbation_grad_norm`` (‖g‖; first order, perturbed − alignment ≈ ρ·‖g‖).

Deviations from the reference code, and why:

- Pass 1 takes gradients of the activations only, and leaves every weight's ``.grad`` untouched.
  The reference runs a full backward and then calls ``model.zero_grad()``, which also erases the
  gradients accumulated by earlier micro-batches: with gradient accumulation only the last
  micro-batch survived. Here every micro-batch counts, and pass 1 skips the weight-gradient work.
  Under DDP pass 1 runs under ``no_sync`` (nothing to all-reduce), so only pass 2 synchronises.
- The reference reads g_l with the deprecated module backward hook (``register_backward_hook``),
  which reports the gradient at the module's last operation; the probes give the gradient with
  respect to output[0] itself, on every architecture in the table.
- The reference backpropagates pass 2's loss without dividing it by the accumulation steps (its
  override drops the Trainer's division); here it is divided, as ``Trainer.training_step`` does.
  With accumulation, micro-batches weigh equally (each loss is its own token mean, as in the
  reference), not by token count as Hugging Face's plain SFT weighs them; with one micro-batch per
  step and ρ = 0 the update is exactly plain SFT's.
- ε is computed per micro-batch (as in the reference), so accumulating two micro-batches of b is
  not the same computation as one batch of 2b whenever ρ > 0.
- ε is added at every position, prompt and padding included, as in the reference. Right padding
  is never attended by real tokens, so its gradient, and its ε, are exactly zero.
- Data: the refusal half of the defence split's (harmful, refusal) pairs (``paired_defence_data``:
  one pair per BeaverTails row, the refusals RepNoise's stability term trains on: by default the
  model's own refusal of each question, ``--refusals``), instead of the
  reference's first 2000 BeaverTails ``is_safe`` answers, so the defences here align on the same
  refusals and never on attack or evaluation prompts. A pair whose harmful answer cannot be
  encoded is dropped with its refusal (counted in the data summary; rare at the default context).
- Defaults: full fine-tuning at lr 2e-5 for one epoch, like the other defences here; the
  reference trains a LoRA adapter at lr 1e-3 for 50 epochs. Its recipe is, with these flags:
  ``--use_lora --lora_r 8 --lora_alpha 4 --lora_dropout 0.1 --lora_target_modules
  q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --learning_rate 1e-3
  --num_train_epochs 50``. ρ = 2 (the reference's default and the README's example), batch 5,
  AdamW with weight decay 0.1, cosine schedule with 10% warm-up are the reference's.
- Activation checkpointing is supported (non-reentrant only): the hooks stay registered through
  the backward, so a recomputed layer adds the same probe or ε as its first forward did.
- With dropout, pass 1 and pass 2 draw different dropout masks, as in the reference.
- Several GPUs in one process (``torch.nn.DataParallel``) are refused: the replicas would each see
  a slice of the batch but one ε. DDP is the supported way to use several devices; FSDP and
  DeepSpeed are not tested with the activation-only backward of pass 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather

from immunize.defences.base import Defence, DefenceData
from immunize.defences.paired import RefusalArguments, paired_defence_data
from immunize.errors import ImmunizeError
from immunize.hooks import HookSet, output_tensor, resolve_hook_points
from immunize.prompts import CausalLMCollator
from immunize.training import check_finite

# Added to ‖g‖ so that a zero gradient gives ε = 0 rather than a division by zero (the reference's).
NORM_EPS = 1e-7


@dataclass
class VaccineConfig(RefusalArguments):
    """Vaccine options. ρ, batch size, weight decay and schedule are the reference code's; lr and
    epochs are this project's full fine-tuning defaults (the reference's are for LoRA: see the
    module docstring for its exact flags)."""

    rho: float = field(default=2.0, metadata={
        "help": "norm ρ of the perturbation of all attention outputs together (paper/code default: 2; "
                "0 is plain SFT on the refusals)"})

    learning_rate: float = field(default=2e-5, metadata={
        "help": "peak learning rate (full fine-tuning default; the reference's LoRA alignment uses 1e-3)"})
    per_device_train_batch_size: int = field(default=5, metadata={"help": "refusals per device step (reference: 5)"})
    num_train_epochs: float = field(default=1.0, metadata={
        "help": "epochs over the refusals (full fine-tuning default; the reference's LoRA alignment runs 50)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (reference: 0.1)"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "lr schedule (reference: cosine)"})
    warmup_steps: float = field(default=0.1, metadata={
        "help": "warm-up: steps, or a fraction of all steps if below 1 (reference: 0.1)"})
    output_dir: str = field(default="runs/defend-vaccine", metadata={"help": "where checkpoints and the model go"})

    def __post_init__(self):
        if not math.isfinite(self.rho) or self.rho < 0:
            raise ImmunizeError(f"--rho {self.rho}: must be a finite number >= 0 (the perturbation's norm)")
        super().__post_init__()
        self.require_non_reentrant_checkpointing(
            "Vaccine takes gradients of activations inside checkpointed layers")


def alignment_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's answer tokens (the model shifts the labels once)."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    use_cache=False)
    return outputs.loss


class AttentionShift:
    """Forward hooks that add one tensor per layer to the attention output (output[0]).

    Without ``shifts`` the tensors are zero probes, made at each layer's first call with the
    activation's shape and requiring gradients: the gradient of a loss with respect to a probe is
    its gradient with respect to that attention output. With ``shifts`` they are fixed (ε).
    A layer recomputed by activation checkpointing gets the same tensor again.
    """

    def __init__(self, model: nn.Module, shifts: list[torch.Tensor] | None = None):
        self.modules = resolve_hook_points(model).attentions
        if shifts is not None and len(shifts) != len(self.modules):
            raise ValueError(f"{len(shifts)} shifts for {len(self.modules)} attention modules")
        self.tensors: list[torch.Tensor | None] = list(shifts) if shifts is not None else [None] * len(self.modules)

    def register(self, hooks: HookSet) -> None:
        for index, module in enumerate(self.modules):
            hooks.forward(module, partial(self._add, index))

    def _add(self, index: int, module, args, output):
        activation = output_tensor(output)
        if self.tensors[index] is None:
            self.tensors[index] = torch.zeros_like(activation, requires_grad=True)
        shifted = activation + self.tensors[index]
        return (shifted, *output[1:]) if isinstance(output, (tuple, list)) else shifted

    def probes(self) -> list[torch.Tensor]:
        missing = [i for i, t in enumerate(self.tensors) if t is None]
        if missing:
            raise RuntimeError(f"Vaccine: the attention modules of layers {missing} never ran; "
                               "check the 'attention' entry in immunize.hooks.ARCHITECTURES")
        return self.tensors  # type: ignore[return-value]


def perturbation(grads: list[torch.Tensor], rho: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """ε_l = ρ · g_l / (‖g‖ + 1e-7) over all layers together, and ‖g‖ (computed in fp32)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = rho / (norm + NORM_EPS)
    return [(g.float() * scale).to(g.dtype) for g in grads], norm


class VaccineTrainer(Trainer):
    """``Trainer`` whose step is Vaccine's: the gradient of the alignment loss at the attention
    outputs, then the update under the perturbation it points to (two forwards per micro-step)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise ImmunizeError(f"Vaccine: {self.args.n_gpu} GPUs in one process (DataParallel) would split the "
                                "batch but not its perturbation; launch one process per GPU (accelerate launch, "
                                "torchrun) or make one GPU visible (CUDA_VISIBLE_DEVICES)")
        self._logged: dict[str, list[torch.Tensor]] = {}

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """Both passes on one micro-batch. ``num_items_in_batch`` (the accumulated step's token count)
        is not used: each micro-batch's loss is its own token mean (see the module docstring)."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)

        # Pass 1: g_l = ∂L/∂a_l through zero probes; no weight gradient, nothing for DDP to sync.
        probe = AttentionShift(model)
        with self.accelerator.no_sync(model), HookSet() as hooks:
            probe.register(hooks)
            with self.compute_loss_context_manager():
                clean = alignment_loss(model, inputs)
            grads = torch.autograd.grad(clean, probe.probes())
        shifts, grad_norm = perturbation(list(grads), self.args.rho)
        del grads, probe  # freed before pass 2 builds its graph

        # Pass 2: the loss under ε, and its weight gradients (accumulated like any Trainer step's).
        with HookSet() as hooks:
            AttentionShift(model, shifts).register(hooks)
            with self.compute_loss_context_manager():
                perturbed = alignment_loss(model, inputs)
            check_finite(perturbed, self.state.global_step, self.args.output_dir)
            loss = perturbed / self.current_gradient_accumulation_steps
            self.accelerator.backward(loss)  # hooks still on: checkpointed layers recompute with ε

        for name, value in (("alignment_loss", clean), ("perturbed_loss", perturbed),
                            ("perturbation_grad_norm", grad_norm)):
            self._logged.setdefault(name, []).append(value.detach())
        return loss.detach()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs carry the mean of each term since the last log, over all processes
            logs.update({k: round(nested_gather(torch.stack(v), self.args.parallel_mode).float().mean().item(), 6)
                         for k, v in self._logged.items() if v})
            self._logged.clear()
        super().log(logs, start_time)


def refusal_features(paired: list[dict]) -> list[dict]:
    """The refusal half of ``encode_pairs`` features, as ``CausalLMCollator`` features."""
    return [{"input_ids": f["refusal_input_ids"], "labels": f["refusal_labels"]} for f in paired]


class Vaccine(Defence):
    config_class = VaccineConfig

    def build_data(self, cfg: VaccineConfig, tokenizer) -> DefenceData:
        from immunize.config import fingerprint

        paired = paired_defence_data(cfg, tokenizer)
        features = refusal_features(paired.features)
        summary = {**paired.summary, "features_sha256": fingerprint(features, 64), "refusals_used": len(features)}
        return DefenceData(features=features, prompts=paired.prompts, summary=summary, sources=paired.sources)

    def build_trainer(self, cfg: VaccineConfig, model, tokenizer, data: DefenceData) -> VaccineTrainer:
        resolve_hook_points(model)  # an unsupported architecture fails before training starts
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return VaccineTrainer(model=model, args=cfg, train_dataset=data.features, processing_class=tokenizer,
                              data_collator=CausalLMCollator(pad))
