"""RepNoise with the exact and the sampled logit lens: step time next to SFT on the same sequences,
and the bias of the sampled ascent term.

    .venv/bin/python benchmarks/bench_repnoise_lens.py [--model smollm2-135m-instruct] [--pairs 8]
        [--max_length 128] [--ks 1,2,4,8] [--reps 5] [--draws 2000] [--threads N] [--device cpu]
        [--out lens.json]
    .venv/bin/python benchmarks/bench_repnoise_lens.py --tiny   # smoke test: a fixed-init 8-layer model

Data: ``--pairs`` unsafe BeaverTails rows of the defence split, each with a refusal from the refusal
bank (the text only sets the refusal rows' lengths; what is timed does not depend on which refusal
it is), chat format, at most ``--max_length`` tokens: one batch of 2 × pairs sequences, the same
for every variant.

Time, in one process, on the same weights (no optimizer step, so nothing drifts):

- ``sft``: forward and backward of the causal-LM loss on all 2 × pairs sequences, answer tokens
  labelled (full-vocabulary logits at every position);
- ``exact``: ``repnoise_loss`` with the paper's options (every layer, MLP activations, sequence MMD,
  the lens on the embeddings and every layer), forward and backward;
- ``exact+grad_norms``: the same plus the three ``autograd.grad`` of ``--term_grad_norm_steps``, what a
  measured (logging) step costs;
- ``k=K``: the sampled lens, the output layer plus K other read-outs (``--lens_sampled_readouts K``),
  a new draw every repetition (the step number changes), as in training.

Each variant runs once to warm up, then ``--reps`` repetitions interleaved (variant order rotated
every repetition, so slow spells of a shared machine fall on all variants alike); the median is
reported. On the CPU the measure is the process's CPU seconds (the work done, robust to other load;
``--threads 1`` makes it exact) and on CUDA wall seconds after synchronizing; wall seconds are shown
too. Ratios are to ``sft``.

Bias: at the initial weights, the exact lens gives every read-out's cross-entropy CE_j and their mean
A; a draw of K read-outs gives Â = (CE_last + (n − 1)/K · Σ_sampled CE_j)/n (the trainer computes
exactly this: see tests/test_repnoise.py). Printed for each K: the mean of Â / A over ``--draws`` of
the trainer's seeded draws (``draw_lens``, steps 0, 1, …; 1 if unbiased); and, over every possible
draw when there are at most 200,000 (else over the seeded draws, centred on their mean): std(Â)/A,
the bias of the loss's ascent term, E log1p(Â) − log1p(A) (≤ 0 by Jensen), next to its second-order
estimate −Var(Â)/(2(1 + A)²), and E 1/(1 + Â) against 1/(1 + A), the factor that scales the
ascent's gradient.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from immunize.defences.paired import PairedCollator, encode_pairs
from immunize.defences.repnoise import (
    RepNoiseOptions,
    decoder_layer_parameters,
    draw_lens,
    repnoise_loss,
    term_grad_norms,
)
from immunize.prompts import IGNORE_INDEX

SEED = 1234


def load(args) -> tuple[torch.nn.Module, object]:
    if args.tiny:
        from immunize.testing import tiny_model, tiny_tokenizer

        return tiny_model("llama", layers=8, hidden=32).train(), tiny_tokenizer()
    from immunize.models import load_model, load_tokenizer

    return load_model(args.model, device="cpu", dtype="float32").train(), load_tokenizer(args.model)


def build_batch(tokenizer, n_pairs: int, max_length: int) -> tuple[dict, torch.Tensor]:
    """The paired batch and, for SFT, answer-only labels of its 2 × pairs rows."""
    from immunize.data import HarmfulPair, RefusalBank, harmful_rows, load_splits

    bank = RefusalBank.from_data()
    rows = harmful_rows(load_splits().defence)[: n_pairs * 4]  # spares for pairs truncated away
    pairs = [HarmfulPair(r.prompt, r.response, bank.for_prompt(r.prompt), r.categories) for r in rows]
    features, _ = encode_pairs(tokenizer, pairs, "chat", max_length)
    if len(features) < n_pairs:
        sys.exit(f"only {len(features)} usable pairs at --max_length {max_length}")
    features = features[:n_pairs]
    batch = PairedCollator(tokenizer.pad_token_id or 0)(features)
    width = batch["input_ids"].shape[1]
    rows = [f["harmful_labels"] for f in features] + [f["refusal_labels"] for f in features]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row)
    return batch, labels


def step_functions(model, batch: dict, labels: torch.Tensor, ks: list[int]) -> dict:
    """Variant name -> one forward and backward (``step`` seeds the noise and the lens draw)."""

    def sft(step: int) -> None:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()

    def repnoise(options: RepNoiseOptions, grad_norms: bool = False):
        def run(step: int) -> None:
            loss, terms, _ = repnoise_loss(model, batch, options, seed=SEED, step=step)
            if grad_norms:
                term_grad_norms(terms.weighted(options), decoder_layer_parameters(model))
            loss.backward()
        return run

    variants = {"sft": sft, "exact": repnoise(RepNoiseOptions()),
                "exact+grad_norms": repnoise(RepNoiseOptions(), grad_norms=True)}
    variants.update({f"k={k}": repnoise(RepNoiseOptions(lens_sampled_readouts=k)) for k in ks})
    return variants


def time_variants(model, variants: dict, reps: int, device: torch.device) -> dict[str, dict]:
    def once(name: str, step: int) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        variants[name](step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - wall, time.process_time() - cpu

    names = list(variants)
    for name in names:  # warm-up
        print(f"warming up {name} ...", file=sys.stderr, flush=True)
        once(name, 0)
    samples: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            wall, cpu = once(name, rep + 1)
            samples[name]["wall"].append(wall)
            samples[name]["cpu"].append(cpu)
        print(f"repetition {rep + 1}/{reps} done", file=sys.stderr, flush=True)
    measure = "wall" if device.type == "cuda" else "cpu"
    out = {n: {"wall_s": statistics.median(s["wall"]), "cpu_s": statistics.median(s["cpu"]),
               "seconds": statistics.median(s[measure]), "samples": s} for n, s in samples.items()}
    for result in out.values():
        result["ratio_to_sft"] = result["seconds"] / out["sft"]["seconds"]
    return out


def lens_bias(model, batch: dict, ks: list[int], draws: int, enumerate_up_to: int = 200_000) -> dict:
    """For each k: mean and spread of Â over the trainer's seeded draws, and the bias of log1p(Â),
    exact over every possible draw when there are at most ``enumerate_up_to`` of them."""
    num_layers = len(decoder_layer_parameters(model))
    with torch.no_grad():
        _, terms, _ = repnoise_loss(model, batch, RepNoiseOptions(), seed=SEED)
    ces = dict(zip(terms.lens_readouts, terms.ascent_per_layer, strict=True))
    n, exact = len(ces), terms.ascent.item()
    last, others = terms.lens_readouts[-1], terms.lens_readouts[:-1]
    out = {"readouts": n, "exact_ascent": exact, "exact_log1p": math.log1p(exact),
           "readout_ce": {str(k): v for k, v in ces.items()}, "per_k": {}}
    for k in ks:
        k_read = min(k, n - 1)
        sampled = RepNoiseOptions(lens_sampled_readouts=k)
        seeded = []
        for step in range(draws):
            draw = draw_lens(sampled, num_layers, seed=SEED, step=step)
            seeded.append((ces[last] + draw.weight * sum(ces[i] for i in draw.read[:-1])) / n)
        if math.comb(n - 1, k_read) <= enumerate_up_to:  # the expectation itself
            weight = (n - 1) / k_read
            population = [(ces[last] + weight * sum(ces[i] for i in chosen)) / n
                          for chosen in itertools.combinations(others, k_read)]
            source = f"exact over all {len(population)} draws"
        else:  # Monte Carlo, centred on the draws' own mean to cancel most of its sampling error
            population, source = seeded, f"{draws} seeded draws, centred"
        mean = statistics.fmean(population)
        var = statistics.pvariance(population)
        log_mean = statistics.fmean(math.log1p(a) for a in population)
        out["per_k"][str(k)] = {
            "exact_lens": k_read == n - 1, "bias_from": source,
            "seeded_mean_ratio": statistics.fmean(seeded) / exact,
            "std_ratio": math.sqrt(var) / exact, "mean_log1p": log_mean,
            "log1p_bias": log_mean - math.log1p(mean),
            "log1p_bias_second_order": 0.0 - var / (2 * (1 + exact) ** 2),
            "mean_gradient_factor": statistics.fmean(1 / (1 + a) for a in population),
            "exact_gradient_factor": 1 / (1 + exact)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="a fixed-init 8-layer tiny model (smoke test)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--ks", default="1,2,4,8", help="comma list of sampled read-outs besides the last layer")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--draws", type=int, default=2000, help="lens draws for the bias")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    device = torch.device(args.device)
    model, tokenizer = load(args)
    model.to(device)
    batch, labels = build_batch(tokenizer, args.pairs, args.max_length)
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = labels.to(device)
    name = "tiny llama (8 layers, fixed init)" if args.tiny else args.model

    times = time_variants(model, step_functions(model, batch, labels, ks), args.reps, device)
    bias = lens_bias(model, batch, ks, args.draws)

    rows, width = batch["input_ids"].shape
    measure = "wall" if device.type == "cuda" else "CPU"
    print(f"\n{name} on {device}: {bias['readouts']} lens read-outs; batch {rows} × {width} tokens; "
          f"{args.reps} repetitions after a warm-up, median {measure} seconds; "
          f"torch threads {torch.get_num_threads()}\n")
    print(f"{'variant':<18} {measure + ' s':>8} {'wall s':>8} {'× sft':>7}")
    for variant, r in times.items():
        print(f"{variant:<18} {r['seconds']:8.3f} {r['wall_s']:8.3f} {r['ratio_to_sft']:7.2f}")
    print(f"\nsampled lens at the initial weights: exact mean lens CE A = {bias['exact_ascent']:.4f}, "
          f"log1p(A) = {bias['exact_log1p']:.5f}; {args.draws} draws per k")
    print(f"{'k':>4} {'seeded Â/A':>10} {'std Â/A':>8} {'E log1p Â':>10} {'bias':>10} {'2nd-order':>10} "
          f"{'E 1/(1+Â)':>10} {'1/(1+A)':>8}  expectation")
    for k, r in bias["per_k"].items():
        note = "every read-out: the exact lens" if r["exact_lens"] else r["bias_from"]
        print(f"{k:>4} {r['seeded_mean_ratio']:10.4f} {r['std_ratio']:8.4f} {r['mean_log1p']:10.5f} "
              f"{r['log1p_bias']:10.2e} {r['log1p_bias_second_order']:10.2e} "
              f"{r['mean_gradient_factor']:10.5f} {r['exact_gradient_factor']:8.5f}  {note}")
    if args.out:
        report = {"model": name, "device": str(device), "batch": [rows, width], "reps": args.reps,
                  "measure": measure, "threads": torch.get_num_threads(),
                  "times": times, "bias": bias}
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
