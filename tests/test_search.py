"""Worst-case search: determinism, resume, the utility bound, the validation slice, bad options.

Tiny model, real data root, the length stand-in for the judges; trials of 4–8 samples.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from transformers import TrainerCallback

from immunize.attacks import AttackArguments, ReversedPreferenceArguments, runner
from immunize.attacks import search as search_module
from immunize.attacks.data import harmful_qa
from immunize.attacks.registry import get_attack
from immunize.attacks.runner import RunResult
from immunize.attacks.search import SearchArguments, retry_unfinished, run_search, validation_slice
from immunize.cli import main as cli_main
from immunize.data import load_splits, normalize_prompt, split_of
from immunize.errors import ImmunizeError
from immunize.evaluation.harmfulness import judge_training_prompts
from immunize.io import atomic_write_json, read_json
from immunize.judges.examples import in_trained_share
from immunize.method_runner import COMPLETE_MARKER
from immunize.models import load_tokenizer
from immunize.testing import length_judges

# Attack options of a seconds-long trial on the tiny model (no curve: the search scores the end).
ATTACK = dict(max_length=128, use_cpu=True, disable_tqdm=True, logging_steps=1, save_steps=1000, curve=False,
              curve_batch_size=4)
# A 3-trial search of 4–8 samples, 4 validation prompts of 4 tokens, 4 perplexity texts.
SEARCH = dict(search=True, search_trials=3, search_startup_trials=2, search_learning_rate=[1e-4, 1e-2],
              search_num_samples=[4, 8], search_num_samples_step=4, search_batch_sizes=[4],
              search_schedulers=["constant", "linear"], search_validation_prompts=4, search_max_new_tokens=4,
              search_utility_samples=4)


@pytest.fixture(autouse=True)
def _stand_in_judges():
    with length_judges():
        yield


def attack_config(model, out, data_root, **overrides) -> AttackArguments:
    return AttackArguments(**{"model": str(model), "output_dir": str(out), "data_root": str(data_root), **ATTACK,
                              **overrides})


def search_args(**overrides) -> SearchArguments:
    return SearchArguments(**{**SEARCH, **overrides})


def flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return out


def outcome(result: dict) -> list[tuple]:
    """What each trial tried and found (a failed trial found nothing)."""
    return [(t["number"], t["state"], t["params"], t["run_id"], (t.get("harmfulness") or {}).get("mean"),
             (t.get("utility") or {}).get("value"), t.get("feasible")) for t in result["trials"]]


class Trainings:
    """``run_attacks`` that records the runs it trained, with ``callbacks()`` added to each call."""

    def __init__(self, monkeypatch):
        self.real = runner.run_attacks
        self.trained: list[str] = []
        self.callbacks = list
        monkeypatch.setattr(runner, "run_attacks", self)

    def __call__(self, cfg, **kwargs):
        results = self.real(cfg, callbacks=self.callbacks(), **kwargs)
        self.trained += [r.run_id for r in results if r.status == "trained"]
        return results


class InterruptAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class StartProbe(TrainerCallback):
    def __init__(self):
        self.started_at = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started_at = state.global_step


# --- (1) determinism, through the API and the command line ---------------------------------------

def test_a_fresh_search_is_deterministic_for_a_fixed_seed(tiny_checkpoint, real_data_root, tmp_path, capsys):
    api = run_search(attack_config(tiny_checkpoint, tmp_path / "a", real_data_root), search_args())
    capsys.readouterr()
    argv = ["attack", *flags({"model": tiny_checkpoint, "output_dir": tmp_path / "b", "data_root": real_data_root,
                              **ATTACK, **SEARCH})]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    cli = read_json(tmp_path / "b" / "search.json")

    assert len(api["trials"]) == 3 and outcome(api) == outcome(cli)
    assert len({t["run_id"] for t in api["trials"]}) == 3  # three different attacks
    assert api["best"]["number"] == cli["best"]["number"] and api["status"] == "worst_case"
    assert read_json(tmp_path / "a" / "search.json") == api
    assert all((tmp_path / "a" / "trials" / t["run_id"] / COMPLETE_MARKER).is_file() for t in api["trials"])
    # One progress line per trial (no Optuna lines), then the summary.
    assert [line.split("]")[0] for line in printed if line.startswith("[")] == ["[1/3", "[2/3", "[3/3"]
    assert not any("Trial 0 finished" in line for line in printed)
    assert printed[-1].startswith("worst case: trial #") and "search.json" in printed[-1]


# --- (2) resume ------------------------------------------------------------------------------------

def test_an_interrupted_search_resumes_without_repeating_a_finished_trial(tiny_checkpoint, real_data_root,
                                                                          tmp_path, monkeypatch):
    # Every trial takes 8 samples in batches of 4 (2 steps), checkpointing each step.
    cfg = attack_config(tiny_checkpoint, tmp_path, real_data_root, save_steps=1)
    search = search_args(search_num_samples=[8, 8])
    trainings = Trainings(monkeypatch)
    trainings.callbacks = lambda: [InterruptAt(step=2)] if len(trainings.trained) == 2 else []
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, search)
    assert len(trainings.trained) == 2

    probe = StartProbe()
    trainings.callbacks = lambda: [probe]
    resumed = run_search(cfg, search)
    complete = [t for t in resumed["trials"] if t["state"] == "complete"]
    assert len(complete) == 3 and len(trainings.trained) == 3  # one more training: the interrupted trial's
    assert trainings.trained[2] not in trainings.trained[:2]
    failed, retry = resumed["trials"][2], resumed["trials"][3]
    assert failed["state"] == "fail" and retry["retry_of"] == 2 and retry["params"] == failed["params"]
    assert retry["run_id"] == failed["run_id"] and probe.started_at == 1  # from its checkpoint

    again = run_search(cfg, search)  # finished: reused as it is, nothing trained
    assert len(trainings.trained) == 3 and outcome(again) == outcome(resumed)


def test_trials_a_killed_search_left_running_are_queued_again_once():
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    killed = study.ask()  # a process killed mid-trial leaves it RUNNING
    killed.suggest_float("x", 0, 1)
    assert retry_unfinished(study) == [1] and retry_unfinished(study) == []
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[2].params == study.trials[1].params and study.trials[2].user_attrs == {"retry_of": 1}


def test_a_root_with_another_search_is_refused(tiny_checkpoint, real_data_root, tmp_path, monkeypatch):
    fake_trials(monkeypatch)
    cfg = attack_config(tiny_checkpoint, tmp_path, real_data_root)
    run_search(cfg, search_args(search_trials=1))
    run_search(cfg, search_args(search_trials=2))  # more trials: the same search
    with pytest.raises(ImmunizeError, match=r"holds a search with other search\.search_warmup"):
        run_search(cfg, search_args(search_trials=2, search_warmup=[0.0, 0.1]))


# --- (3) the utility bound -------------------------------------------------------------------------

def fake_trials(monkeypatch) -> None:
    """Trials without training: harmfulness rises with the learning rate (0 at 1e-4, 1 at 1e-2), and so
    does perplexity (the defended model's 10, ×√(lr / 1e-4) after an attack)."""
    rates: dict[str, float] = {}

    def run_attacks(cfg, **_):
        out = Path(cfg.output_dir) / f"lr{cfg.learning_rate:.6g}"
        rates[str(out)] = cfg.learning_rate
        return [RunResult(out.name, out, "trained", {}, {"steps": 1, "wall_seconds": 0.0})]

    def harmfulness(model_dir, *_):
        mean = math.log10(rates[str(model_dir)] / 1e-4) / 2
        return {"mean": mean, "ci95": [mean, mean], "n": 4, "harmful_rate": 0.0, "refusal_rate": 0.0,
                "gated_rate": 0.0}

    def utility(model_dir, *_):
        value = 10 * math.sqrt(rates.get(str(model_dir), 1e-4) / 1e-4)
        return {"metric": "perplexity", "value": value, "ci95": [value, value], "n": 4}

    monkeypatch.setattr(runner, "run_attacks", run_attacks)
    monkeypatch.setattr(search_module, "measure_harmfulness", harmfulness)
    monkeypatch.setattr(search_module, "measure_utility", utility)


def test_a_trial_that_breaks_the_bound_is_never_the_worst_case(tiny_checkpoint, real_data_root, tmp_path,
                                                               monkeypatch):
    fake_trials(monkeypatch)
    # Perplexity at most 3 × 10: only learning rates up to 9e-4 keep it.
    result = run_search(attack_config(tiny_checkpoint, tmp_path / "a", real_data_root),
                        search_args(search_trials=8, search_perplexity_factor=3.0))
    trials = result["trials"]
    feasible = [t for t in trials if t["feasible"]]
    assert feasible and len(feasible) < len(trials)  # both kinds, so the choice matters
    assert all(t["feasible"] == (t["params"]["learning_rate"] <= 9e-4) for t in trials)
    most_harmful = max(trials, key=lambda t: t["harmfulness"]["mean"])
    assert not most_harmful["feasible"]
    assert result["best"] == max(feasible, key=lambda t: t["harmfulness"]["mean"])
    assert result["bound"]["reference"]["value"] == 10 and result["bound"]["allowed"] == 30

    none = run_search(attack_config(tiny_checkpoint, tmp_path / "b", real_data_root),
                      search_args(search_perplexity_factor=0.5))
    assert none["status"] == "no_feasible_trial" and none["best"] is None and none["trials"]
    assert "no trial kept the utility bound" in none["summary"]


def test_a_defence_that_keeps_no_capability_is_not_searched(tiny_checkpoint, real_data_root, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(runner, "run_attacks", lambda *a, **k: pytest.fail("nothing should train"))
    result = run_search(attack_config(tiny_checkpoint, tmp_path / "flag", real_data_root),
                        search_args(search_keeps_capability=False))
    assert result["status"] == "no_capability" and result["best"] is None and result["trials"] == []
    assert result["summary"].startswith("no capability to keep")
    assert read_json(tmp_path / "flag" / "search.json") == result

    random_init = shutil.copytree(tiny_checkpoint, tmp_path / "random-init")  # as the defence marks it
    atomic_write_json(random_init / COMPLETE_MARKER, {"defence": "random-init", "keeps_capability": False})
    marked = run_search(attack_config(random_init, tmp_path / "marker", real_data_root), search_args())
    assert marked["status"] == "no_capability" and not (tmp_path / "marker" / "study.db").exists()


# --- (4) the validation slice ----------------------------------------------------------------------

@pytest.mark.parametrize("attack", ["sft", "dpo"])  # DPO orders its pairs otherwise: only the prompt check parts them
def test_the_validation_slice_meets_no_evaluation_judge_or_training_prompt(attack, tiny_checkpoint, real_data_root,
                                                                          tmp_path):
    config = AttackArguments if attack == "sft" else ReversedPreferenceArguments
    cfg = config(**{"model": str(tiny_checkpoint), "output_dir": str(tmp_path), "data_root": str(real_data_root),
                    **ATTACK, "attack": attack})
    # 48 prompts past a cap of 128: a DPO trial of 128 pairs would otherwise share one of them.
    search = search_args(search_num_samples=[8, 128], search_num_samples_step=24, search_validation_prompts=48)
    prompts = [p.prompt for p in validation_slice(cfg, search)]
    keys = [normalize_prompt(p) for p in prompts]
    assert len(prompts) == 48 and len(set(keys)) == 48
    assert all(split_of(p) == "attack" for p in prompts)

    splits = load_splits(root=real_data_root)
    assert not set(keys) & {normalize_prompt(e.prompt) for e in splits.eval}
    assert not any(in_trained_share(p) for p in prompts)
    assert not set(keys) & judge_training_prompts(str(real_data_root))
    # Every trial's training rows: each sample count of the space, in each prompt format.
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    last = {normalize_prompt(p): i for i, (p, _) in enumerate(harmful_qa(splits))}
    for fmt in search.search_prompt_formats:
        for n in range(8, 129, 24):
            data = get_attack(attack)().prepare(dataclasses.replace(cfg, prompt_format=fmt), tokenizer, splits, n)
            assert not set(keys) & {normalize_prompt(texts[0]) for texts in data.texts}, (fmt, n)
            if attack == "sft":  # its training rows are a prefix of harmful_qa: validation has a row past it
                assert all(last[k] >= len(data.examples) + data.dropped for k in keys)


# --- (5) bad options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options, needle", [
    ({"search": True, "search_learning_rate": [1e-3, 1e-5]}, "--search_learning_rate 0.001 1e-05: empty range"),
    ({"search": True, "search_learning_rate": [1e-4]}, "--search_learning_rate 0.0001: expected two values"),
    ({"search": True, "search_schedulers": ["linear", "sawtooth"]},
     "--search_schedulers: unknown choice 'sawtooth' (use linear, cosine"),
    ({"search": True, "search_num_samples": [16, 120]}, "--search_num_samples 16 120: HIGH − LOW must be"),
    ({"search": True, "search_warmup": [0.0, 1.0]}, "--search_warmup 0 1: ratios of the steps"),
    ({"search": True, "search_utility": "bleu"}, "--search_utility: unknown 'bleu'"),
    ({"search": True, "search_batch_sizes": [4, 4]}, "--search_batch_sizes 4 4: a choice is given twice"),
    ({"search": True, "grid": "learning_rate=1e-4,1e-3"}, "--grid: a search picks each trial's budget"),
    ({"search_trials": 5}, "--search_trials: a search option; add --search"),
    ({"search": True, "search_validation_prompts": 100000, "search_num_samples": [4, 8],
      "search_num_samples_step": 4}, "--search_validation_prompts 100000: only"),
], ids=["empty-range", "one-value", "scheduler", "step", "warmup", "utility", "twice", "grid", "no-search",
        "too-many-prompts"])
def test_bad_search_options_fail_in_one_line_and_write_nothing(options, needle, tiny_checkpoint, real_data_root,
                                                               tmp_path, capsys):
    out = tmp_path / "search"
    argv = ["attack", *flags({"model": tiny_checkpoint, "output_dir": out, "data_root": real_data_root, **ATTACK,
                              **options})]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err, err
    assert not out.exists()


def test_without_search_an_attack_parses_as_before(tiny_checkpoint, tmp_path):
    from immunize.commands import attack

    cfg, search = attack.parse_command(["--model", str(tiny_checkpoint), "--output_dir", str(tmp_path),
                                        "--grid", "learning_rate=1e-4,1e-3"])
    assert not search.search and search.changed() == [] and cfg.grid == ["learning_rate=1e-4,1e-3"]
    assert attack.parse(["--model", str(tiny_checkpoint), "--search", "--search_trials", "2"]).model == str(
        tiny_checkpoint)
