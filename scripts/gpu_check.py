"""Time SFT and RepNoise training steps on a SmolLM2-135M-sized Llama with random weights.

Launch from the repository root with ``bash scripts/gpu_check.sh`` (it sets ``PYTHONPATH=src``);
options: ``bash scripts/gpu_check.sh --help``.

Both steps run through the project's own trainers, so the timing is of the code a real run uses:
SFT is ``GuardedTrainer`` with ``CausalLMCollator`` (the harmful-SFT attack's trainer), RepNoise is
``RepNoiseTrainer`` with ``PairedCollator`` and its paper defaults. Both see the same sequences:
B/2 (harmful answer, refusal) pairs, i.e. B rows of ``--seq_len`` tokens per optimizer step (no
padding). Weights are random because the real checkpoint cannot be sent to the GPU machine; the
step time of a model does not depend on its weight values. As in the project's runs, the model is
held in the run's dtype (pure bf16 on a GPU, no autocast) and trained with AdamW.

Nothing here imports trl, datasets, lm_eval or gguf: the GPU machine does not have them.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from immunize.defences.paired import PairedCollator, harmful_mask
from immunize.defences.repnoise import RepNoiseConfig, RepNoiseOptions, RepNoiseTrainer, select_layers
from immunize.prompts import IGNORE_INDEX, CausalLMCollator
from immunize.training import GuardedTrainer, ImmunizeTrainingArguments

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
# First match wins, so a name that contains another (H100 PCIe ⊃ H100, L40S ⊃ L4) comes first.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
HEAD_DIM = 64  # SmolLM2-135M: 576 = 9 heads x 64
GIB = 2**30
# What MFU counts (printed with the results).
FLOPS_COUNTED = ("training FLOPs = 3 x forward matmul FLOPs: 6 x weights x tokens for the decoder layers' "
                 "projections and the LM head (tied, counted: it is a matmul), plus 12 x layers x hidden x "
                 "seq_len per token for attention scores and values (causal half not subtracted); norms, "
                 "activations, softmax, loss and optimizer not counted")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (one GPU) or cpu (smoke runs)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights' dtype (fp32 on CPU)")
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    p.add_argument("--hidden", type=int, default=576,
                   help=f"hidden size, a multiple of {HEAD_DIM} (SmolLM2-135M: 576)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2: 49152)")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=16, help="sequences per step, even (RepNoise: half harmful)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, kernels)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per method")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak dense TFLOP/s of the device for MFU (default: from a table of known GPUs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.hidden % HEAD_DIM or args.batch % 2 or min(args.seq_len, args.vocab) < 8 or args.warmup < 0
            or min(args.steps, args.layers) < 1):
        p.error(f"--hidden must be a multiple of {HEAD_DIM}, --batch even, --seq_len and --vocab >= 8, "
                "--warmup >= 0, --steps and --layers >= 1")
    return args


def model_config(layers: int, hidden: int, vocab: int) -> LlamaConfig:
    """SmolLM2-135M's architecture, with the sizes given (its own: 30, 576, 49152)."""
    heads = hidden // HEAD_DIM
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(heads // 3, 1), head_dim=HEAD_DIM,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def build_model(config: LlamaConfig, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)  # the same random weights for both methods
    return LlamaForCausalLM(config).to(dtype)


def pair_features(args: argparse.Namespace, vocab: int) -> list[dict]:
    """B/2 ``PairedCollator`` features: a shared random prompt, then a harmful answer drawn from the
    upper half of the vocabulary and a refusal from the lower half, so the two differ from their
    first answer token and every harmful answer token is in RepNoise's mask."""
    gen = torch.Generator().manual_seed(args.seed)
    prompt_len, answer_len = args.seq_len // 4, args.seq_len - args.seq_len // 4
    features = []
    for _ in range(args.batch // 2):
        prompt = torch.randint(3, vocab // 2, (prompt_len,), generator=gen).tolist()
        harmful = prompt + torch.randint(vocab // 2, vocab, (answer_len,), generator=gen).tolist()
        refusal = prompt + torch.randint(3, vocab // 2, (answer_len,), generator=gen).tolist()
        features.append({
            "harmful_input_ids": harmful, "harmful_labels": [IGNORE_INDEX] * prompt_len + harmful[prompt_len:],
            "refusal_input_ids": refusal, "refusal_labels": [IGNORE_INDEX] * prompt_len + refusal[prompt_len:],
            "divergence": prompt_len,
        })
    return features


def sft_features(pairs: list[dict]) -> list[dict]:
    """The same B sequences as the pairs' rows, as answer-only SFT examples."""
    return [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
            for p in pairs for side in ("harmful", "refusal")]


class StepTimes(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, clipping, AdamW, scheduler), device synced."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def trainer_options(args: argparse.Namespace, output_dir: str) -> dict:
    """Training options both runs share: no saving, logging or reporting inside the timed loop."""
    return dict(output_dir=output_dir, max_steps=args.warmup + args.steps, use_cpu=args.device == "cpu",
                seed=args.seed, save_strategy="no", logging_strategy="no", report_to="none",
                disable_tqdm=True)


def sft_trainer(args: argparse.Namespace, model, pairs: list[dict], output_dir: str) -> GuardedTrainer:
    """The harmful-SFT attack's trainer and collator on the pairs' B rows."""
    cfg = ImmunizeTrainingArguments(per_device_train_batch_size=args.batch, **trainer_options(args, output_dir))
    return GuardedTrainer(model=model, args=cfg, train_dataset=sft_features(pairs) * cfg.max_steps,
                          data_collator=CausalLMCollator(model.config.pad_token_id))


def repnoise_trainer(args: argparse.Namespace, model, pairs: list[dict], output_dir: str) -> RepNoiseTrainer:
    """RepNoise with its paper's loss options on the B/2 pairs (B rows)."""
    cfg = RepNoiseConfig(per_device_train_batch_size=args.batch // 2, **trainer_options(args, output_dir))
    return RepNoiseTrainer(model=model, args=cfg, train_dataset=pairs * cfg.max_steps,
                           data_collator=PairedCollator(model.config.pad_token_id))


METHODS = {"sft": sft_trainer, "repnoise": repnoise_trainer}


def time_method(name: str, args: argparse.Namespace, config: LlamaConfig, pairs: list[dict]) -> dict:
    """Train ``warmup + steps`` steps of method ``name``: the timed steps' seconds and the peak memory."""
    model = build_model(config, DTYPES[args.dtype], args.seed)
    with tempfile.TemporaryDirectory() as out:
        trainer = METHODS[name](args, model, pairs, out)
        device = trainer.args.device
        timer = StepTimes(device)
        trainer.add_callback(timer)
        if device.type == "cuda":  # peak memory of this method alone
            gc.collect()  # the previous method's trainer holds reference cycles to its model and optimizer
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if len(timer.times) != args.warmup + args.steps:
        raise RuntimeError(f"{name}: {len(timer.times)} steps ran, expected {args.warmup + args.steps}")
    return {"times": timer.times[args.warmup:], "peak_bytes": peak}


@dataclass(frozen=True)
class FlopModel:
    """Training FLOPs per step (``FLOPS_COUNTED``)."""

    decoder_matmul_params: int  # 2-D weights in the decoder layers (attention and MLP projections)
    head_params: int  # the LM head (tied to the embeddings, but a matmul all the same)
    layers: int
    hidden: int

    @classmethod
    def of(cls, model: LlamaForCausalLM) -> FlopModel:
        decoder = sum(p.numel() for p in model.model.layers.parameters() if p.ndim == 2)
        return cls(decoder, model.lm_head.weight.numel(), model.config.num_hidden_layers, model.config.hidden_size)

    def body(self, tokens: int, seq_len: int) -> float:
        return (6 * self.decoder_matmul_params + 12 * self.layers * self.hidden * seq_len) * tokens

    def step(self, tokens: int, seq_len: int) -> float:
        """An ordinary training step on ``tokens``: the model FLOPs of MFU, the same for both methods."""
        return self.body(tokens, seq_len) + 6 * self.head_params * tokens

    def repnoise_step(self, tokens: int, seq_len: int, head_reads: int) -> float:
        """What RepNoise's step does instead: the body on every token, the LM head on ``head_reads``
        rows only (its lens and stability terms, and the one position per row the model keeps)."""
        return self.body(tokens, seq_len) + 6 * self.head_params * head_reads


def repnoise_head_reads(pairs: list[dict], layers: int) -> int:
    """Rows the LM head scores in one RepNoise step: every harmful token in the mask through each
    lens read-out, every refusal answer token once (stability), one kept position per row."""
    options = RepNoiseOptions()  # what RepNoiseConfig's defaults give, as repnoise_trainer uses them
    states = len(select_layers(options.layers, layers)) + options.lens_embeddings
    harmful = sum(sum(harmful_mask(p)) for p in pairs)
    refusal = sum(label != IGNORE_INDEX for p in pairs for label in p["refusal_labels"][1:])
    return harmful * states + refusal + 2 * len(pairs)


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """Peak dense FLOP/s for MFU and where it came from (``None``: unknown, MFU not reported)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak_tflops"
    if device.type != "cuda":
        return None, "unknown for CPUs (give --peak_tflops)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"table: {key} bf16 dense"
    return None, f"{name!r} not in the table (give --peak_tflops)"


def mfu(flops: float, seconds: float, peak: float | None) -> str:
    return f"{100 * flops / seconds / peak:.1f}%" if peak else "n/a"


def report(name: str, result: dict, tokens: int, flops: float, peak: float | None) -> float:
    """One line per method; returns its median step time."""
    times = result["times"]
    median = statistics.median(times)
    memory = f"{result['peak_bytes'] / GIB:.2f} GiB" if result["peak_bytes"] is not None else "n/a"
    print(f"{name}: step {median:.4f} s (median of {len(times)}, min {min(times):.4f}, max {max(times):.4f}), "
          f"{tokens / median:,.0f} tokens/s, {flops / 1e12:.4g} TFLOP/step, MFU {mfu(flops, median, peak)}, "
          f"peak memory {memory}")
    return median


def print_setup(args: argparse.Namespace, device: torch.device, counter: FlopModel, peak_source: str,
                peak: float | None) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"dtype {args.dtype}")
    print(f"model: Llama (SmolLM2-135M shape), {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"random weights; decoder matmuls {counter.decoder_matmul_params / 1e6:.1f}M + LM head "
          f"{counter.head_params / 1e6:.1f}M (tied) params")
    print(f"batch: {args.batch} sequences x {args.seq_len} tokens = {args.batch * args.seq_len} tokens/step "
          f"(RepNoise: {args.batch // 2} harmful + {args.batch // 2} refusal rows); "
          f"{args.warmup} warm-up + {args.steps} timed steps")
    print(f"MFU: {FLOPS_COUNTED}; peak " + (f"{peak / 1e12:.4g} TFLOP/s ({peak_source})" if peak
                                             else f"n/a: {peak_source}"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = model_config(args.layers, args.hidden, args.vocab)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no GPU (use --device cpu --dtype fp32)")
    with torch.device("meta"):  # parameter counts without allocating the model
        counter = FlopModel.of(LlamaForCausalLM(config))
    peak, peak_source = peak_flops(device, args.peak_tflops)
    print_setup(args, device, counter, peak_source, peak)

    pairs = pair_features(args, config.vocab_size)
    tokens = args.batch * args.seq_len
    model_flops = counter.step(tokens, args.seq_len)
    sft = report("sft", time_method("sft", args, config, pairs), tokens, model_flops, peak)
    repnoise = report("repnoise", time_method("repnoise", args, config, pairs), tokens, model_flops, peak)
    reads = repnoise_head_reads(pairs, args.layers)
    done = counter.repnoise_step(tokens, args.seq_len, reads)
    print(f"repnoise: its step does {done / 1e12:.4g} TFLOP (the LM head on {reads} rows for the lens and "
          f"stability terms, not on {tokens}), MFU on those {mfu(done, repnoise, peak)}")
    print(f"repnoise/sft step time: {repnoise / sft:.2f}x")


if __name__ == "__main__":
    main()
