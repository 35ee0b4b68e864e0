"""Two real processes (torchrun, gloo on CPU) against one: the SFT attack and RepNoise, under DDP and
FSDP2, on the tiny model.

Each job runs both methods in the same processes (``worker.py``'s ``+``):

- ``one``: a single process; the SFT attack with batch 2b, RepNoise with batch b and 2
  accumulation steps;
- ``ddp``: ``python -m torch.distributed.run --standalone --nproc_per_node 2`` (what
  ``accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2`` starts;
  ``accelerate launch --cpu`` starts one process only); batch b per rank for both;
- ``fsdp2``: the same two processes with the ``FSDP_*`` variables of
  ``configs/accelerate/fsdp2.yaml`` (FSDP2, one unit per decoder layer, the root holding the tied
  embedding, the final norm and the LM head, full state dict); accelerate drops FSDP on CPU
  processes, so ``worker.py`` puts its plugin back (see there).

Accelerate gives rank r the micro-batch r of every 2 (``BatchSamplerShard``) of one seeded order,
so the ranks' micro-batches of a step are the single process's two micro-batches (RepNoise) or the
two halves of its batch (SFT). The SFT loss is normalised by the answer tokens of the whole step,
RepNoise's is a per-micro-batch mean (its MMD, bandwidth and lens mean are batch statistics) and
its noise is drawn per example: per-step losses and final weights agree to float rounding.
FSDP2 also resumes from its own checkpoint: the attack restarted from step 2 ends where the
uninterrupted one did.

About 3 minutes on two cores (jobs side by side, mostly imports): run with ``-m distributed``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .launch import base_env, run_jobs

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, BATCH = 4, 2  # two ranks x BATCH against one process x 2*BATCH (or BATCH x 2 accumulation)
# Measured: DDP 4.8e-7 (losses) / 7.5e-9 (weights); FSDP2 within the same tolerance.
LOSS_ATOL = 1e-5
WEIGHT_ATOL = 1e-5
# RepNoise also on a tiny Llama with tied embeddings (SmolLM2's layout): under FSDP2 accelerate puts
# the tied embedding, the final norm and the LM head in one unit, which the logit lens runs inside.
METHODS = ("attack", "repnoise", "repnoise-tied")

# What `accelerate launch --config_file configs/accelerate/fsdp2.yaml` puts in each worker's
# environment (checked against the file by tests/test_accelerate_configs.py).
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
             "FSDP_RESHARD_AFTER_FORWARD": "true", "IMMUNIZE_TEST_FSDP_ON_CPU": "1"}


def _common(model: Path, data_root: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--data_root", str(data_root), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--max_length", "128", "--learning_rate", "1e-3", "--seed", "7",
            "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none",
            # Checkpoints are kept: trainer_state.json holds every step's loss, step 2 is resumed from.
            "--keep_checkpoints", "true", "--save_steps", "2", "--save_total_limit", "2"]


def attack_argv(model: Path, data_root: Path, out: Path, batch: int) -> list[str]:
    return ["attack", *_common(model, data_root, out), "--num_samples", str(2 * BATCH * STEPS),
            "--per_device_train_batch_size", str(batch), "--curve", "false"]


def repnoise_argv(model: Path, data_root: Path, out: Path, accumulation: int) -> list[str]:
    return ["defend", "--defence", "repnoise", *_common(model, data_root, out), "--num_samples", str(2 * BATCH),
            "--per_device_train_batch_size", str(BATCH), "--gradient_accumulation_steps", str(accumulation)]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_checkpoint, shared_small_data_root) -> Path:
    """Every job, run once for the module: ``base/<job>/{attack,repnoise,repnoise-tied}``."""
    from immunize.testing import save_tiny_checkpoint

    base = tmp_path_factory.mktemp("parity")
    model, data = tiny_checkpoint, shared_small_data_root
    tied = save_tiny_checkpoint(base / "tiny-tied", "llama", tie_embeddings=True)

    def both(job: str, batch: int, accumulation: int) -> list[str]:
        return [*attack_argv(model, data, base / job / "attack", batch), "+",
                *repnoise_argv(model, data, base / job / "repnoise", accumulation), "+",
                *repnoise_argv(tied, data, base / job / "repnoise-tied", accumulation)]

    run_jobs({"one": (1, both("one", 2 * BATCH, 2), base_env(base / "writes-one")),
              "ddp": (2, both("ddp", BATCH, 1), base_env(base / "writes-ddp"))}, base)
    run_jobs({"fsdp2": (2, both("fsdp2", BATCH, 1), {**base_env(base / "writes-fsdp2"), **FSDP2_ENV})}, base)
    # Resume: the FSDP2 attack's folder as it was after step 2, then the same command again.
    resumed = base / "fsdp2-resumed" / "attack"
    shutil.copytree(base / "fsdp2" / "attack", resumed)
    run = attack_dir(resumed)
    shutil.rmtree(run / f"checkpoint-{STEPS}")
    for name in ("model.safetensors", "immunize-complete.json", "README.md"):
        (run / name).unlink()
    # A run started afresh would write checkpoint-2 again; a resumed one only reads it.
    (base / "checkpoint-2.mtime").write_text(str((run / "checkpoint-2" / "model.safetensors").stat().st_mtime_ns))
    run_jobs({"fsdp2-resumed": (2, attack_argv(model, data, resumed, BATCH),
                                {**base_env(base / "writes-resumed"), **FSDP2_ENV})}, base)
    return base


def attack_dir(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def model_dir(outputs: Path, job: str, method: str) -> Path:
    root = outputs / job / method
    return attack_dir(root) if method == "attack" else root


def step_losses(outputs: Path, job: str, method: str) -> list[float]:
    state = json.loads((model_dir(outputs, job, method) / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    logs = sorted((e["step"], e["loss"]) for e in state["log_history"] if "loss" in e)
    assert [step for step, _ in logs] == list(range(1, STEPS + 1))
    return [loss for _, loss in logs]


def weights(outputs: Path, job: str, method: str) -> dict[str, torch.Tensor]:
    return load_file(model_dir(outputs, job, method) / "model.safetensors")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("job", ["ddp", "fsdp2"])
def test_per_step_losses_match_one_process(outputs, job, method):
    one, two = step_losses(outputs, "one", method), step_losses(outputs, job, method)
    diff = max(abs(a - b) for a, b in zip(one, two, strict=True))
    print(f"{job} {method}: max |loss diff| over {STEPS} steps: {diff:.3g}")
    assert diff <= LOSS_ATOL, (one, two)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("job", ["ddp", "fsdp2"])
def test_final_weights_match_one_process(outputs, job, method):
    one, two = weights(outputs, "one", method), weights(outputs, job, method)
    if job == "fsdp2" and method == "repnoise-tied":
        # The gathered full state dict names the tied tensor twice; the copies are equal and
        # from_pretrained ties them again (test_checkpoint_loads_with_from_pretrained).
        assert set(two) - set(one) == {"lm_head.weight"}
        assert torch.equal(two.pop("lm_head.weight"), two["model.embed_tokens.weight"])
    assert one.keys() == two.keys()
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"{job} {method}: max |weight diff|: {diff:.3g}")
    assert diff <= WEIGHT_ATOL


def test_fsdp2_ran_sharded(outputs):
    """The FSDP2 job trained through FSDP (its checkpoints are accelerate's FSDP files), DDP's did not."""
    assert (model_dir(outputs, "fsdp2", "attack") / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()
    assert not (model_dir(outputs, "ddp", "attack") / "checkpoint-2" / "pytorch_model_fsdp.bin").exists()
    assert (model_dir(outputs, "fsdp2", "repnoise") / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()
    assert (model_dir(outputs, "fsdp2", "repnoise-tied") / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()


def test_fsdp2_resumes_from_its_own_checkpoint(outputs):
    done = weights(outputs, "fsdp2", "attack")
    resumed = load_file(attack_dir(outputs / "fsdp2-resumed" / "attack") / "model.safetensors")
    diff = max((done[k] - resumed[k]).abs().max().item() for k in done)
    print(f"fsdp2 resumed at step 2: max |weight diff| to the uninterrupted run: {diff:.3g}")
    assert diff <= WEIGHT_ATOL
    run = attack_dir(outputs / "fsdp2-resumed" / "attack")
    assert str((run / "checkpoint-2" / "model.safetensors").stat().st_mtime_ns) == \
        (outputs / "checkpoint-2.mtime").read_text()
    assert step_losses(outputs, "fsdp2-resumed", "attack") == pytest.approx(step_losses(outputs, "fsdp2", "attack"),
                                                                             abs=LOSS_ATOL)


@pytest.mark.parametrize("job", ["ddp", "fsdp2"])
@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_loads_with_from_pretrained(outputs, tiny_checkpoint, job, method):
    """The gathered checkpoint loads, and training moved it (parity of unmoved weights proves nothing)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir(outputs, job, method))
    base = AutoModelForCausalLM.from_pretrained(outputs / "tiny-tied" if method == "repnoise-tied" else tiny_checkpoint)
    assert model.config.tie_word_embeddings == (method == "repnoise-tied")
    if method == "repnoise-tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    trained, initial = model.state_dict(), base.state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("method", METHODS)
def test_one_set_of_outputs(outputs, method):
    """The same files as the single-process run, bar one RNG state per rank."""
    one, two = model_dir(outputs, "one", method), model_dir(outputs, "ddp", method)
    ranks = {f"checkpoint-{s}/rng_state_{r}.pth" for s in (2, STEPS) for r in range(2)}
    assert _files(two) - ranks == _files(one) - {f"checkpoint-{s}/rng_state.pth" for s in (2, STEPS)}
    assert not list(two.rglob("*.tmp")) and not list(two.parent.rglob(".immunize.lock"))
    marker = json.loads((two / "immunize-complete.json").read_text())
    assert marker["steps"] == STEPS
    if method == "attack":
        assert marker["examples"] == 2 * BATCH * STEPS
        index = [json.loads(line) for line in (outputs / "ddp" / "attack" / "attacks.jsonl").read_text().splitlines()]
        assert [row["status"] for row in index] == ["complete"]
        assert index[0]["budget"]["batch_size"] == 2 * BATCH


@pytest.mark.parametrize("job", ["ddp", "fsdp2"])
def test_each_file_is_written_by_rank_zero_only(outputs, job):
    """Identity, provenance, model card, index and marker: written by rank 0, each once per run."""
    writes = {log.name.rsplit(".rank", 1)[1]: log.read_text().splitlines()
              for log in outputs.glob(f"writes-{job}.rank*")}
    assert set(writes) <= {"0", "1"} and writes.get("0")
    assert writes.get("1", []) == [], f"rank 1 wrote {sorted(set(writes['1']))}"
    for method in METHODS:
        run = model_dir(outputs, job, method)
        assert writes["0"].count(str(run / "immunize-complete.json")) == 1
        assert writes["0"].count(str(run / "provenance.json")) == 1
