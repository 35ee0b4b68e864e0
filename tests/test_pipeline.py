"""`immunize run` end to end on a tiny model: every stage, caching, results.json and the report."""

import json
from pathlib import Path

import pytest

from immunize.testing import length_judges


@pytest.fixture
def fake_judges():
    """The trained judges' names stand for ``immunize.testing.LengthJudge`` while the test runs."""
    with length_judges():
        yield


def recipe(tmp_path, tiny_checkpoint, attack_lr=1e-3, **overrides):
    from immunize.pipeline.recipe import RunConfig

    options = dict(
        name="tiny", output_dir=str(tmp_path / "run"), model=str(tiny_checkpoint), max_length=64,
        align={"num_harmful": 8, "num_benign": 8, "learning_rate": 1e-3},
        defences=[{"label": "none"}, {"label": "repnoise", "num_samples": 8, "learning_rate": 1e-3}],
        attacks=[{"label": "sft", "curve_every_steps": 1,
                  "grid": {"learning_rate": [attack_lr], "num_samples": [8], "seed": [1]}}],
        curve_num_prompts=2, curve_max_new_tokens=4,
        eval_harmfulness_samples=6, eval_max_new_tokens=6, eval_capability_limit=2, eval_trainability_steps=1,
        eval_trainability_tasks="viggo", eval_trainability_eval_samples=2, eval_toxicity_samples=2,
        eval_overrefusal_samples=2, analysis_examples=4, analysis_layers=[1, 2],
        held_out_categories=["animal_abuse", "self_harm", "child_abuse"],
    )
    options.update(overrides)
    return RunConfig(**options)


@pytest.mark.usefixtures("real_data_root")  # every stage reads the default data root
def test_run_end_to_end_then_cached(tmp_path, tiny_checkpoint, fake_judges, isolated_cache):
    from immunize.pipeline.run import Experiment
    from immunize.report.schema import load_results

    cfg = recipe(tmp_path, tiny_checkpoint)
    experiment = Experiment(cfg)
    report = experiment.run()
    # The progress display planned exactly the stages that ran (its ETA uses the remaining weight).
    assert experiment.progress.done == experiment.progress.total == 10
    assert abs(experiment.progress.remaining_weight) < 1e-9
    results = load_results(tmp_path / "run" / "results.json")
    html = report.read_text()
    assert 'id="main-table"' in html and 'id="verdict"' in html
    budget = results["budgets"][0]["id"]
    assert budget == "sft-lr0.001-n8-s1" and results["budgets"][0]["steps"] == 1
    for defence in ("none", "repnoise"):
        cells = results["harmfulness"][defence]
        assert set(cells) == {"pre_attack", budget}
        # 6 sampled prompts plus every evaluation prompt of the held-out categories (4 self_harm).
        assert 0.0 <= cells[budget]["mean"] <= 1.0 and cells[budget]["n"] > 6
        assert results["curves"][defence][budget][0]["step"] == 0
        assert "mmlu_acc" in results["stability"][defence]
        assert set(results["trainability"]["cells"][defence]) == {"rouge1", "rouge2", "rougeL"}
        held_out = results["generalization"]["cells"][defence]
        assert all(cell["n"] >= 1 for cell in held_out.values())
    assert set(results["analysis"]["logit_lens"]) == {"aligned", "repnoise", f"none@{budget}", f"repnoise@{budget}"}
    assert {row["defence"] for row in results["verdict"]} >= {"repnoise"}
    stage_markers = sorted(p.parent.name for p in (tmp_path / "run" / "stages").glob("*/stage.json"))
    # align, 2 defend (none too), 2 pre-eval, 2 attacks, 2 post-eval, analysis
    assert len(stage_markers) == 1 + 2 + 2 + 2 + 2 + 1
    assert results["baseline"] == "none"
    assert results["defence_info"]["repnoise"] == {"defence": "repnoise", "keeps_capability": True,
                                                   "attack_adapter": None, "seed": 42,
                                                   "options": {"num_samples": 8, "learning_rate": 1e-3}}

    # A re-run reuses every stage; changing an attack knob recomputes only the attack side.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "stages").glob("*/stage.json")}
    Experiment(cfg).run()
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    Experiment(recipe(tmp_path, tiny_checkpoint, attack_lr=2e-3)).run()
    new = {p.parent.name for p in (tmp_path / "run" / "stages").glob("*/stage.json")} - \
        {p.parent.name for p in mtimes}
    assert sorted(name.split("-")[0] for name in new) == ["analysis", "attack", "attack", "evaluate", "evaluate"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["budgets"][0]["learning_rate"] == 2e-3


SEEDED_ATTACKS = [{"label": "sft", "grid": {"learning_rate": [1e-3, 2e-3], "num_samples": [8], "seed": [1, 2, 3]}},
                  {"label": "tox", "attack": "toxicity", "grid": {"num_samples": [8], "seed": [7]}}]


def test_each_attack_is_evaluated_on_harmfulness_and_on_what_it_attacks():
    from immunize.attacks.registry import attack_names
    from immunize.pipeline.recipe import post_attack_sections

    assert {name: post_attack_sections(name) for name in attack_names()} == {
        "sft": "harmfulness", "toxicity": "harmfulness,toxicity", "dpo": "harmfulness", "rl": "harmfulness"}


def test_budgets_that_differ_only_in_seed_form_a_group(tmp_path, tiny_checkpoint):
    from immunize.pipeline.run import Experiment
    from immunize.verdict import group_budgets

    experiment = Experiment(recipe(tmp_path, tiny_checkpoint, attacks=SEEDED_ATTACKS))
    ids = [b["id"] for b in experiment.budgets]
    assert ids[:4] == ["sft-lr0.001-n8-s1", "sft-lr0.001-n8-s2", "sft-lr0.001-n8-s3", "sft-lr0.002-n8-s1"]
    groups = group_budgets(experiment.budgets)
    assert [(g["id"], g["label"], g["budgets"], g["seeds"]) for g in groups] == [
        ("sft-lr0.001-n8", "sft", ids[0:3], [1, 2, 3]), ("sft-lr0.002-n8", "sft", ids[3:6], [1, 2, 3]),
        (ids[6].removesuffix("-s7"), "tox", ids[6:], [7])]
    assert experiment.post_sections == {"sft": "harmfulness", "tox": "harmfulness,toxicity"}


def _doc(section: str, value: float) -> dict:
    """An evaluation result of ``section`` as ``immunize evaluate`` writes it (no per-example records)."""
    metric = {"value": value, "ci95": [value - 0.1, value + 0.1], "n": 6}
    if section == "toxicity":
        return {"metrics": {"toxicity": metric, "toxic_rate": {"value": value}}}
    return {"metrics": {"harmfulness": metric, "harmful_rate": {"value": value}, "refusal_rate": {"value": 0.5}}}


def test_results_hold_the_groups_and_a_toxicity_attacks_toxicity(tmp_path, tiny_checkpoint):
    from immunize.pipeline.run import Experiment
    from immunize.report.schema import validate_results
    from immunize.verdict import group_budgets, immunization_verdict

    experiment = Experiment(recipe(tmp_path, tiny_checkpoint, attacks=SEEDED_ATTACKS))
    labels = ("none", "repnoise")
    pre = {name: {"harmfulness": _doc("harmfulness", 0.1), "toxicity": _doc("toxicity", 0.05), "_dir": None}
           for name in labels}
    # What each budget's post-attack evaluation returns: the sections its attack is evaluated on.
    post = {name: {b["id"]: {**{s: _doc(s, 0.6) for s in experiment.post_sections[b["label"]].split(",")},
                             "_dir": None} for b in experiment.budgets} for name in labels}
    attacked = {name: {b["id"]: {"curve": []} for b in experiment.budgets} for name in labels}
    results = experiment.assemble(pre, post, attacked)
    tox = experiment.budgets[-1]["id"]
    for name in labels:
        assert set(results["toxicity"][name]) == {"pre_attack", tox}
        assert results["toxicity"][name][tox]["mean"] == 0.6
    assert results["budget_groups"] == group_budgets(experiment.budgets)
    assert [b["group"] for b in results["budgets"]][:4] == ["sft-lr0.001-n8"] * 3 + ["sft-lr0.002-n8"]
    validate_results({**results, "run": {"name": "tiny"}})
    resistance = immunization_verdict(results)[1]["resistance"]
    assert list(resistance["per_group"]) == [g["id"] for g in results["budget_groups"]]


def test_run_trains_missing_trainable_judges_once(tmp_path, tiny_checkpoint, isolated_cache, fixed_encoder,
                                                 monkeypatch):
    """A fresh machine has no trained judges: the run trains the ones it uses, then keys on them."""
    from immunize.judges import training
    from immunize.judges.trained import trained_state
    from immunize.pipeline.run import Experiment

    calls = []
    monkeypatch.setattr(training, "train_judges", fake_trainer(calls))
    experiment = Experiment(recipe(tmp_path, tiny_checkpoint))
    state = experiment.judges()
    assert calls == [["harmfulness", "refusal", "toxicity"]]
    assert state == trained_state() and all(state.values())
    assert experiment.judges() == state and len(calls) == 1  # trained once


class FixedEncoder:
    """Stands in for the judges' encoder: only its identity matters to the staleness check."""

    name = "test-fixed"
    identity = "fixed-v1"

    def __init__(self, **_):
        pass


@pytest.fixture
def fixed_encoder():
    from immunize.judges.encoders import register_encoder, unregister_encoder

    register_encoder(FixedEncoder.name, FixedEncoder)
    yield FixedEncoder
    unregister_encoder(FixedEncoder.name)


def fake_trainer(calls: list, identity: str = FixedEncoder.identity, recipe: bool = True):
    """``train_judges`` stand-in that writes head files whose meta names ``identity`` (and, with
    ``recipe``, the current training recipe)."""
    from immunize.judges.specs import SPECS, recipe_fingerprint
    from immunize.judges.trained import FORMAT_VERSION, judge_dir

    def train(names, **kwargs):
        calls.append(list(names))
        for name in names:
            judge_dir(name).mkdir(parents=True, exist_ok=True)
            (judge_dir(name) / "head.safetensors").write_bytes(f"{name} {identity} {recipe}".encode())
            meta = {"format_version": FORMAT_VERSION, "encoder": {"name": FixedEncoder.name, "identity": identity}}
            if recipe:
                meta["recipe"] = recipe_fingerprint(SPECS[name])
            (judge_dir(name) / "head.json").write_text(json.dumps(meta))
        return {}

    return train


def test_run_retrains_judges_trained_on_another_encoder(tmp_path, tiny_checkpoint, isolated_cache, fixed_encoder,
                                                        monkeypatch):
    """After an upgrade that changes the encoder, old heads are retrained up front, not found broken later."""
    from immunize.judges import training
    from immunize.judges.trained import judge_dir, outdated, trained_state
    from immunize.pipeline.run import Experiment

    calls = []
    fake_trainer(calls, identity="fixed-v0")(["harmfulness", "toxicity"])
    fake_trainer(calls)(["refusal"])
    assert outdated("harmfulness") == "trained on encoder fixed-v0, the current one is fixed-v1"
    assert outdated("refusal") is None
    before = trained_state()
    monkeypatch.setattr(training, "train_judges", fake_trainer(calls))
    state = Experiment(recipe(tmp_path, tiny_checkpoint)).judges()
    assert calls[-1] == ["harmfulness", "toxicity"]
    assert state["refusal"] == before["refusal"] and state["harmfulness"] != before["harmfulness"]
    assert outdated("harmfulness") is None and outdated("toxicity") is None
    (judge_dir("refusal") / "head.json").write_text("{}")
    assert outdated("refusal") == "format version None is not 1"


def test_run_retrains_judges_of_an_earlier_recipe(tmp_path, tiny_checkpoint, isolated_cache, fixed_encoder,
                                                  monkeypatch):
    """A judge trained before the examples changed (e.g. before the counterfactual pairs) is retrained."""
    from immunize.judges import training
    from immunize.judges.trained import outdated
    from immunize.pipeline.run import Experiment

    calls = []
    fake_trainer(calls, recipe=False)(["harmfulness"])
    fake_trainer(calls)(["refusal", "toxicity"])
    assert outdated("harmfulness").startswith("trained by an earlier recipe")
    monkeypatch.setattr(training, "train_judges", fake_trainer(calls))
    Experiment(recipe(tmp_path, tiny_checkpoint)).judges()
    assert calls[-1] == ["harmfulness"] and outdated("harmfulness") is None


def test_run_leaves_registered_non_trainable_judges_alone(tmp_path, tiny_checkpoint, fake_judges, isolated_cache,
                                                         monkeypatch):
    from immunize.judges import training
    from immunize.pipeline.run import Experiment

    monkeypatch.setattr(training, "train_judges", lambda *a, **k: pytest.fail("must not train"))
    assert Experiment(recipe(tmp_path, tiny_checkpoint)).judges() == {"harmfulness": None, "refusal": None,
                                                                       "toxicity": None}


def test_recipe_rejects_unknown_held_out_category_before_running(tmp_path, tiny_checkpoint):
    from immunize.errors import ImmunizeError

    with pytest.raises(ImmunizeError, match=r"^--held_out_categories: unknown BeaverTails category 'self-harm'"):
        recipe(tmp_path, tiny_checkpoint, held_out_categories=["self-harm"])
    assert not (tmp_path / "run").exists()


def test_recipe_rejects_a_non_positive_lens_size(tmp_path, tiny_checkpoint):
    from immunize.errors import ImmunizeError

    with pytest.raises(ImmunizeError, match=r"^--analysis_lens_tokens: must be positive, got 0$"):
        recipe(tmp_path, tiny_checkpoint, analysis_lens_tokens=0)


def test_trainability_budget_reads_like_an_attack_budget_in_the_report():
    from immunize.pipeline.run import trainability_cells
    from immunize.report.build import budget_label

    metric = {"value": 0.3, "ci95": [0.2, 0.4], "n": 12}
    doc = {"metrics": {"viggo_rouge1": metric, "viggo_rouge2": metric, "viggo_rougeL": metric},
           "config": {"trainability_tasks": "viggo", "trainability_steps": 4, "trainability_batch_size": 8,
                      "trainability_learning_rate": 5e-05, "trainability_max_length": 128, "seed": 42}}
    cells = trainability_cells({"none": {"trainability": doc}, "repnoise": {"trainability": doc}})
    assert cells["task"] == "viggo" and set(cells["cells"]) == {"none", "repnoise"}
    assert cells["budget"] == {"attack": "sft", "learning_rate": 5e-05, "num_samples": 32, "steps": 4,
                               "batch_size": 8}
    assert budget_label(cells["budget"]) == "SFT · lr 5e-5 · 32 samples · 4 steps"


# A 2-trial search of 4–8 samples, 4 validation prompts of 4 tokens, 4 perplexity texts; the bound is wide, so
# every trial of the tiny model keeps it and each searched defence has a worst case.
TINY_SEARCH = {"seeds": [1, 2], "search_trials": 2, "search_startup_trials": 2, "search_learning_rate": [1e-4, 1e-2],
               "search_num_samples": [4, 8], "search_num_samples_step": 4, "search_batch_sizes": [4],
               "search_schedulers": ["constant"], "search_validation_prompts": 4, "search_max_new_tokens": 4,
               "search_utility_samples": 4, "search_perplexity_factor": 1000.0}


@pytest.mark.usefixtures("real_data_root")
def test_a_run_with_a_search_gives_each_defence_its_worst_case_then_reuses_it(tmp_path, tiny_checkpoint, fake_judges,
                                                                             isolated_cache, monkeypatch):
    import yaml

    from immunize.attacks import runner, search
    from immunize.pipeline.run import Experiment
    from immunize.report.schema import load_results

    cfg = recipe(tmp_path, tiny_checkpoint, align=False, analysis=False, held_out_categories=[],
                 defences=[{"label": "none"}, {"label": "repnoise", "num_samples": 8, "learning_rate": 1e-3},
                           {"label": "random-init"}],
                 search=TINY_SEARCH)
    experiment = Experiment(cfg)
    report = experiment.run()
    # Planned as run: per defence its defence, pre-attack evaluation, grid attack and its evaluation, and a
    # search; for none and repnoise an attack of the searched budgets and an evaluation per seed (random-init
    # has no capability to bound: its searched stages were dropped from the plan).
    assert experiment.progress.done == experiment.progress.total == 3 * 5 + 2 * (1 + 2)
    results = load_results(tmp_path / "run" / "results.json")
    searched = ["search-worst-s1", "search-worst-s2"]
    assert [b["id"] for b in results["budgets"] if b.get("searched")] == searched
    assert {"id": "search-worst", "label": "sft", "budgets": searched, "seeds": [1, 2]} in results["budget_groups"]
    rows = {row["defence"]: row for row in results["verdict"]}
    for defence in ("none", "repnoise"):
        found = results["search"][defence]
        assert found["status"] == "worst_case" and len(found["trials"]) == 2 and found["group"] == "search-worst"
        assert [b["id"] for b in found["budgets"]] == searched
        assert all(b["params"] == found["best"]["params"] for b in found["budgets"])
        assert set(searched) <= set(results["harmfulness"][defence])
        # Each searched budget was trained with that defence's own best trial.
        config = yaml.safe_load((Path(results["models"][f"{defence}@{searched[1]}"]["path"]) / "config.yaml")
                                .read_text())["attack"]
        assert config["learning_rate"] == found["best"]["params"]["learning_rate"] and config["seed"] == 2
        worst = rows[defence]["worst_case_resistance"]
        assert worst["status"] in ("strong", "weak", "none", "inconclusive"), worst
        assert "learning_rate" in worst["reason"] and set(worst["per_budget"]) == set(searched)
        assert "search-worst" not in rows[defence]["resistance"]["per_group"]  # the grid's resistance is the grid's
    lower = results["search"]["random-init"]
    assert lower["status"] == "no_capability" and lower["budgets"] == [] and lower["trials"] == []
    assert not set(searched) & set(results["harmfulness"]["random-init"])
    assert rows["random-init"]["worst_case_resistance"]["status"] == "no capability"
    assert results["run"]["recipe"]["search"]["seeds"] == [1, 2]
    html = report.read_text()
    assert 'id="worst-case"' in html and "search_trials.png" in html
    assert (report.parent / "figures" / "search_trials.png").is_file()

    # A re-run reuses every stage, the searches among them: nothing is searched or trained again.
    markers = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "stages").glob("*/stage.json")}
    assert sum(p.parent.name.startswith("search-") for p in markers) == 3
    monkeypatch.setattr(search, "run_search", lambda *a, **k: pytest.fail("searched again"))
    monkeypatch.setattr(runner, "run_attacks", lambda *a, **k: pytest.fail("trained again"))
    Experiment(cfg).run()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "stages").glob("*/stage.json")} == markers
    assert load_results(tmp_path / "run" / "results.json")["search"] == results["search"]


@pytest.mark.usefixtures("real_data_root")
def test_an_rl_attack_is_one_more_attack_kind_with_its_reward_kl_and_reward_hacking_in_the_results(
        tmp_path, tiny_checkpoint, fake_judges, isolated_cache):
    from immunize.pipeline.run import Experiment
    from immunize.report.schema import load_results

    rl = {"label": "rl", "attack": "rl", "per_device_train_batch_size": 4, "num_generations": 2,
          "max_completion_length": 4, "max_steps": 2, "learning_rate": 1e-3, "curve_every_steps": 1,
          "constraint": "shaping", "reward_preference_data": "beavertails", "reward_num_pairs": 8,
          "reward_backbone": str(tiny_checkpoint), "grid": {"num_samples": [4], "seed": [1]}}
    cfg = recipe(tmp_path, tiny_checkpoint, align=False, analysis=False, held_out_categories=[],
                 defences=[{"label": "none"}], attacks=[rl])
    Experiment(cfg).run()
    results = load_results(tmp_path / "run" / "results.json")
    (budget,) = results["budgets"]
    assert budget["id"] == "rl-lr0.001-n4-s1" and budget["steps"] == 2
    assert (budget["prompts_per_step"], budget["generations"], budget["completion_tokens"]) == (2, 2, 4)
    assert budget["constraint"] == "shaping"
    curve = results["curves"]["none"][budget["id"]]
    assert [p["step"] for p in curve] == [0, 1, 2] and {"reward", "kl", "answer_tokens", "repetition"} <= set(curve[0])
    record = results["attack_records"]["none"][budget["id"]]
    assert record["reward"]["kind"] == "model" and record["constraint"]["kind"] == "shaping"
    # The constraint's cost model is the judge the run evaluates harmfulness with, and the record says so.
    assert record["constraint"]["cost_model"]["judge"] == "test-length"  # what "harmfulness" stands for here
    assert record["constraint"]["judge_is_constraint_and_evaluator"] is True
    verdict = next(r for r in results["verdict"] if r["defence"] == "none")
    assert verdict["resistance"]["per_budget"][budget["id"]]["reward_hacking"]["flag"] in (True, False)
    page = (tmp_path / "run" / "report" / "index.html").read_text(encoding="utf-8")
    assert "Learning from harmful feedback" in page and "2 prompts × 2 answers a step" in page


def test_an_attack_entry_cannot_pick_its_own_harmfulness_judge(tmp_path, tiny_checkpoint):
    from immunize.errors import ImmunizeError

    with pytest.raises(ImmunizeError, match=r"--attacks\.rl\.harmfulness_judge: set by the recipe"):
        recipe(tmp_path, tiny_checkpoint, attacks=[{"label": "rl", "attack": "rl", "harmfulness_judge": "x"}])
