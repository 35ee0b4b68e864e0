"""Two real processes (torchrun, gloo on CPU) against one: the SFT attack under DDP.

The same attack runs twice on the tiny model: once as one process with batch 2b, once as two
ranks with batch b each (``python -m torch.distributed.run --standalone --nproc_per_node 2``;
``accelerate launch --multi_gpu --num_processes 2`` starts the same two workers, ``--cpu`` only
one). The Trainer's sampler gives rank r the items r, r+2, ... of one seeded shuffled order, so
the two ranks' micro-batches together hold the same examples as the single process's batch, and
DDP averages the gradients with the loss normalised by the global number of answer tokens: the
per-step losses and the final weights must agree to float rounding.

Both jobs start side by side (three processes on two cores: most of the time is imports).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# About 65 s on two cores (three processes importing torch and transformers), over the default
# suite's one-minute allowance for this group: run with `-m distributed`.
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HERE = Path(__file__).parent
STEPS, BATCH = 4, 2  # two ranks x BATCH against one process x 2*BATCH
LOSS_ATOL = 1e-5
WEIGHT_ATOL = 1e-5
TIMEOUT = 300  # a hung collective fails the test instead of the suite


def _command(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, str(HERE / "record_writes.py")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            str(HERE / "record_writes.py")]


def _attack_argv(model: Path, data_root: Path, out: Path, batch: int) -> list[str]:
    return ["attack", "--model", str(model), "--data_root", str(data_root), "--output_dir", str(out),
            "--num_samples", str(2 * BATCH * STEPS), "--max_steps", str(STEPS),
            "--per_device_train_batch_size", str(batch), "--max_length", "128", "--learning_rate", "1e-3",
            "--seed", "7", "--use_cpu", "true", "--curve", "false", "--disable_tqdm", "true",
            "--report_to", "none",
            # The last checkpoint is kept for its trainer_state.json: the log history of every step.
            "--keep_checkpoints", "true", "--save_steps", str(STEPS)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, tiny_checkpoint, shared_small_data_root) -> dict[int, Path]:
    """Both jobs, run once for the module: {ranks: output root}."""
    base = tmp_path_factory.mktemp("parity")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    running = {}
    for ranks, batch in ((1, 2 * BATCH), (2, BATCH)):
        out = base / f"ranks{ranks}"
        argv = [*_command(ranks), *_attack_argv(tiny_checkpoint, shared_small_data_root, out, batch)]
        log = (base / f"ranks{ranks}.log").open("w")
        process = subprocess.Popen(argv, env={**env, "IMMUNIZE_WRITE_LOG": str(base / f"writes{ranks}")},
                                   stdout=log, stderr=subprocess.STDOUT)
        running[ranks] = (out, log, process)
    for ranks, (_, log, process) in running.items():
        try:
            code = process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "timeout"
        log.close()
        if code != 0:
            tail = "\n".join((base / f"ranks{ranks}.log").read_text().splitlines()[-30:])
            pytest.fail(f"{ranks}-process attack ended with {code}:\n{tail}")
    return {ranks: out for ranks, (out, _, _) in running.items()}


def _run_dir(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def _step_losses(root: Path) -> list[float]:
    state = json.loads((_run_dir(root) / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    logs = sorted((e["step"], e["loss"]) for e in state["log_history"] if "loss" in e)
    assert [step for step, _ in logs] == list(range(1, STEPS + 1))
    return [loss for _, loss in logs]


def test_per_step_losses_match_one_process(jobs):
    one, two = _step_losses(jobs[1]), _step_losses(jobs[2])
    diff = max(abs(a - b) for a, b in zip(one, two, strict=True))
    print(f"max |loss diff| over {STEPS} steps: {diff:.3g}")
    assert diff <= LOSS_ATOL, (one, two)


def test_final_weights_match_one_process(jobs):
    one = load_file(_run_dir(jobs[1]) / "model.safetensors")
    two = load_file(_run_dir(jobs[2]) / "model.safetensors")
    assert one.keys() == two.keys()
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"max |weight diff|: {diff:.3g}")
    assert diff <= WEIGHT_ATOL


def test_checkpoint_loads_with_from_pretrained(jobs, tiny_checkpoint):
    """The two-rank checkpoint loads, and the attack moved it (parity of unmoved weights proves nothing)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_run_dir(jobs[2]))
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    trained, initial = model.state_dict(), base.state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_one_set_of_outputs(jobs):
    """The same files as the single-process run (the run id aside), bar one RNG state per rank."""
    one, two = _run_dir(jobs[1]), _run_dir(jobs[2])
    extra = {f"checkpoint-{STEPS}/rng_state_{r}.pth" for r in range(2)}
    assert _files(two) - extra == _files(one) - {f"checkpoint-{STEPS}/rng_state.pth"}
    assert not list(two.rglob("*.tmp")) and not list(two.parent.rglob(".immunize.lock"))
    marker = json.loads((two / "immunize-complete.json").read_text())
    assert marker["steps"] == STEPS and marker["examples"] == 2 * BATCH * STEPS
    index = [json.loads(line) for line in (jobs[2] / "attacks.jsonl").read_text().splitlines()]
    assert [row["status"] for row in index] == ["complete"]
    assert index[0]["budget"]["batch_size"] == 2 * BATCH


def test_each_file_is_written_by_rank_zero_only(jobs):
    """Provenance, identity, model card, index and marker: written by rank 0, each once."""
    logs = sorted(jobs[2].parent.glob("writes2.rank*"))
    writes = {log.name.rsplit(".rank", 1)[1]: log.read_text().splitlines() for log in logs}
    assert set(writes) <= {"0", "1"} and writes.get("0")
    assert writes.get("1", []) == [], f"rank 1 wrote {sorted(set(writes['1']))}"
    run = _run_dir(jobs[2])
    assert writes["0"].count(str(run / "immunize-complete.json")) == 1
    assert writes["0"].count(str(run / "provenance.json")) == 1
