"""Representation Noising (RepNoise; Rosati et al., NeurIPS 2024, arXiv 2405.14577).

On a batch of pairs (a harmful answer and a refusal to the same question), with the harmful mask
M of ``immunize.defences.paired``:

    L = stability + β·noise − α·log(1 + ascent)

- stability: next-token cross-entropy on the refusals' answer tokens;
- noise: for each chosen decoder layer, the MMD between its activations on the harmful tokens in
  M and standard Gaussian noise (5 RBF kernels, bandwidth multiplier 2, data-driven bandwidth),
  averaged over layers; per sequence (the paper) or per token;
- ascent: cross-entropy of the harmful tokens in M read out from every chosen layer's residual
  stream through the final norm and the LM head (a logit lens), averaged over layers.

How one micro-step runs:

1. One forward of the model on the 2B rows [harmful; refusal] (``logits_to_keep=1``: the model's
   own full-vocabulary logits are not needed). Hooks from the per-architecture table
   (``immunize.hooks``) keep references to the layer outputs and MLP outputs; they do no
   arithmetic, so they are safe inside activation-checkpointed layers.
2. A forward *pre-hook on the LM head* computes all three terms while the model is still inside
   its own forward. Every parameter the terms touch (final norm, LM head) is thus used inside the
   root module's forward, where DDP and FSDP expect it. FSDP constraint: the final norm and the LM
   head must belong to the root FSDP unit (or one unit together), as with the standard
   transformer-layer auto-wrap policy; they are not called through separately wrapped units.
3. The lens and the stability loss gather only the positions they score, then run the LM head in
   chunks (``losses.head_cross_entropy``): memory never grows with layers × sequence × vocabulary.
4. The ``HookSet`` context removes every hook before backward, so activation-checkpointing
   recomputation (which must be non-reentrant: the hooked MLP outputs live inside checkpointed
   layers) never re-runs them and hooks never accumulate across steps.

The noise is drawn per example: each harmful row's Gaussian comes from its own generator, seeded
by ``--seed``, the optimizer step and the row's tokens (``ExampleNoise``), never by the rank, the
micro-batch or the row's place in the batch. A run on 2 ranks with batch b therefore draws exactly
the noise of one process with batch b and 2 accumulation steps (the same micro-batches), and
padding never changes a row's noise: the draw covers the row's tokens in M only.

Labels use -100 and a single shift: the prediction at position p is scored against the label at
p + 1, for the harmful targets and the refusal labels alike.

A sampled lens (``--lens_sampled_readouts k``, off by default). The exact lens reads all n
read-outs (the embeddings, if read, and every chosen layer) through the LM head, which is most of a
step's cost (2.9 of 4.4 TFLOP on SmolLM2). With k > 0 each micro-step reads the deepest read-out
(the output layer under ``--layers all``) and k of the n − 1 others, drawn without replacement by a
generator seeded by ``--seed`` and the optimizer step only: every micro-batch and rank of a step
reads the same read-outs, and a resumed run draws them again. Only those read-outs go through the
LM head (and only their layers are hooked). The ascent is then

    Â = (CE_deepest + (n − 1)/k · Σ_sampled CE_j) / n,

an unbiased estimate of the exact mean A (E[Â] = A) whose variance is that of a sample mean
without replacement: Var(Â) = ((n − 1)/n)² · (1 − k/(n − 1)) · S²/k, S² the variance of the n − 1
other read-outs' CEs. The loss uses −α·log(1 + Â), and log1p is concave, so by Jensen
E[log1p(Â)] ≤ log1p(A): the sampled ascent term, and its gradient ∇Â/(1 + Â), are biased, by about
−Var(Â)/(2(1 + A)²) for the value (second order). The bias shrinks as k grows (k = n − 1 is the
exact lens) and vanishes for ``ascent_form=linear``; ``benchmarks/bench_repnoise_lens.py`` measures
it next to the step-time saving. k ≥ n − 1 reads every read-out: the exact lens.

Per-term diagnostics (``--term_grad_norm_steps N``, 50 by default, 0 off). The logs carry, as means
over the micro-steps since the last log, ``stability``, ``noise``, ``ascent`` (the lens mean A, or Â)
and ``harmful_ce`` (the ascent read at the output layer). On the first micro-batch of the first step,
of every N-th step and of the last step (each such step is logged), they also carry the gradient norm
of each term's weighted contribution to the loss (stability, β·noise, −α·f(ascent)) with respect to
the decoder layers' trainable parameters: ``grad_norm_<term>_last`` (the last decoder layer's),
``_layers`` (Σ_l ‖g_l‖, the sum of the per-layer norms) and ``_all`` (‖g‖ over all decoder layers
together), beside the Trainer's own ``grad_norm`` (the whole step's gradient over every trainable
parameter, before the optimizer step; logged without clipping too). The embeddings, the final norm
and the LM head are left out of the per-term norms: the noise term never reaches the head, and with
tied embeddings (SmolLM2) the embedding matrix *is* the head, whose gradient is dominated by what is
read through it (the stability CE and every lens read-out), not by what the terms do to the layers
the defence is meant to change. Each norm is one
``torch.autograd.grad`` of one term with respect to those parameters (up to three extra backward
passes on a measured step, with the layers' recomputation under activation checkpointing): it
accumulates nothing into ``.grad``, so training is unchanged, and, since ``autograd.grad`` with
explicit inputs runs no ``AccumulateGrad`` node, it never fires the gradient hooks DDP all-reduces
with. Under DDP each rank measures its own micro-batch and the log shows rank 0's; under FSDP and
DeepSpeed (sharded parameters, whose own backward hooks would run) nothing is measured.

Paper defaults (``RepNoiseConfig``): α = 1, β = 0.001, lr 2e-5, batch 8 pairs, one epoch, AdamW without
weight decay, cosine schedule with 10% warm-up, context 256 tokens, no gradient clipping (the
reference clips nothing). The named configurations below inherit them.

Reference: the authors' ``minimality-mmd`` loss (domenicrosati/representation-noising @ 03689ff,
``representation_noising/loss.py``; boyiwei/RepNoise-Reproduce @ a35c98a,
``immunization_llms/training.py``). Deviations, all fixing bugs of the reference: one shift for logits
and labels (the reference masks logits and labels with different shifts, so the first diverging
token is scored from zeroed logits and gets no gradient); -100 as the ignore marker (the reference
drops every label equal to 0); padding never enters a loss (the reference pads with EOS and scores
it); the lens averages over its read-outs *inside* the log, ``log(1 + mean)``, where the reference
divides the sum of 34 read-outs by 33 before adding 1; hook points from a per-architecture table
(the reference names Llama modules); the lens never materializes full-vocabulary logits per layer.

Two baselines of the RepNoise paper's table are this trainer with terms switched off, registered
as named configurations in ``immunize.defences`` (the reference's branches of the same names):

- ``gradient-ascent`` (``ascent_loss``): no noise term, ``ascent_form=log``:
  ``CE(refusal) − α·log(mean lens CE)``, the ascent read through every layer (the reference also
  counts the final logits twice: once as the model's, once as the doubly-normalized last state);
- ``adversarial-loss`` (``adversarial_loss``): no noise term, the ascent read at the output only,
  ``ascent_form=linear``, α = λ = 0.1: ``CE(refusal) − λ·CE(harmful)``, unbounded as in the code.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
from transformers import Trainer, TrainerCallback

from immunize.defences.base import Defence, DefenceData
from immunize.defences.losses import BANDWIDTHS, head_cross_entropy, mmd_rbf, mmd_rbf_checkpointed
from immunize.defences.paired import PairedCollator, RefusalArguments, paired_defence_data
from immunize.errors import ImmunizeError
from immunize.hooks import HookSet, ResolvedHookPoints, input_tensor, output_tensor, resolve_hook_points
from immunize.prompts import IGNORE_INDEX
from immunize.training import check_finite

log = logging.getLogger(__name__)

ACTIVATIONS = ("mlp", "residual")
MMD_LEVELS = ("sequence", "token")
ABLATIONS = ("stability", "noise", "ascent", "lens", "mask")
# How the ascent enters the loss: −α·log(1 + A) (RepNoise), −α·log(A) (the reference code's
# gradient-ascent baseline, ``ascent_loss``) or −α·A (its adversarial-loss baseline, unbounded).
ASCENT_FORMS = ("log1p", "log", "linear")


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def select_layers(spec: str, num_layers: int) -> list[int]:
    """``all`` or a comma list of indices (negative counts from the end) and inclusive ranges ``a-b``."""
    if spec.strip() == "all":
        return list(range(num_layers))
    chosen: set[int] = set()
    for item in _split_list(spec):
        try:
            if "-" in item[1:]:
                lo, hi = (int(x) for x in item.split("-", 1))
                if lo > hi:
                    raise ValueError
                indices = range(lo, hi + 1)
            else:
                indices = [int(item)]
        except ValueError:
            raise ImmunizeError(f"--layers {spec!r}: {item!r} is not an index or a range a-b") from None
        for i in indices:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ImmunizeError(f"--layers {spec!r}: layer {i} out of range (the model has {num_layers})")
            chosen.add(j)
    if not chosen:
        raise ImmunizeError(f"--layers {spec!r}: no layers chosen")
    return sorted(chosen)


@dataclass(frozen=True)
class RepNoiseOptions:
    """The loss's own options (``RepNoiseConfig.loss_options()``); usable without a Trainer."""

    alpha: float = 1.0
    beta: float = 0.001
    activations: str = "mlp"
    layers: str = "all"
    lens_embeddings: bool = True
    mmd_level: str = "sequence"
    mmd_kernels: int = 5
    mmd_multiplier: float = 2.0
    mmd_bandwidth: str = "mean"
    ablate: frozenset[str] = frozenset()
    lens_chunk_tokens: int = 0
    ascent_form: str = "log1p"
    lens_sampled_readouts: int = 0

    def uses(self, term: str) -> bool:
        return term not in self.ablate


@dataclass
class RepNoiseConfig(RefusalArguments):
    """RepNoise options; training defaults are the paper's.

    Adam (AdamW, no weight decay), lr 2e-5, batch 8 pairs, one epoch, cosine schedule, 10% warm-up,
    context 256 tokens (``--max_length``), no gradient clipping (``--max_grad_norm 0``).
    """

    not_identity: ClassVar[frozenset[str]] = RefusalArguments.not_identity | {"term_grad_norm_steps"}

    alpha: float = field(default=1.0, metadata={"help": "weight α of the ascent term −α·log(1 + ascent)"})
    beta: float = field(default=0.001, metadata={"help": "weight β of the noise (MMD) term"})
    activations: str = field(default="mlp", metadata={
        "help": "activations pushed towards noise: mlp (each layer's MLP output, the paper) or residual "
                "(each layer's output residual stream)"})
    layers: str = field(default="all", metadata={
        "help": "decoder layers for the noise and lens terms: all, or indices/ranges like 0-9,20,-1"})
    lens_embeddings: bool = field(default=True, metadata={
        "help": "also read the embedding output (input of layer 0) through the lens, as the paper's code"})
    mmd_level: str = field(default="sequence", metadata={
        "help": "sequence (a sample per sequence's masked activations, the paper) or token (per token)"})
    mmd_kernels: int = field(default=5, metadata={"help": "number of RBF kernels in the MMD"})
    mmd_multiplier: float = field(default=2.0, metadata={"help": "bandwidth ratio of consecutive kernels"})
    mmd_bandwidth: str = field(default="mean", metadata={
        "help": "base bandwidth from the pooled squared distances: mean (the paper's code) or median"})
    ablate: str = field(default="", metadata={
        "help": f"comma list of terms to switch off (paper ablations): {', '.join(ABLATIONS)}; "
                "'lens' reads the ascent from the output only, 'mask' scores every harmful token"})
    ascent_form: str = field(default="log1p", metadata={
        "help": "how the ascent A enters the loss: log1p (−α·log(1 + A), RepNoise), log (−α·log A, the "
                "reference gradient-ascent baseline) or linear (−α·A, the reference adversarial loss)"})
    lens_chunk_tokens: int = field(default=0, metadata={
        "help": "rows per LM-head chunk in the lens (0: about 64 MiB of fp32 logits per chunk)"})
    lens_sampled_readouts: int = field(default=0, metadata={
        "help": "k > 0: each step's lens reads the output layer and k other read-outs (layers, embeddings) "
                "drawn per step from --seed and the step, weighted to an unbiased estimate of the mean over "
                "all read-outs; −log1p of it is biased (Jensen; see the module docstring). 0: every read-out, "
                "exact (the paper)"})
    term_grad_norm_steps: int = field(default=50, metadata={
        "help": "log each term's gradient norm at the last decoder layer and over all layers on the first step, "
                "the last and every N-th (0: never); costs up to 3 extra backward passes on those steps, "
                "changes no result"})

    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate (paper: 2e-5)"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "pairs per device step (paper: 8)"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs over the pairs (paper: 1)"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "lr schedule (paper: cosine)"})
    warmup_steps: float = field(default=0.1, metadata={
        "help": "warm-up: steps, or a fraction of all steps if below 1 (paper: 0.1)"})
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "gradient clipping norm, 0 for none (paper: none, the reference clips nothing)"})
    output_dir: str = field(default="runs/defend-repnoise",
                            metadata={"help": "where checkpoints and the model go"})

    def __post_init__(self):
        for name, value, choices in (("activations", self.activations, ACTIVATIONS),
                                     ("mmd_level", self.mmd_level, MMD_LEVELS),
                                     ("mmd_bandwidth", self.mmd_bandwidth, BANDWIDTHS),
                                     ("ascent_form", self.ascent_form, ASCENT_FORMS)):
            if value not in choices:
                raise ImmunizeError(f"--{name} {value!r}: use one of {', '.join(choices)}")
        unknown = set(_split_list(self.ablate)) - set(ABLATIONS)
        if unknown:
            raise ImmunizeError(f"--ablate: unknown term(s) {', '.join(sorted(unknown))} "
                                f"(use {', '.join(ABLATIONS)})")
        if {"stability", "noise", "ascent"} <= set(_split_list(self.ablate)):
            raise ImmunizeError("--ablate: stability, noise and ascent all off leaves nothing to train")
        if self.alpha < 0 or self.beta < 0:
            raise ImmunizeError("--alpha and --beta must be non-negative")
        if self.mmd_kernels < 1 or self.mmd_multiplier <= 0:
            raise ImmunizeError("--mmd_kernels must be >= 1 and --mmd_multiplier > 0")
        if self.lens_chunk_tokens < 0:
            raise ImmunizeError("--lens_chunk_tokens must be >= 0")
        if self.term_grad_norm_steps < 0:
            raise ImmunizeError(f"--term_grad_norm_steps {self.term_grad_norm_steps}: must be >= 0 (0: never)")
        if self.lens_sampled_readouts < 0:
            raise ImmunizeError(f"--lens_sampled_readouts {self.lens_sampled_readouts}: must be >= 0 (0: exact lens)")
        if self.layers.strip() != "all":
            select_layers(self.layers, 10**6)  # syntax now; the range once the model is loaded
        super().__post_init__()
        self.require_non_reentrant_checkpointing("RepNoise reads activations inside checkpointed layers")

    def loss_options(self) -> RepNoiseOptions:
        return RepNoiseOptions(
            alpha=self.alpha, beta=self.beta, activations=self.activations, layers=self.layers,
            lens_embeddings=self.lens_embeddings, mmd_level=self.mmd_level, mmd_kernels=self.mmd_kernels,
            mmd_multiplier=self.mmd_multiplier, mmd_bandwidth=self.mmd_bandwidth,
            ablate=frozenset(_split_list(self.ablate)), lens_chunk_tokens=self.lens_chunk_tokens,
            ascent_form=self.ascent_form, lens_sampled_readouts=self.lens_sampled_readouts,
        )


@dataclass
class RepNoiseTerms:
    """One micro-batch's loss terms (tensors carry gradients; ``None`` when ablated)."""

    stability: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    ascent: torch.Tensor | None = None
    lens_readouts: list[int] = field(default_factory=list)  # read this step, lens order (EMBEDDINGS = -1)
    ascent_per_layer: list[float] = field(default_factory=list)  # the CE of each of lens_readouts
    noise_per_layer: list[float] = field(default_factory=list)
    harmful_ce: float | None = None  # ascent read from the output (the last layer), for logging
    harmful_tokens: int = 0
    refusal_tokens: int = 0

    def weighted(self, options: RepNoiseOptions) -> dict[str, torch.Tensor]:
        """Each term's contribution to the loss: stability, β·noise, −α·f(ascent)."""
        parts = {}
        if self.stability is not None:
            parts["stability"] = self.stability
        if self.noise is not None:
            parts["noise"] = options.beta * self.noise
        if self.ascent is not None:
            bounded = {"log1p": torch.log1p, "log": torch.log, "linear": lambda a: a}[options.ascent_form]
            parts["ascent"] = -options.alpha * bounded(self.ascent)
        return parts

    def loss(self, options: RepNoiseOptions) -> torch.Tensor:
        return torch.stack(list(self.weighted(options).values())).sum()


class ExampleNoise:
    """Standard Gaussian noise for the harmful rows of one forward, drawn per example.

    Row r's generator is seeded by ``(seed, step)`` and the row's own tokens (padding excluded),
    so its noise is the same whichever rank, micro-batch or batch position the row lands in. Each
    call draws, for every row, one value per token in the mask (row-major, as ``acts[mask]``
    orders them), continuing each row's stream; the layers call it in layer order.
    """

    def __init__(self, seed: int, step: int, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.generators = []
        for ids, keep in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            tokens = [t for t, k in zip(ids, keep, strict=True) if k]
            self.generators.append(torch.Generator(device=input_ids.device).manual_seed(
                example_seed(seed, step, tokens)))

    def tokens(self, mask: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        """(tokens in ``mask``, ``width``) noise, rows in order."""
        counts = mask.sum(1).tolist()
        return torch.cat([torch.randn(n, width, generator=g, device=mask.device, dtype=dtype)
                          for g, n in zip(self.generators, counts, strict=True)])


def example_seed(seed: int, step: int, tokens: list[int]) -> int:
    """A 63-bit seed from the run's seed, the optimizer step and one example's tokens."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{seed}/{step}/".encode())
    digest.update(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


EMBEDDINGS = -1  # the lens read-out of the embedding output (the input of layer 0)


def lens_readouts(options: RepNoiseOptions, num_layers: int) -> tuple[int, ...]:
    """Every read-out of the exact lens, in lens order (``EMBEDDINGS`` first if read, then the chosen
    layers); the deepest is last. Empty without the ascent; the last layer only without the lens."""
    if not options.uses("ascent"):
        return ()
    if not options.uses("lens"):
        return (num_layers - 1,)
    layers = tuple(select_layers(options.layers, num_layers))
    return ((EMBEDDINGS,) if options.lens_embeddings else ()) + layers


@dataclass(frozen=True)
class LensDraw:
    """The read-outs one step's lens reads. The deepest read-out is always read, with weight 1;
    each other read-out read has weight ``weight``: (n − 1)/k when k of the n − 1 others are sampled,
    1 when all are (the exact lens)."""

    readouts: tuple[int, ...]  # every read-out of the exact lens (n of them)
    read: tuple[int, ...]  # those read this step, in lens order (the deepest last)
    weight: float = 1.0

    @property
    def exact(self) -> bool:
        return len(self.read) == len(self.readouts)


def lens_seed(seed: int, step: int) -> int:
    """A 63-bit seed for one step's lens draw: the same on every rank and micro-batch of the step."""
    digest = hashlib.blake2b(f"{seed}/{step}/lens".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def draw_lens(options: RepNoiseOptions, num_layers: int, *, seed: int, step: int) -> LensDraw:
    """The deepest read-out and ``options.lens_sampled_readouts`` others sampled without replacement
    (all of them when that is 0 or at least n − 1)."""
    readouts = lens_readouts(options, num_layers)
    others, k = readouts[:-1], options.lens_sampled_readouts
    if not k or k >= len(others):
        return LensDraw(readouts, readouts)
    generator = torch.Generator().manual_seed(lens_seed(seed, step))
    picked = set(torch.randperm(len(others), generator=generator)[:k].tolist())
    read = tuple(r for j, r in enumerate(others) if j in picked) + readouts[-1:]
    return LensDraw(readouts, read, len(others) / k)


class _Readout:
    """The hooks of one RepNoise forward and the loss terms they produce."""

    def __init__(self, points: ResolvedHookPoints, options: RepNoiseOptions, batch: dict, noise: ExampleNoise,
                 lens: LensDraw):
        self.points, self.options, self.noise, self.lens = points, options, noise, lens
        last = points.num_layers - 1
        self.layers = select_layers(options.layers, points.num_layers)
        # Only the read-outs this step reads are kept (a sampled lens hooks only the sampled layers).
        lens_layers = {i for i in lens.read if i != EMBEDDINGS}
        self.lens_embeddings = EMBEDDINGS in lens.read
        noise_residual = options.uses("noise") and options.activations == "residual"
        self.residual_layers = sorted(lens_layers | ({last} if options.uses("stability") else set())
                                      | (set(self.layers) if noise_residual else set()))
        self.mlp_layers = self.layers if options.uses("noise") and options.activations == "mlp" else []

        self.batch_size = batch["harmful_targets"].shape[0]
        self.mask = batch["harmful_mask"]
        # Single shift: the prediction at p scores the label at p + 1.
        harmful, refusal = batch["harmful_targets"], batch["refusal_labels"]
        self.harm_rows, self.harm_pos = (harmful[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        self.harm_targets = harmful[self.harm_rows, self.harm_pos + 1]
        ref_rows, self.ref_pos = (refusal[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        self.ref_targets = refusal[ref_rows, self.ref_pos + 1]
        self.ref_rows = ref_rows + self.batch_size

        self.residual: dict[int, torch.Tensor] = {}
        self.mlp: dict[int, torch.Tensor] = {}
        self.embeddings: torch.Tensor | None = None
        self.terms: RepNoiseTerms | None = None
        self._in_head = False

    def register(self, hooks: HookSet) -> None:
        for i in self.residual_layers:
            hooks.forward(self.points.layers[i], partial(self._keep, self.residual, i))
        for i in self.mlp_layers:
            hooks.forward(self.points.mlps[i], partial(self._keep, self.mlp, i))
        if self.lens_embeddings:
            hooks.pre_forward(self.points.layers[0], self._keep_embeddings)
        hooks.pre_forward(self.points.lm_head, self._on_head)

    # Capture hooks: references only, no arithmetic (see the module docstring).
    @staticmethod
    def _keep(store: dict, index: int, module, args, output) -> None:
        store[index] = output_tensor(output)

    def _keep_embeddings(self, module, args, kwargs) -> None:
        self.embeddings = input_tensor(args, kwargs)

    def _on_head(self, module, args, kwargs) -> None:
        if self._in_head:  # the lens calling the head itself (non-Linear heads)
            return
        if self.terms is not None:
            raise RuntimeError("RepNoise: the LM head ran twice in one forward (one forward per micro-step)")
        self._in_head = True
        try:
            self.terms = self._compute()
        finally:
            self._in_head = False
            self.residual.clear()
            self.mlp.clear()
            self.embeddings = None

    def _lens(self, hidden: torch.Tensor, targets: torch.Tensor,
              weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return head_cross_entropy(self.points.head_input(hidden), self.points.lm_head, targets,
                                  self.options.lens_chunk_tokens or None, weights)

    def _compute(self) -> RepNoiseTerms:
        terms = RepNoiseTerms(harmful_tokens=len(self.harm_targets), refusal_tokens=len(self.ref_targets))
        last = self.points.num_layers - 1
        if self.options.uses("stability"):
            hidden = self.residual[last][self.ref_rows, self.ref_pos]
            total, _ = self._lens(hidden, self.ref_targets)
            terms.stability = total / max(len(self.ref_targets), 1)
        if self.lens.read:
            states = [self.embeddings if i == EMBEDDINGS else self.residual[i] for i in self.lens.read]
            n = len(self.harm_targets)
            hidden = torch.cat([s[self.harm_rows, self.harm_pos] for s in states])
            weights = None
            if not self.lens.exact:  # a sampled read-out stands for (readouts − 1)/k of them
                weights = torch.full((len(states), n), self.lens.weight, device=hidden.device)
                weights[-1] = 1.0
                weights = weights.flatten()
            total, per_row = self._lens(hidden, self.harm_targets.repeat(len(states)), weights)
            terms.ascent = total / max(n * len(self.lens.readouts), 1)
            per_layer = per_row.view(len(states), n).mean(1) if n else per_row.new_zeros(len(states))
            terms.lens_readouts = list(self.lens.read)
            terms.ascent_per_layer = per_layer.tolist()
            if self.lens.read[-1] == last:
                terms.harmful_ce = terms.ascent_per_layer[-1]
        if self.options.uses("noise"):
            store = self.mlp if self.options.activations == "mlp" else self.residual
            # Some MLPs (OPT's fc2) see the batch flattened to (rows × positions, d).
            rows, width = self.mask.shape[0] * 2, self.mask.shape[1]
            values = [self._mmd(store[i].reshape(rows, width, -1)[: self.batch_size]) for i in self.layers]
            stacked = torch.stack(values)
            terms.noise = stacked.mean()
            terms.noise_per_layer = stacked.detach().tolist()
        return terms

    def _mmd(self, acts: torch.Tensor) -> torch.Tensor:
        kwargs = dict(kernels=self.options.mmd_kernels, multiplier=self.options.mmd_multiplier,
                      bandwidth=self.options.mmd_bandwidth)
        drawn = self.noise.tokens(self.mask, acts.shape[-1], acts.dtype)
        if self.options.mmd_level == "sequence":
            # One sample per sequence: its activations at the tokens in M, zero elsewhere (the paper).
            keep = self.mask[..., None].to(acts.dtype)
            noise = acts.new_zeros(acts.shape)
            noise[self.mask] = drawn
            return mmd_rbf((acts * keep).flatten(1), noise.flatten(1), **kwargs)
        return mmd_rbf_checkpointed(acts[self.mask], drawn, **kwargs)


def repnoise_loss(model, batch: dict, options: RepNoiseOptions, *, seed: int = 0, step: int = 0):
    """One forward of ``model`` on a ``PairedCollator`` batch; returns ``(loss, terms, outputs)``.

    ``seed`` and ``step`` seed the noise of each harmful example (``ExampleNoise``) and, with a
    sampled lens, the step's read-outs (``draw_lens``)."""
    points = resolve_hook_points(model)
    harmful = batch["harmful_targets"].shape[0]
    noise = ExampleNoise(seed, step, batch["input_ids"][:harmful], batch["attention_mask"][:harmful])
    lens = draw_lens(options, points.num_layers, seed=seed, step=step)
    readout = _Readout(points, options, batch, noise, lens)
    with HookSet() as hooks:
        readout.register(hooks)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False, logits_to_keep=1)
    if readout.terms is None:
        raise RuntimeError(f"RepNoise: the LM head of {points.model_type!r} never ran; "
                           "check its entry in immunize.hooks.ARCHITECTURES")
    return readout.terms.loss(options), readout.terms, outputs


def decoder_layer_parameters(model) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters of each decoder layer, in layer order (LoRA adapters, under PEFT)."""
    return [[p for p in layer.parameters() if p.requires_grad] for layer in resolve_hook_points(model).layers]


def term_grad_norms(parts: dict[str, torch.Tensor], layers: list[list[torch.nn.Parameter]]) -> dict[str, float]:
    """For each loss part, the norm of its gradient with respect to ``layers``' parameters: at the
    last layer (``grad_norm_<part>_last``), summed over the per-layer norms (``_layers``) and over all
    layers together (``_all``). One ``autograd.grad`` per part, the graph kept for the real backward;
    nothing is accumulated into any ``.grad``."""
    flat = [p for layer in layers for p in layer]
    out: dict[str, float] = {}
    for name, part in parts.items():
        grads = (torch.autograd.grad(part, flat, retain_graph=True, allow_unused=True)
                 if part.requires_grad else [None] * len(flat))
        squares, start = [], 0
        for layer in layers:
            chunk = [g.float().pow(2).sum().to(part.device) for g in grads[start:start + len(layer)] if g is not None]
            squares.append(torch.stack(chunk).sum() if chunk else part.new_zeros((), dtype=torch.float32))
            start += len(layer)
        per_layer = torch.stack(squares).sqrt()
        values = torch.stack([per_layer[-1], per_layer.sum(), per_layer.square().sum().sqrt()]).tolist()
        out.update({f"grad_norm_{name}_{key}": v for key, v in zip(("last", "layers", "all"), values, strict=True)})
    return out


class _LogMeasuredSteps(TrainerCallback):
    """Makes a step whose term gradients were measured a logging step (the first step, when
    ``--logging_steps`` is larger), so that each measurement lands in its own step's log."""

    def __init__(self, trainer: RepNoiseTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer._grad_norms:
            control.should_log = True
        return control


class RepNoiseTrainer(Trainer):
    """``Trainer`` whose loss is RepNoise's: one forward per micro-step on [harmful; refusal] rows."""

    # compute_loss returns a per-micro-batch mean; Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_options: RepNoiseOptions = self.args.loss_options()
        self._logged: dict[str, list[float]] = {}
        self._grad_norms: dict[str, float] = {}  # measured this step, written by its log
        self._grad_norms_step = -1
        # Sharded parameters are gathered and reduced by the engine's own backward hooks, which an
        # extra autograd.grad would run (see the module docstring).
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        every = self.args.term_grad_norm_steps
        self.measures_grad_norms = bool(every) and not sharded
        if every and sharded:
            log.warning("--term_grad_norm_steps: not measured under FSDP or DeepSpeed (sharded parameters)")
        self.add_callback(_LogMeasuredSteps(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The noise and the lens draw are seeded per step (the noise also per example), not per
        # rank: resumes and other world sizes draw the same for the same examples.
        loss, terms, outputs = repnoise_loss(model, inputs, self.loss_options, seed=self.args.seed,
                                             step=self.state.global_step)
        check_finite(loss, self.state.global_step, self.args.output_dir)
        if model.training:
            for name in ("stability", "noise", "ascent"):
                value = getattr(terms, name)
                if value is not None:
                    self._logged.setdefault(name, []).append(value.item())
            if terms.harmful_ce is not None:
                self._logged.setdefault("harmful_ce", []).append(terms.harmful_ce)
            if self._measures_this_micro_batch():
                self._grad_norms = term_grad_norms(terms.weighted(self.loss_options), decoder_layer_parameters(model))
                self._grad_norms_step = self.state.global_step
        return (loss, outputs) if return_outputs else loss

    def _measures_this_micro_batch(self) -> bool:
        """The first micro-batch of the first step, of every ``--term_grad_norm_steps``-th and of the last."""
        step = self.state.global_step
        if not self.measures_grad_norms or step == self._grad_norms_step:
            return False
        upcoming = step + 1  # the step number its log will carry
        return upcoming == 1 or upcoming >= self.state.max_steps or upcoming % self.args.term_grad_norm_steps == 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs carry the mean of each term since the last log
            logs.update({k: round(sum(v) / len(v), 6) for k, v in self._logged.items() if v})
            self._logged.clear()
            logs.update({k: float(f"{v:.6g}") for k, v in self._grad_norms.items()})
            self._grad_norms = {}
        super().log(logs, start_time)


class RepNoise(Defence):
    config_class = RepNoiseConfig

    def build_data(self, cfg: RepNoiseConfig, tokenizer) -> DefenceData:
        return paired_defence_data(cfg, tokenizer)

    def build_trainer(self, cfg: RepNoiseConfig, model, tokenizer, data: DefenceData) -> RepNoiseTrainer:
        select_layers(cfg.layers, resolve_hook_points(model).num_layers)  # the range, now that it is known
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        collator = PairedCollator(pad, all_tokens="mask" in cfg.loss_options().ablate)
        return RepNoiseTrainer(model=model, args=cfg, train_dataset=data.features, processing_class=tokenizer,
                               data_collator=collator)
