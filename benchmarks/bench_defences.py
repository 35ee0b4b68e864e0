"""Cost of one training step of every registered defence, relative to an SFT step on the same sequences.

    .venv/bin/python benchmarks/bench_defences.py [--model smollm2-135m-instruct] [--pairs 8]
        [--max_length 128] [--steps 2] [--defences a,b,...]

Each defence that trains builds its own data from the defence split (``--pairs`` examples per
step: pairs, refusals or harmful answers, whatever the defence trains on), its own trainer through
the registry (``build_trainer``), and runs one warm-up step and ``--steps`` timed steps (forward,
backward, optimizer step) of its own ``Trainer``, fp32 on the CPU. The reference is plain SFT, one
step on all the sequences of the same ``--pairs`` (harmful, refusal) pairs (2 × pairs sequences,
answer tokens labelled): the tokens RepNoise's step reads. Times are the process's CPU seconds per
step (the work done, robust to other load; the median of the timed steps) and wall seconds; the
ratio uses CPU time. Everything runs in one process, side by side, so machine speed cancels out.
Defences that do not train (``none``, ``random-init``) cost no steps and are listed as such.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """CPU and wall seconds of each optimizer step."""

    def __init__(self):
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.cpu.append(time.process_time() - self._cpu)
        self.wall.append(time.perf_counter() - self._wall)


def _common(args, out: str) -> dict:
    return dict(model=args.model, output_dir=out, max_length=args.max_length, num_samples=args.pairs,
                per_device_train_batch_size=args.pairs, max_steps=1 + args.steps, save_steps=10**6,
                learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, use_cpu=True,
                report_to="none", disable_tqdm=True, seed=0)


# What a timed step must not include: generating refusals (the texts only set lengths; topical ones need
# no model) and RepNoise's gradient-norm measurement (extra backward passes on its measured steps).
QUIET = {"refusals": "topical", "term_grad_norm_steps": 0}


def _config(name: str, options: dict):
    """``defence_config`` with ``QUIET`` applied where the defence has those options."""
    import dataclasses

    from immunize.defences import config_class, defence_config

    fields = {f.name for f in dataclasses.fields(config_class(name))}
    return defence_config(name, **options, **{k: v for k, v in QUIET.items() if k in fields})


def _time(trainer) -> tuple[float, float]:
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    timed_cpu, timed_wall = clock.cpu[1:], clock.wall[1:]  # the first step warms up
    return statistics.median(timed_cpu), statistics.median(timed_wall)


def sft_reference(args, tmp: str) -> tuple[float, float, int]:
    from immunize.defences.paired import paired_defence_data
    from immunize.prompts import CausalLMCollator
    from immunize.training import GuardedTrainer, ImmunizeTrainingArguments, load_training_model

    cfg = _config("repnoise", _common(args, f"{tmp}/pairs"))
    model, tokenizer = load_training_model(cfg)
    data = paired_defence_data(cfg, tokenizer)
    sequences = [{"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]}
                 for f in data.features for side in ("harmful", "refusal")]
    sft_args = ImmunizeTrainingArguments(**{**_common(args, f"{tmp}/sft"),
                                            "per_device_train_batch_size": len(sequences)})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = GuardedTrainer(model=model, args=sft_args, train_dataset=sequences * (1 + args.steps),
                             data_collator=CausalLMCollator(pad))
    cpu, wall = _time(trainer)
    return cpu, wall, sum(len(s["input_ids"]) for s in sequences)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--defences", default="", help="comma list (default: every registered defence)")
    args = parser.parse_args(argv)

    import torch

    from immunize.defences import DEFENCES, get_defence

    names = [n for n in args.defences.split(",") if n] or DEFENCES.names()
    print(f"model {args.model}, {args.pairs} examples x <= {args.max_length} tokens per step, "
          f"{args.steps} timed steps after 1 warm-up, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        sft_cpu, sft_wall, sft_tokens = sft_reference(args, tmp)
        print(f"{'sft (reference)':<20} cpu {sft_cpu:7.2f} s  wall {sft_wall:7.2f} s  {sft_tokens} tokens  ratio 1.00",
              flush=True)
        rows = [("sft (reference)", sft_cpu, sft_wall, 1.0)]
        for name in names:
            defence = get_defence(name)
            if not defence.trains:
                print(f"{name:<20} does not train (no steps)", flush=True)
                rows.append((name, None, None, None))
                continue
            cfg = _config(name, _common(args, f"{tmp}/{name}"))
            model, tokenizer = defence.load_model(cfg)
            data = defence.build_data(cfg, tokenizer)
            data.features = data.features[: args.pairs] * (1 + args.steps)  # the same batch every step
            trainer = defence.build_trainer(cfg, model, tokenizer, data)
            cpu, wall = _time(trainer)
            rows.append((name, cpu, wall, cpu / sft_cpu))
            print(f"{name:<20} cpu {cpu:7.2f} s  wall {wall:7.2f} s  ratio {cpu / sft_cpu:5.2f}", flush=True)
            del model, trainer
    print("\n| defence | CPU s / step | wall s / step | × SFT on the same sequences |\n|---|---|---|---|")
    for name, cpu, wall, ratio in rows:
        if cpu is None:
            print(f"| {name} | — | — | no training steps |")
        else:
            print(f"| {name} | {cpu:.2f} | {wall:.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
