"""Throughput of the evaluation generation engine against a one-prompt-at-a-time loop.

    .venv/bin/python benchmarks/bench_generation.py [--model smollm2-135m-instruct] [--prompts 32]
        [--new_tokens 64] [--batch_size 32] [--threads N]

Both sides answer the same held-out harmful prompts (the harmfulness evaluation's own fixed
subset, chat format) greedily with the same stop tokens and token budget; the baseline calls
``model.generate`` once per prompt (no padding, KV cache on), the engine is
``immunize.generation.generate`` (length-sorted, left-padded batches). Prints tokens/s of each,
the speed-up, and how many answers agree exactly (batched fp32 arithmetic may differ from
single-row arithmetic in the last bits, which can flip a near-tied greedy choice).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from immunize.evaluation.harmfulness import load_harmful_prompts
from immunize.generation import encode_for_generation, generate, stop_token_ids
from immunize.models import load_model_and_tokenizer


def one_at_a_time(model, tokenizer, prompts, *, max_new_tokens: int) -> list[tuple[str, int]]:
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer, "chat")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad,
        use_cache=True,
    )
    out = []
    for prompt in prompts:
        ids = torch.tensor([encode_for_generation(tokenizer, prompt, "chat")])
        with torch.inference_mode():
            generated = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
            )
        new = generated[0, ids.shape[1] :].tolist()
        end = next((k for k, t in enumerate(new) if t in stops), None)
        kept = new if end is None else new[: end + 1]
        out.append((tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model_and_tokenizer(args.model, device="cpu", dtype="float32")
    model.eval()
    prompts = [p.prompt for p in load_harmful_prompts("beavertails", args.prompts)]
    print(
        f"{args.model}: {len(prompts)} held-out harmful prompts, {args.new_tokens} new tokens, greedy, "
        f"fp32 on CPU ({torch.get_num_threads()} threads)"
    )
    generate(
        model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=2
    )  # warm-up: lazy imports, allocator

    start = time.perf_counter()
    baseline = one_at_a_time(model, tokenizer, prompts, max_new_tokens=args.new_tokens)
    base_seconds = time.perf_counter() - start
    base_tokens = sum(n for _, n in baseline)

    start = time.perf_counter()
    batched = generate(
        model, tokenizer, prompts, fmt="chat", max_new_tokens=args.new_tokens, batch_size=args.batch_size
    )
    batch_seconds = time.perf_counter() - start
    batch_tokens = sum(g.new_tokens for g in batched)

    same = sum(g.text == text for g, (text, _) in zip(batched, baseline, strict=True))
    base_rate, batch_rate = base_tokens / base_seconds, batch_tokens / batch_seconds
    for label, tokens, seconds, rate in (
        ("one prompt at a time", base_tokens, base_seconds, base_rate),
        (f"batched (batch {args.batch_size})", batch_tokens, batch_seconds, batch_rate),
    ):
        print(f"{label:<28} {tokens:>6} tokens {seconds:>7.1f}s {rate:>8.1f} tokens/s")
    print(f"speed-up: {batch_rate / base_rate:.2f}x (target >= 5x); identical answers: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
