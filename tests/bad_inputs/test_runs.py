"""Runs: concurrency and interruption (issue 13).

Two processes never share a run directory (the second fails at once, naming the first) nor build one
cache entry at once (the second waits, then reuses it); a SIGTERM saves a checkpoint before the run
exits; short runs checkpoint by time; a resumed run reports the loss of the whole run and the same
weights as an uninterrupted one; a run that saved nothing never blocks its corrected rerun.

The other process is real (``subprocess``): ``flock`` locks are per process, and a lock must survive
only as long as its holder does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from immunize.cli import main
from immunize.locks import LOCK_FILE, cache_lock, run_lock
from immunize.method_runner import is_complete

HOST = socket.gethostname()
LOGGER = "immunize"


# --- helpers -------------------------------------------------------------------------------------

@contextmanager
def other_process(code: str):
    """A real second process running ``code``; it prints ``held`` once it holds its lock, and lets
    go when its stdin closes (``release``)."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def release(proc: subprocess.Popen, after: float = 0.0) -> None:
    threading.Timer(after, proc.stdin.close).start()


def holding(lock_call: str, then: str = "") -> str:
    """Code that holds ``lock_call`` until its stdin closes, then runs ``then`` (still holding it)."""
    return (f"import sys\nfrom immunize.locks import run_lock, cache_lock\nwith {lock_call}:\n"
            f"    print('held', flush=True)\n    sys.stdin.read()\n" + "".join(f"    {line}\n" for line in
                                                                            then.splitlines()))


def waited_for(caplog, holder: subprocess.Popen, what: str) -> bool:
    """The one log line of a process that waited for ``holder`` to build ``what``."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    return len(lines) == 1 and lines[0].startswith(f"waiting for pid {holder.pid} on host {HOST} (since ") \
        and lines[0].endswith(f") building {what}")


def defend_argv(model, out, *extra, data=None) -> list[str]:
    return ["defend", "--defence", "repnoise", "--model", str(model), "--output_dir", str(out), "--max_length",
            "64", "--num_samples", "8", "--max_steps", "4", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--use_cpu", "--disable_tqdm", "true", "--report_to", "none",
            "--seed", "3", *(["--data_root", str(data)] if data else []), *map(str, extra)]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, real_data_root) -> Path:
    """What repnoise reads, with 300 BeaverTails rows: loading the full data takes seconds per run."""
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(real_data_root / "refusals", root / "refusals")
    (root / "beavertails").mkdir()
    shutil.copy(real_data_root / "beavertails/eval_prompts.jsonl", root / "beavertails")
    rows = (real_data_root / "beavertails/qa.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "beavertails/qa.jsonl").write_text("".join(rows[:300]), encoding="utf-8")
    manifest = json.loads((real_data_root / "MANIFEST.json").read_text(encoding="utf-8"))
    (root / "MANIFEST.json").write_text(json.dumps({k: v for k, v in manifest.items() if (root / k).is_file()}))
    return root


@pytest.fixture
def defend(tiny_checkpoint, small_data):
    """``defend(out, *flags)``: the argv of a 4-step repnoise defence on the tiny model."""
    return lambda out, *extra: defend_argv(tiny_checkpoint, out, *extra, data=small_data)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_checkpoint, small_data) -> Path:
    """The uninterrupted run (logging every 3 steps) that interrupted ones must end up equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests themselves (conftest): the same reduction order
    try:
        assert main(defend_argv(tiny_checkpoint, out, "--logging_steps", 3, data=small_data)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def add_callback(monkeypatch):
    """``add_callback(cb)``: every repnoise trainer built from now on carries ``cb``."""
    from immunize.defences import get_defence

    defence = type(get_defence("repnoise"))
    original = defence.build_trainer

    def install(callback):
        def build(self, *args, **kwargs):
            trainer = original(self, *args, **kwargs)
            trainer.add_callback(callback)
            return trainer

        monkeypatch.setattr(defence, "build_trainer", build)

    yield install
    monkeypatch.setattr(defence, "build_trainer", original)


class Crash(Exception):
    pass


class CrashAt(TrainerCallback):
    """A crash (the stand-in for a kill) as step ``step`` begins, after step ``step - 1`` was saved."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            raise Crash


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for path in sorted(directory.glob("*.safetensors")) for k, v in load_file(path).items()}


def assert_same_run(a: Path, b: Path) -> None:
    """The same weights and the same recorded loss of the whole run."""
    wa, wb = weights(a), weights(b)
    assert wa and wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=0, msg=key)
    assert is_complete(b)["train_loss"] == pytest.approx(is_complete(a)["train_loss"], rel=1e-6)


# --- run directories are locked ------------------------------------------------------------------

COMMANDS = {
    "defend": lambda model, out: defend_argv(model, out),
    "align": lambda model, out: ["align", "--model", model, "--output_dir", out, "--num_harmful", "4",
                                 "--num_benign", "4", "--use_cpu"],
    "attack": lambda model, out: ["attack", "--model", model, "--output_dir", out, "--num_samples", "4",
                                  "--use_cpu"],
    "evaluate": lambda model, out: ["evaluate", "--model", model, "--output_dir", out, "--sections", "perplexity"],
    "run": lambda model, out: ["run", "--model", model, "--output_dir", out],
}


@pytest.mark.usefixtures("real_data_root")
@pytest.mark.parametrize("command", COMMANDS)
def test_a_directory_another_process_holds_is_refused_at_once_naming_it(command, tmp_path, tiny_checkpoint,
                                                                       fails):
    out = tmp_path / "out"
    with other_process(holding(f"run_lock({str(out)!r})")) as holder:
        started = time.perf_counter()
        fails(COMMANDS[command](str(tiny_checkpoint), out),
              f"--output_dir {out}: in use by pid {holder.pid} on host {HOST} (since ",
              "); wait for it or choose another --output_dir", untouched=[tmp_path])
        assert time.perf_counter() - started < 20  # no waiting: parsing, then the lock


def test_two_processes_on_one_directory_one_wins_and_the_other_fails_at_once(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    code = (f"import os, sys, time\nfrom pathlib import Path\nfrom immunize.errors import ImmunizeError\n"
            f"from immunize.locks import run_lock\nprint(os.getpid(), flush=True)\n"
            f"while not Path({str(go)!r}).exists(): time.sleep(0.005)\n"
            f"try:\n    with run_lock({str(out)!r}):\n        print('won', flush=True)\n        time.sleep(2)\n"
            f"except ImmunizeError as err:\n    print(err, flush=True)\n    sys.exit(2)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    pids = [int(p.stdout.readline()) for p in procs]
    go.touch()
    started = time.perf_counter()
    lines = [p.stdout.readline().strip() for p in procs]
    first_answer = time.perf_counter() - started
    codes = [p.wait() for p in procs]
    winner, loser = (0, 1) if codes == [0, 2] else (1, 0)
    assert sorted(codes) == [0, 2] and lines[winner] == "won"
    assert lines[loser].startswith(f"--output_dir {out}: in use by pid {pids[winner]} on host {HOST}")
    assert first_answer < 1.5  # both answered while the winner still held it: the loser did not wait
    assert not (out / LOCK_FILE).exists()  # removed by the winner as it let go


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    with other_process(holding(f"run_lock({str(out)!r})")) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert (out / LOCK_FILE).is_file()  # its file stays behind; its lock died with it
        with run_lock(out):
            assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert not (out / LOCK_FILE).exists()  # removed by whoever lets go of the lock


def test_locks_nest_within_a_process_and_only_rank_zero_takes_them(tmp_path, monkeypatch):
    from immunize.errors import ImmunizeError
    from immunize.pipeline.run import Experiment

    root = tmp_path / "run"
    with run_lock(root):
        with run_lock(root), run_lock(root / "stages" / "defend-x" / "model"):  # re-entrant; another file
            assert (root / "stages" / "defend-x" / "model" / LOCK_FILE).is_file()
        assert json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid()  # still held
    assert not root.exists()

    # `immunize run` holds its directory while every stage runs inside it.
    seen = {}
    monkeypatch.setattr(Experiment, "_run", lambda self: seen.setdefault(
        "pid", json.loads((self.root / LOCK_FILE).read_text())["pid"]))
    experiment = Experiment.__new__(Experiment)
    experiment.root = root
    experiment.run()
    assert seen["pid"] == os.getpid()

    # In a distributed job only rank 0 takes the lock; the other ranks work under it.
    with other_process(holding(f"run_lock({str(root)!r})")):
        with pytest.raises(ImmunizeError, match="in use by pid"), run_lock(root):
            pass
        monkeypatch.setenv("RANK", "1")
        with run_lock(root):
            pass


# --- shared caches are built once ----------------------------------------------------------------

def test_task_files_being_written_by_another_run_are_waited_for_then_reused(tmp_path, real_data_root, caplog,
                                                                           monkeypatch):
    import immunize.tasks as tasks

    out = tmp_path / "tasks"
    build = f"from immunize.tasks import materialize\nmaterialize(['truthfulqa_mc1'], root={str(real_data_root)!r}, " \
            f"target={str(out)!r})"
    with other_process(holding(f"cache_lock({str(out)!r}, 'x')", then=build)) as builder:
        monkeypatch.setattr(tasks, "_write_tasks", lambda *a: pytest.fail("built twice"))
        release(builder, after=0.5)
        with caplog.at_level("WARNING", logger=LOGGER):
            result = tasks.materialize(["truthfulqa_mc1"], root=real_data_root, target=out)
    assert result.include_path == out and (out / "complete").is_file() and (out / "truthfulqa_mc1.yaml").is_file()
    assert waited_for(caplog, builder, "the lm-eval task files")


def test_a_model_being_converted_by_another_run_is_waited_for_then_reused(tmp_path, isolated_cache, caplog,
                                                                         monkeypatch):
    from immunize.models import loading

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = loading.conversion_target(gguf)
    convert = (f"from pathlib import Path\ntarget = Path({str(target)!r})\ntarget.mkdir()\n"
               "(target / 'config.json').write_text('{}')\n(target / 'model.safetensors').write_bytes(b'')")
    with other_process(holding(f"cache_lock({str(target)!r}, 'x')", then=convert)) as converter:
        monkeypatch.setattr(loading, "_dequantize", lambda *a: pytest.fail("converted twice"))
        release(converter, after=0.5)
        with caplog.at_level("WARNING", logger=LOGGER):
            assert loading.resolve_model_source(str(gguf)) == str(target)
    assert waited_for(caplog, converter, "the fp32 copy of m.gguf")


@pytest.mark.usefixtures("real_data_root")
def test_judges_being_trained_by_another_run_are_waited_for_then_reused(tmp_path, tiny_checkpoint, isolated_cache,
                                                                       caplog, monkeypatch):
    from immunize.judges import training
    from immunize.judges.encoders import register_encoder, unregister_encoder
    from immunize.judges.specs import SPECS, recipe_fingerprint
    from immunize.judges.trained import FORMAT_VERSION, judges_dir
    from immunize.pipeline.run import Experiment
    from test_pipeline import FixedEncoder, recipe

    register_encoder(FixedEncoder.name, FixedEncoder)
    try:
        # The other run writes the judges this one needs, as `immunize judge train` would.
        def meta(name: str) -> str:
            return json.dumps({"format_version": FORMAT_VERSION, "recipe": recipe_fingerprint(SPECS[name]),
                               "encoder": {"name": FixedEncoder.name, "identity": FixedEncoder.identity}})

        write = "".join(f"d = root / {name!r}\nd.mkdir(parents=True)\n(d / 'head.safetensors').write_text('h')\n"
                        f"(d / 'head.json').write_text({meta(name)!r})\n"
                        for name in ("harmfulness", "refusal", "toxicity"))
        root = judges_dir()
        code = holding(f"cache_lock({str(root)!r}, 'x')", then=f"from pathlib import Path\nroot = Path({str(root)!r})\n"
                                                               + write)
        with other_process(code) as trainer:
            monkeypatch.setattr(training, "train_judges", lambda *a, **k: pytest.fail("trained twice"))
            release(trainer, after=0.5)
            with caplog.at_level("WARNING", logger=LOGGER):
                state = Experiment(recipe(tmp_path, tiny_checkpoint)).judges()
        assert all(state.values())
        assert waited_for(caplog, trainer, "the trained judges")
    finally:
        unregister_encoder(FixedEncoder.name)


def test_judge_training_holds_the_judges_lock(tmp_path, monkeypatch):
    """`immunize judge train` and a run's judge training exclude each other (the embedding cache too)."""
    from immunize.judges import training

    seen = []
    monkeypatch.setattr("immunize.judges.encoders.make_encoder", lambda *a, **k: None)

    def train_judge(name, **kwargs):
        seen.append(json.loads((tmp_path / ".judges.lock").read_text())["pid"])
        return {}

    monkeypatch.setattr(training, "train_judge", train_judge)
    training.train_judges(["harmfulness"], out_root=tmp_path / "judges", embedding_cache=False)
    assert seen == [os.getpid()] and not (tmp_path / ".judges.lock").exists()


def test_a_cache_lock_waits_and_says_whom_for_once(tmp_path, caplog):
    target = tmp_path / "entry"
    with other_process(holding(f"cache_lock({str(target)!r}, 'x')")) as holder:
        release(holder, after=0.5)
        started = time.perf_counter()
        with caplog.at_level("WARNING", logger=LOGGER), cache_lock(target, "the entry"):
            waited = time.perf_counter() - started
    assert waited >= 0.4 and waited_for(caplog, holder, "the entry")


# --- interruption --------------------------------------------------------------------------------

class SigtermAt(TrainerCallback):
    """A scheduler's pre-emption: SIGTERM to this process during step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_a_checkpoint_then_the_rerun_resumes_to_the_same_run(tmp_path, defend, straight, capsys,
                                                                          add_callback):
    # logging_steps 3: the checkpoint (step 2) is not a logging step of the run's own schedule.
    options = ("--logging_steps", 3, "--save_every_seconds", 0)
    add_callback(SigtermAt(2))
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "resumed"
    capsys.readouterr()
    assert main(defend(out, *options)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err  # progress bars of the checkpoint's writer come before the message
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "immunize defend: interrupted (SIGTERM) at step 2; checkpoint saved; re-run the same command to resume")
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is removed with training
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"] and not is_complete(out)
    assert not (out / LOCK_FILE).exists()
    add_callback(TrainerCallback())
    assert main(defend(out, *options)) == 0
    assert_same_run(straight, out)


def test_a_short_run_checkpoints_by_time_and_resumes_to_the_same_run(tmp_path, defend, straight, add_callback):
    # save_steps stays 50, so the checkpoint is a timed one (the interval is a microsecond: the first
    # step saves, later ones once ten times that save's duration has passed). The rerun's other
    # interval is not part of the run's identity.
    add_callback(CrashAt(4))
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        main(defend(out, "--logging_steps", 3, "--save_every_seconds", 1e-6))
    (checkpoint,) = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 1 <= step <= 3
    # A kill -9 while the next checkpoint was written leaves it without its trainer state (written last).
    cut_short = out / f"checkpoint-{step + 1}"
    cut_short.mkdir()
    shutil.copy(checkpoint / "model.safetensors", cut_short)
    add_callback(TrainerCallback())
    assert main(defend(out, "--logging_steps", 3)) == 0
    assert_same_run(straight, out)  # resumed from the complete checkpoint, not the one cut short


def test_checkpoints_by_time_are_spaced_to_keep_saving_cheap():
    from transformers import TrainerControl, TrainerState

    from immunize.training import CheckpointPolicy

    now = [0.0]
    policy = CheckpointPolicy(120, clock=lambda: now[0])
    state, control = TrainerState(global_step=1, max_steps=100), TrainerControl()

    def step(at: float) -> bool:
        now[0] = at
        control.should_save = control.should_log = False
        policy.on_step_end(None, state, control)
        return control.should_save

    policy.on_train_begin(None, state, control)
    assert not step(119) and step(121) and control.should_log  # a checkpoint step is a logging step
    now[0] = 181  # that save took 60 s: the next one waits ten times as long
    policy.on_save(None, state, control)
    assert not step(181 + 599) and step(181 + 601)
    assert not CheckpointPolicy(0, clock=lambda: 1e9).on_step_end(None, state, TrainerControl()).should_save


def test_the_loss_of_the_whole_run_weights_each_log_by_the_steps_it_covers():
    from immunize.method_runner import run_loss

    # logging_steps 3, resumed from a checkpoint at step 4 (a forced log), 7 steps: 3 + 1 + 3 steps.
    history = [{"loss": 1.0, "step": 3}, {"loss": 4.0, "step": 4}, {"loss": 2.0, "step": 7},
               {"train_loss": 9.0, "step": 7}]
    assert run_loss(history, reported=2.0) == pytest.approx((3 * 1.0 + 4.0 + 3 * 2.0) / 7)
    assert run_loss([], reported=2.5) == 2.5


# --- a run that saved nothing never blocks its fix -----------------------------------------------

def test_a_run_that_saved_nothing_is_replaced_by_its_corrected_rerun(tmp_path, defend, add_callback, caplog):
    out = tmp_path / "run"
    add_callback(CrashAt(2))
    with pytest.raises(Crash):
        main(defend(out, "--per_device_train_batch_size", 4, "--save_every_seconds", 0))
    assert not list(out.glob("checkpoint-*")) and (out / "immunize-run.json").is_file()
    add_callback(TrainerCallback())
    with caplog.at_level("WARNING", logger=LOGGER):
        assert main(defend(out)) == 0
    assert is_complete(out)["options"]["per_device_train_batch_size"] == 2
    replaced = [r.getMessage() for r in caplog.records if "replacing" in r.getMessage()]
    assert replaced == [f"--output_dir {out}: replacing a run with different per_device_train_batch_size "
                        "that saved nothing"]


def test_a_run_with_a_checkpoint_still_refuses_other_options(tmp_path, defend, add_callback, fails):
    out = tmp_path / "run"
    add_callback(CrashAt(3))
    with pytest.raises(Crash):
        main(defend(out, "--per_device_train_batch_size", 4, "--save_steps", 1))
    assert (out / "checkpoint-2").is_dir()
    add_callback(TrainerCallback())
    fails(defend(out), f"--output_dir {out}: holds a run with different per_device_train_batch_size;",
          untouched=[tmp_path])


# --- real kills (slow: each process imports torch and transformers, ~30 s here) --------------------

def _cli(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "immunize", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_defends_on_one_directory_one_trains_and_the_other_fails_at_once(tmp_path, defend):
    out = tmp_path / "run"
    argv = defend(out, "--max_steps", 40, "--save_steps", 5)
    procs = [_cli(*argv) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (err,) = [e.strip().splitlines()[-1] for code, e in results if code == 2]
    winner = next(p.pid for p, (code, _) in zip(procs, results, strict=True) if code == 0)
    assert err.startswith(f"immunize defend: error: --output_dir {out}: in use by pid {winner} on host {HOST}")
    assert is_complete(out)["steps"] == 40


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_weights(tmp_path, defend):
    assert main(defend(tmp_path / "straight", "--max_steps", 60)) == 0
    out = tmp_path / "killed"
    proc = _cli(*defend(out, "--max_steps", 60, "--save_steps", 5))
    deadline = time.time() + 300
    while not list(out.glob("checkpoint-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert list(out.glob("checkpoint-*")) and not is_complete(out)
    assert main(defend(out, "--max_steps", 60)) == 0  # the dead holder's lock is gone
    assert_same_run(tmp_path / "straight", out)
