"""Bad output locations, secrets and file modes (issue 13).

- An output directory that is an existing file, under a file, read-only or under ``/proc`` fails at
  the start of every command that writes one, in one line naming the option, before a model is
  loaded; so does ``judge score --output`` that is not writable or is ``--input`` itself.
- A ``config.json`` with an unknown ``model_type`` fails in one line naming the file and the value.
- ``evaluate`` checks its model and judges before it writes ``config.yaml`` and ``provenance.json``.
- Secret-like options (``--hub_token``, ``api_key=`` …) and API keys from the environment appear in
  no file a command writes, in any spelling of the flag.
- Saved weights and staged directories get the modes of ordinary new files under the umask, not the
  0600/0700 that safetensors and ``tempfile.mkdtemp`` give them.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from immunize.cli import main

SECRET = "hf_SeCrEt0123456789"
ENV_SECRET = "env-SeCrEt-0123456789"


@pytest.fixture
def workdir(tmp_path, monkeypatch, isolated_cache) -> Path:
    """A scratch directory as the working directory, with its own cache: nothing may appear in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def umask():
    """Set a umask for one test (the modes it expects follow from it); the old one comes back after."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> int:
        os.umask(mask)
        return mask

    yield set_mask
    os.umask(old)


def _can_write_read_only_dirs() -> bool:
    """Root (and CAP_DAC_OVERRIDE) writes into a mode-0500 directory: that case cannot be made there."""
    with tempfile.TemporaryDirectory() as scratch:
        os.chmod(scratch, 0o500)
        try:
            Path(scratch, "probe").touch()
        except PermissionError:
            return False
        finally:
            os.chmod(scratch, 0o700)
    return True


def write_results(run_dir: Path) -> Path:
    """A small valid ``results.json`` (the example run's required parts: quick to report on)."""
    from immunize.io import atomic_write_json
    from immunize.report.example import example_results

    full = example_results()
    atomic_write_json(run_dir / "results.json",
                      {key: full[key] for key in ("schema", "run", "defences", "budgets", "harmfulness")})
    return run_dir


def commands(model: Path, out: Path) -> dict[str, list[str]]:
    """Every command that writes an output directory, pointed at ``out``."""
    return {
        "defend": ["defend", "--defence", "none", "--model", model, "--output_dir", out],
        "align": ["align", "--model", model, "--num_harmful", "2", "--num_benign", "2", "--output_dir", out],
        "attack": ["attack", "--model", model, "--num_samples", "2", "--output_dir", out],
        "evaluate": ["evaluate", "--model", model, "--sections", "perplexity", "--output_dir", out],
        "run": ["run", "--model", model, "--output_dir", out],
        "judge train": ["judge", "train", "--judges", "refusal", "--output_dir", out],
    }


# ---- output directories -------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["defend", "align", "attack", "evaluate", "run", "judge train"])
def test_an_existing_file_as_output_dir_fails_at_the_start(fails, workdir, tiny_checkpoint, command):
    out = workdir / "taken"
    out.write_text("a file already here\n")
    fails(commands(tiny_checkpoint, out)[command], f"--output_dir {out}: is a file, not a directory",
          untouched=[workdir])
    assert out.read_text() == "a file already here\n"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["defend", "evaluate"])
def test_an_output_dir_under_proc_fails_at_the_start(fails, workdir, tiny_checkpoint, command):
    out = Path(f"/proc/immunize-test-{os.getpid()}")
    fails(commands(tiny_checkpoint, out)[command], f"--output_dir {out}: cannot create it", untouched=[workdir])


def test_an_output_dir_below_a_file_fails_naming_the_file(fails, workdir, tiny_checkpoint):
    blocker = workdir / "taken"
    blocker.write_text("")
    out = blocker / "run"
    fails(commands(tiny_checkpoint, out)["defend"], f"--output_dir {out}: {blocker} is a file, not a directory",
          untouched=[workdir])


@pytest.mark.skipif(_can_write_read_only_dirs(), reason="runs as root: mode 0500 does not stop writes "
                    "(the /proc and existing-file cases cover the check there)")
def test_a_read_only_output_dir_fails_at_the_start(fails, workdir, tiny_checkpoint):
    locked = workdir / "locked"
    write_results(locked)
    locked.chmod(0o500)
    try:
        fails(commands(tiny_checkpoint, locked / "new")["defend"], "cannot create it (Permission denied)",
              untouched=[workdir])
        fails(commands(tiny_checkpoint, locked)["evaluate"], f"--output_dir {locked}: not writable",
              untouched=[workdir])
        fails(["report", locked], f"--run_dir {locked}: not writable", untouched=[workdir])
    finally:
        locked.chmod(0o700)


def test_check_output_dir_leaves_nothing_behind(tmp_path):
    from immunize.io import check_output_dir

    assert check_output_dir(tmp_path / "a" / "b", "--output_dir") == tmp_path / "a" / "b"
    check_output_dir(tmp_path, "--output_dir")
    assert list(tmp_path.iterdir()) == []


# ---- judge score --output --------------------------------------------------------------------------

@pytest.fixture
def pairs(workdir) -> Path:
    path = workdir / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    return path


def test_judge_score_refuses_its_input_as_output_before_scoring(fails, workdir, pairs):
    (workdir / "sub").mkdir()
    (workdir / "link.jsonl").symlink_to(pairs)
    os.link(pairs, workdir / "hard.jsonl")
    for output in (pairs, workdir / "sub" / ".." / "pairs.jsonl", workdir / "link.jsonl", workdir / "hard.jsonl"):
        fails(["judge", "score", "--judge", "keyword-refusal", "--input", pairs, "--output", output],
              f"--output {output}: is the --input file", untouched=[workdir])


def test_judge_score_refuses_an_unwritable_output_before_scoring(fails, workdir, pairs):
    score = ["judge", "score", "--judge", "keyword-refusal", "--input", pairs, "--output"]
    fails([*score, workdir], f"--output {workdir}: is a directory, not a file", untouched=[workdir])
    blocker = workdir / "taken"
    blocker.write_text("")
    fails([*score, blocker / "out.jsonl"], f"{blocker} is a file, not a directory", untouched=[workdir])
    if Path("/proc/self").is_dir():
        fails([*score, "/proc/immunize-scores.jsonl"], "--output /proc/immunize-scores.jsonl: not writable",
              untouched=[workdir])


# ---- model directories -------------------------------------------------------------------------------

def test_an_unknown_model_type_is_named_with_its_file(fails, workdir, tiny_checkpoint):
    import shutil

    model = workdir / "model"
    shutil.copytree(tiny_checkpoint, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "frobnicate"}))
    fails(["defend", "--defence", "none", "--model", model, "--output_dir", workdir / "out"],
          f"{model / 'config.json'}: unknown model_type 'frobnicate'", untouched=[workdir])
    (model / "config.json").write_text("{not json")
    fails(["evaluate", "--model", model, "--sections", "perplexity", "--output_dir", workdir / "out"],
          f"{model / 'config.json'}:1: malformed JSON", untouched=[workdir])


def test_evaluate_writes_nothing_before_its_judges_load(fails, workdir, tiny_checkpoint):
    # The trained harmfulness judge does not exist in the empty cache: that is found before provenance.
    fails(["evaluate", "--model", tiny_checkpoint, "--sections", "harmfulness", "--output_dir", workdir / "out"],
          "judge 'harmfulness' is not trained yet", untouched=[workdir])


# ---- secrets ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "secret"), [
    ("--hub_token", True), ("hub-token", True), ("--attacks.sft.hub_token", True), ("api_key", True),
    ("PERSPECTIVE_API_KEY", True), ("password", True), ("db_passwd", True), ("client_secret", True),
    ("auth_token", True), ("token", True), ("use_auth_token", True), ("aws_credentials", True),
    ("pad_token", False), ("eos_token", False), ("bos_token", False), ("pad_token_id", False), ("key", False),
    ("max_new_tokens", False), ("lens_chunk_tokens", False), ("keep_checkpoints", False), ("keyword", False),
])
def test_secret_like_names(name, secret):
    from immunize.redact import is_secret

    assert is_secret(name) is secret


def test_redact_argv_masks_every_spelling():
    from immunize.redact import REDACTED, redact_argv

    argv = ["immunize", "run", "--hub_token", SECRET, "--defences.none.hub_token=" + SECRET, "--pad_token", "<pad>",
            "--judge_option", f"api_key={SECRET}", "--judge_option", "harmful_label=0", "--password", "--seed", "1"]
    assert redact_argv(argv) == [
        "immunize", "run", "--hub_token", REDACTED, f"--defences.none.hub_token={REDACTED}", "--pad_token", "<pad>",
        "--judge_option", f"api_key={REDACTED}", "--judge_option", "harmful_label=0", "--password", "--seed", "1"]


def test_redact_masks_text_under_secret_names_only():
    from immunize.redact import REDACTED, redact

    record = {"hub_token": SECRET, "options": [{"api_key": SECRET, "pad_token": "<pad>"}], "nll_per_token": 2.5,
              "hub_token_unset": None}
    assert redact(record) == {"hub_token": REDACTED, "options": [{"api_key": REDACTED, "pad_token": "<pad>"}],
                              "nll_per_token": 2.5, "hub_token_unset": None}


def _files_holding(root: Path, *needles: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                  and any(n.encode() in p.read_bytes() for n in needles))


def test_defend_writes_no_secret_anywhere(workdir, tiny_checkpoint, monkeypatch, umask):
    out = workdir / "out"
    argv = ["defend", "--defence", "none", "--model", str(tiny_checkpoint), "--output_dir", str(out),
            "--hub_token", SECRET]
    for name in ("PERSPECTIVE_API_KEY", "HF_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.setenv(name, ENV_SECRET)
    umask(0o022)
    assert main(argv) == 0
    assert _files_holding(out, SECRET, ENV_SECRET) == []
    provenance = json.loads((out / "provenance.json").read_text())
    # The command as called in-process (not pytest's own argv), its secret masked.
    assert provenance["command"] == ["immunize", *argv[:-1], "<redacted>"]
    # The saved weights have the mode of the files beside them, not safetensors' 0600.
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.suffix in (".safetensors", ".json")
            and not p.name.startswith(".")} == dict.fromkeys(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "immunize-complete.json", "immunize-run.json", "provenance.json"], oct(0o644))


def test_run_records_no_secret_in_its_recipe_or_config(workdir, tiny_checkpoint, monkeypatch):
    from immunize.config import write_provenance
    from immunize.pipeline.recipe import parse_run_config
    from immunize.pipeline.run import recipe_record

    argv = ["--model", str(tiny_checkpoint), "--output_dir", str(workdir / "run"), "--align", "false",
            "--defences.none.hub_token", SECRET, f"--attacks.sft.hub_token={SECRET}"]
    monkeypatch.setattr(sys, "argv", ["immunize", "run", *argv])
    cfg = parse_run_config(argv)
    assert SECRET not in json.dumps(recipe_record(cfg), default=str)  # results.json's recipe
    write_provenance(workdir / "run", {"run": cfg})
    assert _files_holding(workdir / "run", SECRET) == []


def test_stage_markers_hold_no_secret(tmp_path):
    from immunize.pipeline.stages import Progress, Stage, StageRunner

    runner = StageRunner(tmp_path, Progress(total=1, stream=io.StringIO()))
    path, _ = runner.run(Stage("attack", "x", {"options": {"hub_token": SECRET, "seed": 1}}), lambda p: {})
    assert _files_holding(tmp_path, SECRET) == []
    assert json.loads((path / "stage.json").read_text())["key"]["options"]["seed"] == 1


# ---- file modes ----------------------------------------------------------------------------------------

def test_publish_dir_gives_staged_entries_ordinary_modes(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    from immunize.io import publish_dir

    mask = umask(0o027)
    target = tmp_path / "cache" / "model"
    for attempt in range(2):  # the second replaces the first
        target.parent.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging."))
        (staging / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(staging / "sub" / "model.safetensors"))
        (staging / "attempt").write_text(str(attempt))
        publish_dir(staging, target)
    assert (target / "attempt").read_text() == "1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no staging or old copy left
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in [target, *target.rglob("*")]}
    assert modes == {"cache/model": 0o777 & ~mask, "cache/model/sub": 0o777 & ~mask,
                     "cache/model/sub/model.safetensors": 0o666 & ~mask, "cache/model/attempt": 0o666 & ~mask}


def test_report_and_task_files_follow_the_umask(tmp_path, umask, real_data_root):
    from immunize.report import build_report
    from immunize.tasks import materialize

    mask = umask(0o027)
    index = build_report(write_results(tmp_path / "run"))
    assert index.stat().st_mode & 0o777 == 0o666 & ~mask
    assert index.parent.stat().st_mode & 0o777 == 0o777 & ~mask
    tasks = materialize(["truthfulqa_mc1"], root=real_data_root, target=tmp_path / "tasks")
    assert tasks.include_path.stat().st_mode & 0o777 == 0o777 & ~mask
