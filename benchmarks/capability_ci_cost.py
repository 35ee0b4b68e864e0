"""What a paired 95% CI of ±H on MMLU / TruthfulQA differences costs, measured on two models.

Two ``immunize evaluate --sections capability`` results of different models on the same questions
(for instance an aligned model and the same model fine-tuned further) give, per task, the per-question
differences; their spread fixes how many questions a paired interval of half-width H needs,
``n = (1.96 · sd(d) / H)²``, and the evaluations' own timings what those questions cost. The reply
for the 2-core CPU and SmolLM2 is in docs/reproduction.md; issue #17 sized its run's capability
evaluation from it.

    .venv/bin/python benchmarks/capability_ci_cost.py RUN_A RUN_B [--half_width 0.03] [--models 11]

Each RUN is an evaluation output directory holding ``capability.json`` and its per-question records.
The time per question is the evaluation's wall time shared out by loglikelihood requests (one per
answer choice: MMLU has 4, TruthfulQA as many as its choices), so a task with more choices costs more.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from immunize.evaluation.results import example_outcomes
from immunize.evaluation.stats import pair_by_key, paired_bootstrap
from immunize.io import read_jsonl
from immunize.paths import data_root
from immunize.tasks import TRUTHFULQA_FILE, convert_truthfulqa


def load(run: Path) -> tuple[dict, list[dict]]:
    doc = json.loads((run / "capability.json").read_text())
    return doc, read_jsonl(run / doc["generations"])


def choices_per_question(task: str) -> dict[int, int]:
    """Loglikelihood requests of each TruthfulQA question (its answer choices), by doc id."""
    rows = convert_truthfulqa(data_root() / TRUTHFULQA_FILE)
    field = "mc1_targets" if task == "truthfulqa_mc1" else "mc2_targets"
    return {i: len(row[field]["choices"]) for i, row in enumerate(rows)}


def requests(task: str, rows: list[dict]) -> int:
    mine = [r for r in rows if r.get("task") == task]
    if task == "mmlu":
        return 4 * len(mine)
    per_doc = choices_per_question(task)
    return sum(per_doc[int(r["doc_id"])] for r in mine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--half_width", type=float, default=0.03)
    parser.add_argument("--models", type=int, default=11, help="models a run evaluates (cost of the whole run)")
    args = parser.parse_args()

    (doc_a, rows_a), (doc_b, rows_b) = load(args.run_a), load(args.run_b)
    tasks = [t for t in ("mmlu", "truthfulqa_mc1", "truthfulqa_mc2") if t in doc_a["metrics"]]
    seconds = (doc_a["seconds"] + doc_b["seconds"]) / 2
    # Counted once per task: TruthfulQA's counts read and convert its whole question file.
    per_task = {task: requests(task, rows_a) for task in tasks}
    total_requests = sum(per_task.values())
    print(f"{args.run_a.name} vs {args.run_b.name}: {seconds:.0f} s per evaluation, {total_requests} requests "
          f"({seconds / total_requests:.3f} s a request); paired 95% CI of ±{args.half_width}")
    print("| task | n | A | B | A − B [paired 95% CI] | sd(d) | questions for ±H | s a question | "
          f"seconds per model | minutes for {args.models} models |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in tasks:
        pairs = pair_by_key(example_outcomes("capability", task, rows_a), example_outcomes("capability", task, rows_b))
        d = pairs.defended - pairs.reference
        paired = paired_bootstrap(pairs.defended, pairs.reference, resamples=10000, seed=0)
        sd = float(np.std(d, ddof=1))
        need = math.ceil((1.96 * sd / args.half_width) ** 2)
        per_question = seconds / total_requests * per_task[task] / len(d)
        lo, hi = paired["ci95"]
        print(f"| {task} | {len(d)} | {pairs.defended.mean():.3f} | {pairs.reference.mean():.3f} | "
              f"{paired['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {sd:.3f} | {need} | {per_question:.2f} | "
              f"{need * per_question:.0f} | {need * per_question * args.models / 60:.0f} |")


if __name__ == "__main__":
    main()
