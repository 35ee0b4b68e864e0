"""Cost of a RepNoise training step next to a plain SFT step and the naive formulation.

    .venv/bin/python benchmarks/bench_repnoise.py [--model smollm2-135m-instruct] [--pairs 8]
        [--max_length 128] [--steps 2] [--threads N]

All variants train the same model (fp32, CPU, AdamW) on the same tokens: ``--pairs`` harmful /
refusal pairs from the BeaverTails defence split, chat format, at most ``--max_length`` tokens
each, i.e. one batch of 2 × pairs sequences:

- ``sft``: a plain SFT step (the model's own loss) on all 2 × pairs sequences, answer tokens
  labelled: the same tokens through the same model, full-vocabulary logits at every position;
- ``sft_refusals``: SFT on the refusals only (what RepNoise's stability term alone would cost);
- ``repnoise``: ``immunize.defences.repnoise.repnoise_loss`` with the paper's options (every
  layer, MLP activations, sequence MMD, lens on the embeddings and every layer);
- ``repnoise_ckpt``: the same with (non-reentrant) activation checkpointing of the decoder
  layers, the memory-saving setting (``--activation_checkpointing true``);
- ``naive``: the same loss with the logit lens computed the way the original code does: hidden
  states of every layer, full-vocabulary logits for every layer and every position of the
  harmful sequences, masking afterwards (labels -100), the stability CE from the model's full
  logits. Same masks, same noise draws, so its loss must equal ours (within 1e-4). Its MMD is
  ours, to isolate the lens (the original's expand-form MMD would cost it more memory still).

Time: each variant runs one warm-up step, then ``--steps`` timed steps (forward, backward,
optimizer step); the median is reported, in CPU seconds of the process and in wall seconds. On a
shared machine wall time depends on what else runs (and, with several threads, on threads waiting
for each other); the CPU time of the process is the work the step did, so the ratios use CPU time
(``--threads 1`` makes that exact). FLOPs are counted analytically (matrix products only:
2·params per token forward for the decoder weights, attention scores, and 2·d·V per scored
position for the LM head; backward = 2 × forward; the fused read-out counts its three products)
and divided by the step's CPU time and by this machine's fp32 matmul rate per CPU-second,
measured here on a 2048³ product with the same threads, to give the achieved fraction of peak.

Memory: every variant runs in a fresh subprocess with glibc's mmap threshold fixed at 64 KiB
(``MALLOC_MMAP_THRESHOLD_``), so each tensor-sized allocation is its own mapping, returned to the
OS when freed: the resident set then tracks live tensors instead of a heap that never shrinks.
After the warm-up step (weights, optimizer state and one-off buffers in place) the child resets
the kernel's peak-RSS counter (``5 > /proc/self/clear_refs``), notes VmRSS, runs the timed steps
and reads VmHWM. "Step peak" = VmHWM − VmRSS before the steps: the transient memory a step needs
(activations, logits, gradients) on top of what every variant holds. "Process peak" = VmHWM,
weights and Adam state included. Targets are checked on the step peak, the stricter measure.
Other processes on the machine do not enter these numbers, but they do slow the steps: ratios
come from one run, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from immunize.defences.losses import mmd_rbf
from immunize.defences.paired import PairedCollator, encode_pairs
from immunize.defences.repnoise import RepNoiseOptions, repnoise_loss
from immunize.hooks import HookSet, output_tensor, resolve_hook_points
from immunize.prompts import IGNORE_INDEX

VARIANTS = ("sft", "sft_refusals", "repnoise", "repnoise_ckpt", "naive")
SEED = 1234


# --------------------------------------------------------------------------------------------
# Data (parent) and batches (children)


def build_features(model_name: str, n_pairs: int, max_length: int) -> list[dict]:
    from immunize.data import build_pairs, load_splits
    from immunize.judges.topical_refusals import topical_refusal
    from immunize.models import load_tokenizer

    tokenizer = load_tokenizer(model_name)
    rows = load_splits().defence
    # Step time depends on the lengths, not on who wrote the refusal: topical ones need no generation.
    pairs = build_pairs(rows, {r.prompt: topical_refusal(r.prompt) for r in rows})
    features, _ = encode_pairs(tokenizer, pairs[: n_pairs * 2], "chat", max_length)
    return features[:n_pairs]


def sft_labels(features: list[dict], width: int) -> torch.Tensor:
    """Answer-only labels of every row of the paired batch (harmful answers, then refusals)."""
    rows = [f["harmful_labels"] for f in features] + [f["refusal_labels"] for f in features]
    out = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


# --------------------------------------------------------------------------------------------
# The naive formulation (full-vocabulary logits for every layer and position)


def naive_loss(model, batch: dict, options: RepNoiseOptions, generator: torch.Generator):
    points = resolve_hook_points(model)
    b = batch["harmful_targets"].shape[0]
    mlp_out: dict[int, torch.Tensor] = {}
    with HookSet() as hooks:
        for i, mlp in enumerate(points.mlps):
            hooks.forward(mlp, lambda m, a, o, i=i: mlp_out.__setitem__(i, output_tensor(o)))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, use_cache=False)

    def ce(logits, labels):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)

    stability = ce(out.logits[b:], batch["refusal_labels"])
    # hidden_states: embeddings, then each layer's output; the last one is already through the
    # final norm, so the last layer's read-out is the model's own logits. One layer at a time, as
    # the original loop: each layer's full logits are freed, its log-softmax is kept for backward.
    n_layers = points.num_layers
    per_layer = [ce(points.lm_head(points.head_input(out.hidden_states[i][:b])), batch["harmful_targets"])
                 for i in range(n_layers)]
    per_layer.append(ce(out.logits[:b], batch["harmful_targets"]))
    ascent = torch.stack(per_layer).mean()
    # The MMD is computed as ours (Gram form), so that the comparison isolates the logit lens; the
    # original's expand form would add (2B)² × W × d floats per layer on top.
    keep = batch["harmful_mask"][..., None].float()
    values = []
    for i in range(n_layers):
        acts = mlp_out[i][:b]
        noise = torch.randn(acts.shape, generator=generator)
        values.append(mmd_rbf((acts * keep).flatten(1), (noise * keep).flatten(1)))
    noise_term = torch.stack(values).mean()
    loss = stability + options.beta * noise_term - options.alpha * torch.log1p(ascent)
    return loss, {"stability": stability.item(), "noise": noise_term.item(), "ascent": ascent.item()}


# --------------------------------------------------------------------------------------------
# One variant, in its own process


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "VmSize:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_variant(name: str, model_name: str, features_path: str, steps: int) -> dict:
    from immunize.models import load_model

    features = json.loads(Path(features_path).read_text())
    batch = PairedCollator(0)(features)
    b, width = batch["harmful_targets"].shape
    options = RepNoiseOptions()
    model = load_model(model_name, device="cpu", dtype="float32").train()
    if name == "repnoise_ckpt":
        model.activation_checkpointing_enable({"use_reentrant": False})
    # Fail with an allocation error rather than wake the kernel's OOM killer on a shared machine.
    limit = _status()["VmSize"] + _mem_available() - 3 * 2**29
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    labels = sft_labels(features, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)

    def loss_fn():
        if name == "sft":
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            return out.loss, {}
        if name == "sft_refusals":
            out = model(input_ids=batch["input_ids"][b:], attention_mask=batch["attention_mask"][b:],
                        labels=labels[b:])
            return out.loss, {}
        if name.startswith("repnoise"):
            loss, terms, _ = repnoise_loss(model, batch, options, seed=SEED)
            return loss, {"stability": terms.stability.item(), "noise": terms.noise.item(),
                          "ascent": terms.ascent.item()}
        return naive_loss(model, batch, options, torch.Generator().manual_seed(SEED))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, terms = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.item(), terms

    try:
        first_loss, first_terms = step()  # warm-up; its loss is at the initial weights
        Path("/proc/self/clear_refs").write_text("5")
        before = _status()["VmRSS"]
        times, cpu_times = [], []
        for _ in range(steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    except RuntimeError as err:
        if "alloc" not in str(err):
            raise
        return {"skipped": f"out of memory within the {limit / 2**30:.1f} GiB this machine had available"}
    peak = _status()["VmHWM"]
    harm_rows = int(batch["harmful_targets"][:, 1:].ne(IGNORE_INDEX).sum())
    ref_rows = int(batch["refusal_labels"][:, 1:].ne(IGNORE_INDEX).sum())
    return {"wall": sorted(times)[len(times) // 2], "seconds": sorted(cpu_times)[len(cpu_times) // 2],
            "step_peak": peak - before,
            "process_peak": peak, "loss": first_loss, "terms": first_terms, "pairs": b, "width": width,
            "scored_harmful": harm_rows, "scored_refusal": ref_rows}


# --------------------------------------------------------------------------------------------
# FLOPs and the machine's matmul rate


def step_flops(name: str, config, r: dict) -> float:
    d, v, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", config.num_attention_heads) * head_dim
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * config.intermediate_size  # q, o, k, v, gate/up/down
    width, b = r["width"], r["pairs"]
    rows = b if name == "sft_refusals" else 2 * b
    tokens = rows * width
    body = tokens * n_layers * (2 * per_layer + 4 * width * d)  # forward: weights + attention scores
    head_row = 2 * d * v
    if name in ("sft", "sft_refusals"):
        head = tokens * head_row
    elif name.startswith("repnoise"):  # fused read-out: logits, input and weight gradients per scored row
        head = (r["scored_refusal"] + (n_layers + 1) * r["scored_harmful"]) * head_row
        recompute = body if name == "repnoise_ckpt" else 0  # checkpointing runs the body forward twice
        return 3 * (body + head) + recompute
    else:  # naive: the model's logits on every row, plus every other layer's lens on the harmful rows
        head = (2 * b * width + n_layers * b * width) * head_row
    return 3 * (body + head)


def matmul_rate(seconds: float = 3.0, n: int = 2048) -> float:
    """fp32 GEMM FLOPs per CPU-second of this process (the measure the steps are timed in)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.process_time() - start)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--features", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model, args.features, args.steps)))
        return

    from transformers import AutoConfig

    from immunize.models import resolve_model_source

    config = AutoConfig.from_pretrained(resolve_model_source(args.model))
    features = build_features(args.model, args.pairs, args.max_length)
    rate_before = matmul_rate()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.json"
        path.write_text(json.dumps(features))
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        for name in args.variants.split(","):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--variant", name, "--features", str(path),
                                   "--model", args.model, "--steps", str(args.steps),
                                   "--threads", str(args.threads)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                last = proc.stderr.strip().splitlines()[-1:] or ["no message"]
                results[name] = {"skipped": f"exit status {proc.returncode}: {last[0]}"}
                continue
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    rate = max(rate_before, matmul_rate())

    any_result = next(r for r in results.values() if "skipped" not in r)
    print(f"\n{args.model}: {config.num_hidden_layers} layers, d={config.hidden_size}, "
          f"V={config.vocab_size}; "
          f"{any_result['pairs']} pairs × ≤{args.max_length} tokens (batch {2 * any_result['pairs']} × "
          f"{any_result['width']}); scored harmful tokens {any_result['scored_harmful']}, refusal tokens "
          f"{any_result['scored_refusal']}; torch threads {torch.get_num_threads()}; "
          f"fp32 matmul rate {rate / 1e9:.0f} GFLOP per CPU-second (2048³)\n")
    print(f"{'variant':<14} {'cpu s':>7} {'wall s':>7} {'step peak MiB':>14} {'process peak MiB':>17} "
          f"{'GFLOP':>7} {'GFLOP/cpu-s':>11} {'of matmul':>9}  loss (initial weights)")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<14} skipped: {r['skipped']}")
            continue
        flops = step_flops(name, config, r)
        print(f"{name:<14} {r['seconds']:7.1f} {r['wall']:7.1f} {r['step_peak'] / 2**20:14.0f} "
              f"{r['process_peak'] / 2**20:17.0f} "
              f"{flops / 1e9:7.0f} {flops / r['seconds'] / 1e9:11.1f} {flops / r['seconds'] / rate:9.1%}  "
              f"{r['loss']:.6f} {json.dumps({k: round(v, 6) for k, v in r['terms'].items()})}")

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in results and b in results and "skipped" not in results[a] and "skipped" not in results[b]:
            return results[a][key] / results[b][key]
        return None

    print()
    checks = [
        ("repnoise / sft step CPU time", ratio("repnoise", "sft", "seconds"), "<=", 2.5),
        ("repnoise / sft step peak memory", ratio("repnoise", "sft", "step_peak"), "<=", 1.5),
        ("repnoise / sft process peak memory", ratio("repnoise", "sft", "process_peak"), "<=", 1.5),
        ("naive / repnoise step CPU time", ratio("naive", "repnoise", "seconds"), ">=", 2.0),
        ("naive / repnoise step peak memory", ratio("naive", "repnoise", "step_peak"), ">=", 4.0),
        ("naive / repnoise_ckpt step CPU time", ratio("naive", "repnoise_ckpt", "seconds"), None, None),
        ("naive / repnoise_ckpt step peak memory", ratio("naive", "repnoise_ckpt", "step_peak"), None, None),
        ("repnoise_ckpt / sft step CPU time", ratio("repnoise_ckpt", "sft", "seconds"), None, None),
        ("repnoise / sft_refusals step CPU time", ratio("repnoise", "sft_refusals", "seconds"), None, None),
        ("repnoise / sft_refusals step peak memory", ratio("repnoise", "sft_refusals", "step_peak"),
         None, None),
    ]
    # The lens's full-vocabulary read-out at every scored position of every layer is the method's
    # own cost; at equal efficiency a time ratio cannot beat the FLOP ratio of the two variants.
    for a, b in (("repnoise", "sft"), ("naive", "repnoise")):
        value = ratio(a, b, "seconds")
        if value is not None:
            checks.append((f"{a} / {b} matmul FLOPs (time's floor)",
                           step_flops(a, config, results[a]) / step_flops(b, config, results[b]), None, None))
    for label, value, op, target in checks:
        if value is None:
            print(f"{label:<42} n/a")
            continue
        verdict = "" if op is None else ("  ok" if (value <= target if op == "<=" else value >= target)
                                          else "  MISSED") + f" (target {op} {target})"
        print(f"{label:<42} {value:6.2f}{verdict}")
    if "repnoise" in results and "naive" in results and "skipped" not in results["naive"]:
        ours, naive = results["repnoise"], results["naive"]
        diffs = {k: abs(ours["terms"][k] - naive["terms"][k]) for k in ours["terms"]}
        diffs["loss"] = abs(ours["loss"] - naive["loss"])
        worst = max(diffs.values())
        print(f"{'max |repnoise − naive| over loss terms':<42} {worst:.2e}"
              f"{'  ok' if worst <= 1e-4 else '  MISSED'} (target <= 1e-4; "
              f"{', '.join(f'{k} {v:.1e}' for k, v in diffs.items())})")


if __name__ == "__main__":
    main()
