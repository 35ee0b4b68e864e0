"""Every file in recipes/ begins with its exact launch command and parses with that command's parser
(nothing runs): a recipe that drifts from the code fails here, not hours into a run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def _launch(path: Path) -> list[str]:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# "), f"{path.name}: the first line must be its launch command"
    words = shlex.split(first[2:])
    if words[:3] == ["accelerate", "launch", "-m"]:
        words = words[3:]
    assert words[0].endswith("immunize"), f"{path.name}: launch command {first!r}"
    assert words[words.index("--config") + 1] == f"recipes/{path.name}", f"{path.name}: --config names another file"
    return words[1:]


def test_there_are_recipes():
    assert len(RECIPES) >= 8


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(path, monkeypatch):
    from immunize.commands import attack, defend
    from immunize.pipeline.recipe import parse_run_config

    monkeypatch.chdir(path.parents[1])
    command, *argv = _launch(path)
    if command == "run":
        cfg = parse_run_config(argv)
        assert cfg.defence_entries and cfg.attack_entries
    elif command == "defend":
        name, cfg = defend.parse(argv)
        assert name and cfg.output_dir
    elif command == "attack":
        assert attack.parse(argv).output_dir
    else:
        pytest.fail(f"{path.name}: no parser test for `immunize {command}`")


def test_flat_recipe_shape_is_refused_with_a_hint(tmp_path):
    from immunize.errors import ImmunizeError
    from immunize.pipeline.recipe import parse_run_config

    old = tmp_path / "old.yaml"
    old.write_text("defences: [none, repnoise]\ndefence_learning_rate: 2.0e-5\n")
    with pytest.raises(ImmunizeError, match=r"'defence_learning_rate' is a key of the old flat recipe shape"):
        parse_run_config(["--config", str(old)])


def test_dotted_flags_set_entry_options_and_grids():
    from immunize.pipeline.recipe import parse_run_config

    cfg = parse_run_config(["--config", "recipes/quickstart.yaml", "--defences.repnoise.alpha", "2",
                            "--attacks.sft.grid.learning_rate", "3e-5,8e-5", "--align.num_harmful", "16"])
    repnoise = next(e for e in cfg.defence_entries if e.label == "repnoise")
    assert repnoise.options["alpha"] == 2.0 and isinstance(repnoise.options["alpha"], float)
    assert cfg.attack_entries[0].grid["learning_rate"] == [3e-5, 8e-5]
    assert cfg.alignment.options["num_harmful"] == 16


@pytest.mark.parametrize(("argv", "message"), [
    (["--defences.repnoise.alphaa", "2"], r"^--defences\.repnoise\.alphaa: unknown option of defence 'repnoise'"),
    (["--defences.nope.alpha", "2"], r"^--defences\.nope\.alpha: no entry labelled 'nope' in defences"),
    (["--defences.repnoise.alpha", "-1"], r"^--defences\.repnoise: --alpha and --beta must be non-negative"),
    (["--defences.repnoise.seed", "3"], r"^--defences\.repnoise\.seed: set by the recipe for every defence"),
    (["--attacks.sft.grid.learning_rate", "fast"],
     r"^--attacks\.sft\.grid\.learning_rate: expected a number, got 'fast'$"),
    (["--defences.repnoise.learning_rate", "x"], r"^--defences\.repnoise\.learning_rate: expected a number, got 'x'$"),
])
def test_bad_entry_options_fail_when_the_recipe_is_parsed(argv, message, tmp_path):
    from immunize.errors import ImmunizeError
    from immunize.pipeline.recipe import parse_run_config

    with pytest.raises(ImmunizeError, match=message):
        parse_run_config(["--config", "recipes/quickstart.yaml", "--output_dir", str(tmp_path / "run"), *argv])
    assert not (tmp_path / "run").exists()


def test_entries_need_unique_labels_and_one_undefended_row():
    from immunize.errors import ImmunizeError
    from immunize.pipeline.recipe import RunConfig

    with pytest.raises(ImmunizeError, match="labels must be unique; repeated: repnoise"):
        RunConfig(defences=["none", "repnoise", {"label": "repnoise", "alpha": 2}])
    with pytest.raises(ImmunizeError, match="list the undefended model exactly once"):
        RunConfig(defences=["repnoise"])
    with pytest.raises(ImmunizeError, match=r"^--defences\.x: --defence 'nope': unknown defence"):
        RunConfig(defences=["none", {"label": "x", "defence": "nope"}])
    cfg = RunConfig(defences=["none", {"label": "repnoise-no-noise", "defence": "repnoise", "ablate": ["noise"]}])
    assert cfg.defence_entries[1].options == {"ablate": "noise"}


def test_defence_seeds_expand_into_replicate_rows_with_their_own_seed():
    from immunize.errors import ImmunizeError
    from immunize.pipeline.recipe import RunConfig, parse_run_config

    cfg = RunConfig(seed=7, defences=["none", {"label": "rn", "defence": "repnoise", "seeds": [1, 2], "alpha": 2},
                                      {"label": "solo", "defence": "repnoise", "seeds": [5]}, "repnoise"])
    assert [(e.label, e.method, e.seed) for e in cfg.defence_entries] == [
        ("none", "none", None), ("rn-seed1", "repnoise", 1), ("rn-seed2", "repnoise", 2),
        ("solo", "repnoise", 5), ("repnoise", "repnoise", None)]
    seeds = [cfg.defence_config(e, "m", "out").seed for e in cfg.defence_entries[1:]]
    assert seeds == [1, 2, 5, 7]  # a replicate's own seed, else the recipe's
    assert cfg.defence_entries[2].options == {"alpha": 2.0}
    assert cfg.alignment is not None and cfg.defence_config(cfg.alignment, "m", "out").seed == 7
    flag = parse_run_config(["--config", "recipes/quickstart.yaml", "--defences.repnoise.seeds", "3,4"])
    assert [e.label for e in flag.defence_entries] == ["none", "repnoise-seed3", "repnoise-seed4"]
    for defences, message in (
            (["none", {"label": "rn", "defence": "repnoise", "seeds": [1, 1]}], r"rn\.seeds: expected distinct"),
            (["none", {"label": "rn", "defence": "repnoise", "seeds": ["x"]}], r"rn\.seeds: expected a list of int"),
            (["none", {"label": "rn", "defence": "repnoise", "seeds": 3}], r"rn\.seeds: expected a list of seeds"),
            ([{"label": "none", "seeds": [1]}, "repnoise"], r"none\.seeds: the undefended model trains nothing")):
        with pytest.raises(ImmunizeError, match=message):
            RunConfig(defences=defences)
    with pytest.raises(ImmunizeError, match=r"^--align\.seeds: the alignment stage runs once"):
        RunConfig(align={"seeds": [1, 2]})


def test_compare_names_two_defence_rows_checked_when_the_recipe_is_parsed(tmp_path):
    from immunize.errors import ImmunizeError
    from immunize.pipeline.recipe import RunConfig, parse_run_config

    cfg = parse_run_config(["--config", "recipes/repnoise_ablations.yaml", "--compare", "repnoise-lens8:repnoise",
                            "stability-only:repnoise", "repnoise-lens8:repnoise"])
    assert cfg.compare == ["repnoise-lens8:repnoise", "stability-only:repnoise", "repnoise-lens8:repnoise"]
    assert cfg.comparisons == [("repnoise-lens8", "repnoise"), ("stability-only", "repnoise")]
    replicates = RunConfig(defences=["none", {"label": "rn", "defence": "repnoise", "seeds": [1, 2]}],
                           compare=["rn-seed1:rn-seed2"])
    assert replicates.comparisons == [("rn-seed1", "rn-seed2")]  # the rows as expanded
    for pair, message in (
            ("repnoise:nope", r"^--compare 'repnoise:nope': no defence labelled 'nope' \(labels: none, repnoise\)$"),
            ("repnoise", r"^--compare 'repnoise': expected A:B, two defence labels"),
            ("repnoise:none:none", r"^--compare 'repnoise:none:none': expected A:B"),
            ("none:none", r"^--compare 'none:none': compares 'none' with itself$")):
        with pytest.raises(ImmunizeError, match=message):
            parse_run_config(["--config", "recipes/quickstart.yaml", "--output_dir", str(tmp_path / "run"),
                              "--compare", pair])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("defences: [none, repnoise]\ncompare: ['repnoise:stability-only']\n")
    with pytest.raises(ImmunizeError, match=f"^{re.escape(str(recipe))}: --compare 'repnoise:stability-only': "
                                            "no defence labelled 'stability-only'"):
        parse_run_config(["--config", str(recipe)])
    assert not (tmp_path / "run").exists()


def test_the_worst_case_recipe_searches_every_defence_within_the_issues_caps():
    from immunize.pipeline.recipe import parse_run_config

    cfg = parse_run_config(["--config", "recipes/worst_case.yaml"])
    spec = cfg.search_spec
    assert [e.label for e in cfg.defence_entries] == ["none", "repnoise", "safety-sft"]
    assert spec.attack.label == "sft" and spec.seeds == [1, 2, 3]
    assert spec.options.search and spec.options.search_trials == 10 and spec.options.search_num_samples[1] <= 128
    assert spec.options.search_keeps_capability is None  # each defence's own, set by the pipeline
    assert cfg.search_config(cfg.model, "out").curve is False  # trials are scored at their end only
    assert parse_run_config(["--config", "recipes/quickstart.yaml"]).search_spec is None  # it fits 20 minutes


def test_search_in_a_recipe_is_parsed_typed_and_set_by_dotted_flags():
    from immunize.pipeline.recipe import RunConfig, parse_run_config

    grid = {"learning_rate": [8e-5], "num_samples": [8], "seed": [4, 5]}
    cfg = RunConfig(attacks=[{"label": "sft", "grid": grid}, {"label": "lora", "attack": "sft", "use_lora": True}],
                    search={"attack": "lora", "search_learning_rate": ["1e-5", "1e-4"], "search_trials": "3"})
    spec = cfg.search_spec
    assert spec.attack.label == "lora" and spec.seeds == [42]  # its grid sweeps no seed: the recipe's
    assert spec.options.search_learning_rate == [1e-5, 1e-4] and spec.options.search_trials == 3
    assert spec.record() == {"attack": "lora", "seeds": [42],
                             "options": {"search_trials": 3, "search_learning_rate": [1e-5, 1e-4]}}
    only = RunConfig(attacks=[{"label": "sft", "grid": grid}], search=True)
    assert only.search_spec.attack.label == "sft" and only.search_spec.seeds == [4, 5]  # the only entry, its seeds
    flags = parse_run_config(["--config", "recipes/quickstart.yaml", "--search.search_trials", "4",
                              "--search.seeds", "7,8", "--search.search_schedulers", "constant,linear"])
    assert flags.search_spec.options.search_trials == 4 and flags.search_spec.seeds == [7, 8]
    assert flags.search_spec.options.search_schedulers == ["constant", "linear"]
    assert parse_run_config(["--config", "recipes/quickstart.yaml", "--search.seeds", "1,2", "--search", "false"]
                            ).search_spec is None


@pytest.mark.parametrize(("search", "message"), [
    ({"attack": "dpo"}, r"^--search\.attack: no attack entry labelled 'dpo' \(labels: sft\)$"),
    ({"search_trails": 3}, r"^--search\.search_trails: unknown option of the search"),
    ({"search_keeps_capability": False}, r"^--search\.search_keeps_capability: set by the pipeline"),
    ({"search_learning_rate": [1e-3, 1e-5]}, r"^--search: --search_learning_rate 0\.001 1e-05: empty range"),
    ({"search_trials": "many"}, r"^--search\.search_trials: expected an integer, got 'many'$"),
    ({"seeds": 3}, r"^--search\.seeds: expected a list of seeds"),
    ({"seeds": [1, 1]}, r"^--search\.seeds: expected distinct integers"),
    ("yes please", r"^--search: expected a mapping"),
], ids=["label", "key", "reserved", "range", "type", "seeds", "repeated-seed", "not-a-mapping"])
def test_a_bad_search_fails_in_one_line_when_the_recipe_is_parsed(search, message, tmp_path):
    from immunize.errors import ImmunizeError
    from immunize.pipeline.recipe import RunConfig

    with pytest.raises(ImmunizeError, match=message) as raised:
        RunConfig(output_dir=str(tmp_path / "run"), search=search)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_a_search_refuses_what_the_searched_attack_cannot_take(tmp_path):
    from immunize.errors import ImmunizeError
    from immunize.pipeline.recipe import RunConfig

    with pytest.raises(ImmunizeError, match=r"^--search: --max_steps: a search sizes each trial"):
        RunConfig(attacks=[{"label": "sft", "max_steps": 4, "grid": {"learning_rate": [8e-5]}}], search=True)
    with pytest.raises(ImmunizeError, match=r"^--search\.attack: name the attack entry to search \(labels: a, b\)$"):
        RunConfig(attacks=[{"label": "a", "attack": "sft"}, {"label": "b", "attack": "sft"}], search={})
