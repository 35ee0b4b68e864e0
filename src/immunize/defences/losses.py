"""Loss pieces shared by defences: multi-bandwidth RBF MMD and a chunked LM-head cross-entropy.

``head_cross_entropy`` is the memory-bounded read-out behind RepNoise's logit lens: it never holds
more than one chunk of full-vocabulary logits. For a plain ``nn.Linear`` head it is fused: each
chunk's logits give the loss *and* the gradients with respect to the inputs and the head weights in
the same pass (three matrix products per chunk, the minimum for exact gradients), and only those
gradients are kept for backward. Any other head (a LoRA-wrapped one, say) is evaluated chunk by
chunk under non-reentrant activation checkpointing (one extra head product per chunk). Optional
per-row weights scale each row's term in the sum (a sampled logit lens weighs its sampled read-outs
up to stand for the ones it skipped).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Bytes of fp32 logits per chunk when the caller does not choose a chunk size.
DEFAULT_CHUNK_BYTES = 64 * 2**20
BANDWIDTHS = ("mean", "median")


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, *, kernels: int = 5, multiplier: float = 2.0,
            bandwidth: str = "mean") -> torch.Tensor:
    """Biased MMD² between samples ``x`` (n, d) and ``y`` (m, d) under a sum of RBF kernels.

    The base bandwidth is data-driven and treated as a constant (no gradient), as in the RepNoise
    code: the mean (or median) squared distance between distinct samples of the pooled set; the
    ``kernels`` bandwidths are that base times ``multiplier ** (i - kernels // 2)``. Squared
    distances come from the Gram matrix, so memory is O((n+m)² + (n+m)·d), never O((n+m)²·d).
    """
    if bandwidth not in BANDWIDTHS:
        raise ValueError(f"bandwidth must be one of {BANDWIDTHS}, got {bandwidth!r}")
    z = torch.cat([x, y]).float()
    n = z.shape[0]
    sq = (z * z).sum(1)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=z.device)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0) * off_diagonal
    with torch.no_grad():
        pairs = d2[off_diagonal]
        base = pairs.mean() if bandwidth == "mean" else pairs.median()
        base = base.clamp_min(torch.finfo(torch.float32).tiny) / multiplier ** (kernels // 2)
    k = sum(torch.exp(-d2 / (base * multiplier**i)) for i in range(kernels))
    nx = x.shape[0]
    return k[:nx, :nx].mean() + k[nx:, nx:].mean() - 2.0 * k[:nx, nx:].mean()


def mmd_rbf_checkpointed(x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
    """``mmd_rbf`` that keeps only its inputs for backward (kernel matrices are recomputed)."""
    return checkpoint(functools.partial(mmd_rbf, **kwargs), x, y, use_reentrant=False)


def default_chunk_rows(vocab_size: int) -> int:
    return max(1, DEFAULT_CHUNK_BYTES // (4 * vocab_size))


def head_cross_entropy(x: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                       chunk_rows: int | None = None, weights: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i w_i · CE(head(x_i), targets_i)`` (differentiable) and the unweighted per-row values
    (detached, fp32).

    ``x`` is (N, d) already through the final norm; ``targets`` (N,) are real token ids (no ignore
    marker: callers gather exactly the rows they want scored); ``weights`` (N,) are constants (no
    gradient), all 1 when ``None``.
    """
    if x.shape[0] == 0:
        zero = x.new_zeros((), dtype=torch.float32) + 0.0 * x.sum()
        return zero, x.new_zeros((0,), dtype=torch.float32)
    if weights is not None:
        weights = weights.detach().to(device=x.device, dtype=torch.float32)
    if type(head) is nn.Linear:
        rows = chunk_rows or default_chunk_rows(head.out_features)
        return _FusedLinearCrossEntropy.apply(x, head.weight, head.bias, targets, rows, weights)
    rows = chunk_rows or default_chunk_rows(getattr(head, "out_features", 32768))
    total = x.new_zeros((), dtype=torch.float32)
    per_row = []
    for start in range(0, x.shape[0], rows):
        end = start + rows
        ce = checkpoint(_chunk_ce, head, x[start:end], targets[start:end], use_reentrant=False)
        total = total + (ce.sum() if weights is None else (ce * weights[start:end]).sum())
        per_row.append(ce.detach())
    return total, torch.cat(per_row)


def _chunk_ce(head: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(x).float(), targets, reduction="none")


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed (optionally row-weighted) cross-entropy of ``x @ weight.T + bias``; gradients computed
    chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk_rows, weights):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        per_row = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        # Accumulate head gradients in fp32 whatever the weights' dtype.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, x.shape[0], chunk_rows):
            end = min(start + chunk_rows, x.shape[0])
            xc, tc = x[start:end], targets[start:end]
            logits = F.linear(xc, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            ce = lse - logits.gather(1, tc[:, None]).squeeze(1)
            per_row[start:end] = ce
            wc = None if weights is None else weights[start:end]
            total += ce.sum() if wc is None else (ce * wc).sum()
            if need_x or need_w or need_b:
                # d CE_i / d logits_i = softmax(logits_i) - onehot(t_i), built in place over the logits.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(end - start, device=x.device), tc] -= 1.0
                if wc is not None:
                    grad_logits.mul_(wc[:, None])
                if need_x:
                    grad_x[start:end] = grad_logits.to(x.dtype) @ weight
                if need_w:
                    grad_w.addmm_(grad_logits.T, xc.float())
                if need_b:
                    grad_b += grad_logits.sum(0)
            del logits
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.param_dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(per_row)
        return total, per_row

    @staticmethod
    def backward(ctx, grad_total, _grad_per_row):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.param_dtypes
        out_x = grad_x * grad_total.to(grad_x.dtype) if grad_x is not None else None
        out_w = (grad_w * grad_total).to(weight_dtype) if grad_w is not None else None
        out_b = (grad_b * grad_total).to(bias_dtype) if grad_b is not None else None
        return out_x, out_w, out_b, None, None, None
