"""`immunize evaluate`: harmfulness, over-refusal, toxicity, capability, perplexity, trainability.

    immunize evaluate --model smollm2-135m-instruct --suite quick --output_dir runs/eval-quick

Each section writes ``<output_dir>/<section>.json`` (and its per-example records under
``generations/``); asking again for the same evaluation of the same model reuses them.
"""

from __future__ import annotations

import os

from immunize.config import parse_config

HELP = "evaluate a model: harmfulness, refusals, toxicity, capability, perplexity, trainability"


def main(argv: list[str]) -> int:
    # The harness loads its tasks through `datasets`: local JSON files only, never the hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from immunize.evaluation.config import EvaluationConfig

    (cfg,) = parse_config([EvaluationConfig], argv, prog="immunize evaluate", description=HELP)
    from immunize.evaluation import evaluate, get_section, section_names
    from immunize.evaluation.runner import headline_text
    from immunize.locks import run_lock

    _set_threads(cfg.threads)
    with run_lock(cfg.output_dir):  # a second evaluation into the same directory fails at once
        summary = evaluate(config=cfg, verbose=True)
    print(
        f"\n{summary['model']['name']} ({summary['model']['fingerprint']}), suite {summary['suite']}, "
        f"{summary['seconds']:.0f}s ({summary['cpu_seconds']:.0f} CPU-s):"
    )
    width = max(len(name) for name in section_names())
    for name, entry in summary["sections"].items():
        document = {"metrics": entry["metrics"]}
        status = "reused" if entry["reused"] else f"{entry['seconds']:.0f}s"
        print(f"  {name:<{width}}  {status:>7}  {headline_text(get_section(name), document)}")
    print(f"results: {cfg.output_dir}/summary.json")
    return 0


def _set_threads(threads: int | None) -> None:
    """``--threads N`` as given; unset: torch's default, unless the CPUs are already oversubscribed.

    On a machine whose load average exceeds its cores, a multi-threaded op waits at every
    barrier for a thread the scheduler has parked: small ops (every decoding step) then run 2-3x
    slower than on one thread, so one thread is used and the choice is printed.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
        return
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if torch.get_num_threads() > 1 and load > 1.5 * cores:
        print(f"load average {load:.1f} on {cores} CPUs: running torch on 1 thread (--threads N overrides)")
        torch.set_num_threads(1)
