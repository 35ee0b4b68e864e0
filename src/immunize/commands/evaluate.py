"""`immunize evaluate`: harmfulness, over-refusal, toxicity, capability, perplexity, trainability.

    immunize evaluate --model smollm2-135m-instruct --suite quick --output_dir runs/eval-quick

Each section writes ``<output_dir>/<section>.json`` (and its per-example records under
``generations/``); asking again for the same evaluation of the same model reuses them.
"""

from __future__ import annotations

from immunize.config import parse_config

HELP = "evaluate a model: harmfulness, refusals, toxicity, capability, perplexity, trainability"


def main(argv: list[str]) -> int:
    import os

    # The harness loads its tasks through `datasets`: local JSON files only, never the hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from immunize.evaluation.config import EvaluationConfig

    (cfg,) = parse_config([EvaluationConfig], argv, prog="immunize evaluate", description=HELP)
    from immunize.evaluation import SECTIONS, evaluate, get_section
    from immunize.evaluation.runner import headline_text

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    summary = evaluate(config=cfg, verbose=True)
    print(
        f"\n{summary['model']['name']} ({summary['model']['fingerprint']}), suite {summary['suite']}, "
        f"{summary['seconds']:.0f}s ({summary['cpu_seconds']:.0f} CPU-s):"
    )
    width = max(len(name) for name in SECTIONS)
    for name, entry in summary["sections"].items():
        document = {"metrics": entry["metrics"]}
        status = "reused" if entry["reused"] else f"{entry['seconds']:.0f}s"
        print(f"  {name:<{width}}  {status:>7}  {headline_text(get_section(name), document)}")
    print(f"results: {cfg.output_dir}/summary.json")
    return 0
