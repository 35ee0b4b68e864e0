"""A tiny ``immunize run`` on two real processes (torchrun, gloo on CPU; DDP, then FSDP2) against the
same run on one.

The recipe is ``tests/test_pipeline.py``'s (align, none and RepNoise, one SFT attack, every
evaluation section, the analysis), with the same global batch: two ranks with batch 2 against
one process with batch 2 and 2 accumulation steps, so every training stage sees the same
micro-batches. The judges are a deterministic length judge (``worker.py``). The two-process run
must finish with one set of stage outputs, written by rank 0 alone, and a ``results.json`` equal
to the single-process one but for what names the run (times, the command, the recipe's batch
options, stage paths and keys, which hold the process count); scores agree to float rounding
(``TOLERANCE``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from .launch import base_env, run_jobs
from .test_parity import FSDP2_ENV

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Scores of runs whose weights agree to float rounding. Measured: DDP equal to the last bit (max
# |diff| 0); FSDP2 within 2.8e-5 absolute (a perplexity CI bound), 1.9e-6 on TruthfulQA MC2, every
# text and count equal.
TOLERANCE = {"two": 1e-6, "fsdp2": 1e-5}


def recipe(tmp: Path, model: Path, data_root: Path, accumulation: int) -> dict:
    batch = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": accumulation}
    return dict(
        name="tiny", output_dir=str(tmp / "run"), model=str(model), data_root=str(data_root),
        # At 256 tokens no stage drops an example (the alignment keeps 16, RepNoise 8 pairs, the attack
        # 8): whole global batches only. accelerate tops a last short batch up with repeated examples
        # (even_batches), which one process does not see.
        max_length=256,
        align={"num_harmful": 8, "num_benign": 8, "learning_rate": 1e-3, **batch},
        defences=[{"label": "none"}, {"label": "repnoise", "num_samples": 8, "learning_rate": 1e-3, **batch}],
        attacks=[{"label": "sft", "curve_every_steps": 1, **batch,
                  "grid": {"learning_rate": [1e-3], "num_samples": [8], "seed": [1]}}],
        curve_num_prompts=2, curve_max_new_tokens=4,
        eval_harmfulness_samples=6, eval_max_new_tokens=6, eval_capability_limit=2, eval_trainability_steps=1,
        eval_trainability_tasks="viggo", eval_trainability_eval_samples=2,
        eval_toxicity_samples=2, eval_overrefusal_samples=2, analysis_examples=4, analysis_layers=[1, 2],
        held_out_categories=["animal_abuse", "self_harm", "child_abuse"],
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint, real_data_root) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("run")

    def job(name: str, ranks: int, accumulation: int, extra_env: dict[str, str]):
        (base / name).mkdir()
        config = base / name / "recipe.yaml"
        config.write_text(yaml.safe_dump(recipe(base / name, tiny_checkpoint, real_data_root, accumulation)))
        env = {**base_env(base / f"writes-{name}"), "IMMUNIZE_TEST_FAKE_JUDGES": "1",
               "IMMUNIZE_CACHE": str(base / name / "cache"), **extra_env}
        return ranks, ["run", "--config", str(config)], env

    run_jobs({"one": job("one", 1, 2, {}), "two": job("two", 2, 1, {})}, base)
    # FSDP2: the trainers shard the model; generation on a sharded model (the attack's curve,
    # trainability's fine-tuned copy) runs on every rank in step.
    run_jobs({"fsdp2": job("fsdp2", 2, 1, FSDP2_ENV)}, base)
    return {name: base / name / "run" for name in ("one", "two", "fsdp2")} | {"base": base}


def comparable(results: dict) -> dict:
    """results.json without what names this run rather than what it measured."""
    out = {k: v for k, v in results.items() if k not in ("run", "models")}
    out["models"] = {label: {k: v for k, v in model.items() if k not in ("path", "fingerprint")}
                     for label, model in results["models"].items()}
    # The entries' options as given: the batch options that make the global batches equal differ.
    out["defence_info"] = {label: {k: v for k, v in info.items() if k != "options"}
                           for label, info in results["defence_info"].items()}
    # A method's own log values (its loss terms, RepNoise's gradient norms) are rank 0's micro-batches;
    # the Trainer's loss and gradient norm are the whole step's, on any number of processes.
    out["training"] = {label: {key: {k: v for k, v in log.items() if k in GLOBAL_LOG_KEYS}
                               if key in ("first_log", "last_log") else without_paths(log)
                               for key, log in entry.items()}
                       for label, entry in (results.get("training") or {}).items()}
    return out


def without_paths(refusals: dict) -> dict:
    """A paired-refusals summary without where its run keeps the model and the refusal cache."""
    generation = {k: {**v, "cache": None} if isinstance(v, dict) else v
                  for k, v in (refusals.get("generation") or {}).items() if k != "model"}
    return {**refusals, **({"generation": generation} if "generation" in refusals else {})}


GLOBAL_LOG_KEYS = ("loss", "grad_norm", "learning_rate", "epoch", "step")


def assert_close(one, two, tolerance: float, where="results"):
    if isinstance(one, dict):
        assert isinstance(two, dict) and one.keys() == two.keys(), where
        for key in one:
            assert_close(one[key], two[key], tolerance, f"{where}.{key}")
    elif isinstance(one, list):
        assert isinstance(two, list) and len(one) == len(two), where
        for i, (a, b) in enumerate(zip(one, two, strict=True)):
            assert_close(a, b, tolerance, f"{where}[{i}]")
    elif isinstance(one, float) and isinstance(two, float):
        assert math.isclose(one, two, rel_tol=tolerance, abs_tol=tolerance), (where, one, two)
    else:
        assert one == two, (where, one, two)


@pytest.mark.parametrize("job", ["two", "fsdp2"])
def test_results_equal_the_single_process_run(runs, job):
    one = json.loads((runs["one"] / "results.json").read_text())
    two = json.loads((runs[job] / "results.json").read_text())
    assert_close(comparable(one), comparable(two), TOLERANCE[job])
    assert one["harmfulness"]["repnoise"]["pre_attack"]["n"] > 6  # the comparison covers real answers


@pytest.mark.parametrize("job", ["two", "fsdp2"])
def test_one_set_of_stage_outputs(runs, job):
    one = sorted(p.parent.name.rsplit("-", 1)[0] for p in (runs["one"] / "stages").glob("*/stage.json"))
    two = sorted(p.parent.name.rsplit("-", 1)[0] for p in (runs[job] / "stages").glob("*/stage.json"))
    assert one == two and len(two) == 10
    assert len(list((runs[job] / "report").glob("index.html"))) == 1
    assert not list(runs[job].rglob("*.tmp")) and not list(runs[job].rglob(".immunize.lock"))


@pytest.mark.parametrize("job", ["two", "fsdp2"])
def test_rank_one_writes_nothing_and_rank_zero_writes_each_record_once(runs, job):
    logs = sorted(runs["base"].glob(f"writes-{job}.rank*"))
    writes = {log.name.rsplit(".rank", 1)[1]: log.read_text().splitlines() for log in logs}
    assert writes.get("1", []) == [], f"rank 1 wrote {sorted(set(writes['1']))}"
    assert writes["0"].count(str(runs[job] / "results.json")) == 1
    markers = [w for w in writes["0"] if w.endswith("/stage.json")]
    assert len(markers) == len(set(markers)) == 10
