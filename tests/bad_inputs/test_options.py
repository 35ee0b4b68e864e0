"""Bad option values (issue 13): each fails when the options are parsed, in one line naming the option
(and the file, when a YAML file gave it), before a model is loaded or anything is written.

- numbers: a learning rate <= 0, NaN or inf in any float option, a size that must be positive;
- `immunize run` builds every stage's config when the recipe is parsed: every defence, every attack at
  every grid point, both evaluations and the judges they name;
- YAML values of the wrong type (``num_samples: 64.5``), while unambiguous ones are read as meant
  (``8e-5`` is a float to us, though PyYAML reads it as text).

Every command runs in-process (``immunize.cli.main``) through the ``fails`` fixture, which also checks
that nothing appeared under the output directory's parent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# ``immunize run`` recipe, tiny and complete: every case below changes one thing in it.
RECIPE = """\
name: bad
model: {model}
max_length: 64
align: {{num_harmful: 8, num_benign: 8}}
defences:
  - {{label: none}}
  - {{label: repnoise, num_samples: 8, learning_rate: 1.0e-3}}
attacks:
  - {{label: sft, curve_every_steps: 1, grid: {{learning_rate: [1.0e-3], num_samples: [8], seed: [1]}}}}
curve_num_prompts: 2
curve_max_new_tokens: 4
eval_harmfulness_samples: 6
"""


def command(tmp_path: Path, argv: list[str], model: Path, data_root: Path) -> list[str]:
    """``argv`` with its placeholders filled: {out} (under tmp_path), {model}, {data}, {recipe}."""
    recipe = tmp_path / "recipe.yaml"
    if not recipe.exists():
        recipe.write_text(RECIPE.format(model=model))
    names = {"out": tmp_path / "out", "model": model, "data": data_root, "recipe": recipe}
    return [str(arg).format(**names) for arg in argv]


def recipe_with(tmp_path: Path, model: Path, change: str) -> Path:
    """The tiny recipe with ``change`` (YAML lines) replacing its keys of the same name."""
    path = tmp_path / "recipe.yaml"
    keys = {line.split(":", 1)[0] for line in change.splitlines() if line and not line.startswith(" ")}
    kept, skipping = [], False
    for line in RECIPE.format(model=model).splitlines():
        if not line.startswith(" "):
            skipping = line.split(":", 1)[0] in keys
        if not skipping:
            kept.append(line)
    path.write_text("\n".join(kept) + "\n" + change)
    return path


def cases(rows: list[tuple], name) -> list:
    """``rows`` as pytest params whose ids are ``name(row)``."""
    return [pytest.param(*row, id=name(row)) for row in rows]


DEFEND = ["defend", "--model", "{model}", "--data_root", "{data}", "--output_dir", "{out}"]
ATTACK = ["attack", "--model", "{model}", "--data_root", "{data}", "--output_dir", "{out}"]
EVALUATE = ["evaluate", "--model", "{model}", "--data_root", "{data}", "--output_dir", "{out}"]
RUN = ["run", "--config", "{recipe}", "--data_root", "{data}", "--output_dir", "{out}"]


# ---- numbers: learning rates, NaN/inf, sizes that must be positive --------------------------------

@pytest.mark.parametrize(("argv", "needle"), cases([
    # A learning rate of 0 trained nothing and marked the run complete; a negative one left a run folder.
    ([*DEFEND, "--defence", "repnoise", "--learning_rate", "0"], "--learning_rate 0: must be positive"),
    ([*DEFEND, "--defence", "safety-sft", "--learning_rate=-1e-5"], "--learning_rate -1e-05: must be positive"),
    ([*DEFEND, "--defence", "repnoise", "--learning_rate", "nan"], "--learning_rate nan: must be a finite number"),
    ([*ATTACK, "--learning_rate", "0"], "--learning_rate 0: must be positive"),
    ([*ATTACK, "--grid", "learning_rate=3e-5,0"], "--learning_rate 0: must be positive"),
    ([*ATTACK, "--grid", "learning_rate=inf", "num_samples=8"], "--learning_rate inf: must be a finite number"),
    (["align", "--model", "{model}", "--output_dir", "{out}", "--learning_rate", "0"],
     "--learning_rate 0: must be positive"),
    ([*EVALUATE, "--trainability_learning_rate", "0"], "--trainability_learning_rate 0: must be positive"),
    # NaN passes every range check (nan < 0 is false): every float option, the method's and Trainer's.
    ([*DEFEND, "--defence", "repnoise", "--alpha", "nan"], "--alpha nan: must be a finite number"),
    ([*DEFEND, "--defence", "repnoise", "--beta", "inf"], "--beta inf: must be a finite number"),
    ([*DEFEND, "--defence", "none", "--weight_decay", "nan"], "--weight_decay nan: must be a finite number"),
    ([*DEFEND, "--defence", "vaccine", "--max_grad_norm", "nan"], "--max_grad_norm nan: must be a finite number"),
    ([*ATTACK, "--attack", "dpo", "--beta", "nan"], "--beta nan: must be a finite number"),
    ([*ATTACK, "--lora_dropout", "nan"], "--lora_dropout nan: must be a finite number"),
    ([*EVALUATE, "--trainability_learning_rate", "nan"], "--trainability_learning_rate nan: must be a finite"),
    (["report", "{out}", "--phi", "nan"], "--phi nan: must be a finite number"),
    # Sizes: a batch of 0 wrote the run-identity file before Trainer failed (blocking the fixed rerun).
    ([*DEFEND, "--defence", "repnoise", "--per_device_train_batch_size", "0"],
     "--per_device_train_batch_size 0: must be at least 1"),
    ([*DEFEND, "--defence", "safety-sft", "--gradient_accumulation_steps", "0"],
     "--gradient_accumulation_steps 0: must be at least 1"),
    ([*DEFEND, "--defence", "safety-sft", "--num_train_epochs", "0"],
     "--num_train_epochs 0: must be positive (or set --max_steps)"),
    ([*ATTACK, "--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be at least 1"),
    ([*ATTACK, "--use_lora", "--lora_r", "0"], "--lora_r 0: must be at least 1"),
    # A flag's text that is no integer: one line, not argparse's usage screen.
    ([*DEFEND, "--defence", "repnoise", "--num_samples", "64.5"],
     "argument --num_samples/--num-samples: invalid int value: '64.5'"),
], lambda row: " ".join([row[0][0], *row[0][-2:]])))
def test_bad_numbers_fail_at_parse_time(fails, tmp_path, tiny_checkpoint, real_data_root, argv, needle):
    fails(command(tmp_path, argv, tiny_checkpoint, real_data_root), needle, untouched=[tmp_path])


# ---- immunize run: every stage's config is built when the recipe is parsed ------------------------

@pytest.mark.parametrize(("flags", "needle"), cases([
    (["--defences.repnoise.learning_rate", "0"], "--defences.repnoise: --learning_rate 0: must be positive"),
    (["--defences.repnoise.alpha", "nan"], "--defences.repnoise: --alpha nan: must be a finite number"),
    (["--defences.repnoise.num_samples", "-5"], "--defences.repnoise: --num_samples -5: must be positive"),
    (["--align.learning_rate", "nan"], "--align: --learning_rate nan: must be a finite number"),
    (["--attacks.sft.grid.learning_rate", "1e-3,0"], "--attacks.sft: --learning_rate 0: must be positive"),
    (["--attacks.sft.per_device_train_batch_size", "0"],
     "--attacks.sft: --per_device_train_batch_size 0: must be at least 1"),
    (["--phi", "nan"], "--phi nan: must be a finite number"),
    (["--epsilon", "inf"], "--epsilon inf: must be a finite number"),
    (["--curve_max_new_tokens", "0"], "--curve_max_new_tokens 0: must be at least 1"),
    (["--curve_refusal_gate", "1.5"], "--curve_refusal_gate 1.5: must be in [0, 1]"),
    # The evaluations the run will make, named by the recipe's own options.
    (["--eval_harmfulness_samples", "-3"], "--eval_harmfulness_samples -3: must not be negative"),
    (["--eval_max_new_tokens", "0"], "--eval_max_new_tokens 0: must be at least 1"),
    (["--eval_harmfulness_refusal_gate", "nan"], "--eval_harmfulness_refusal_gate nan: must be a finite number"),
    (["--eval_harmfulness_refusal_gate", "-0.5"], "--eval_harmfulness_refusal_gate -0.5: must be in [0, 1]"),
    (["--eval_suite", "nope"], "--eval_suite 'nope': unknown (use quick or full)"),
    (["--eval_trainability_tasks", "viggo,nope"], "--eval_trainability_tasks 'nope': unknown task (known: viggo, e2e)"),
    (["--harmfulness_judge", "nope"], "--harmfulness_judge 'nope': unknown judge (known: harmfulness"),
], lambda row: " ".join(row[0])))
def test_bad_recipe_fails_before_the_first_stage(fails, tmp_path, tiny_checkpoint, real_data_root, flags, needle):
    fails(command(tmp_path, [*RUN, *flags], tiny_checkpoint, real_data_root), needle, untouched=[tmp_path])


@pytest.mark.parametrize(("change", "needle"), [
    # These already failed at parse time; kept so.
    ("defences: [none, {label: x, defence: nope}]\n", "--defences.x: --defence 'nope': unknown defence"),
    ("attacks: [{label: y, attack: nope}]\n", "--attacks.y: --attack 'nope': unknown attack"),
    # A NaN from the file names the file.
    ("defences: [none, {label: repnoise, learning_rate: .nan}]\n",
     "recipe.yaml: --defences.repnoise: --learning_rate nan: must be a finite number"),
], ids=["unknown-defence", "unknown-attack", "nan-in-file"])
def test_bad_recipe_entries_fail_before_the_first_stage(fails, tmp_path, tiny_checkpoint, real_data_root,
                                                        change, needle):
    recipe_with(tmp_path, tiny_checkpoint, change)
    fails(command(tmp_path, RUN, tiny_checkpoint, real_data_root), needle, untouched=[tmp_path])


# ---- immunize evaluate: names are checked before config.yaml and provenance.json are written -------

@pytest.mark.parametrize(("flags", "needle"), cases([
    (["--harmfulness_judge", "nope"], "--harmfulness_judge 'nope': unknown judge"),
    (["--refusal_judge_fallback", "nope"], "--refusal_judge_fallback 'nope': unknown judge"),
    (["--toxicity_judge", "hf:"], "--toxicity_judge hf:: name a model after 'hf:'"),
    (["--skip", "toxicity,nope"], "--skip 'nope': unknown section (known: capability, harmfulness"),
    (["--capability_tasks", "mmlu,nope"], "--capability_tasks 'nope': unknown task (known: mmlu"),
    (["--trainability_tasks", "nope"], "--trainability_tasks 'nope': unknown task (known: viggo, e2e)"),
], lambda row: " ".join(row[0])))
def test_evaluate_checks_names_before_writing(fails, tmp_path, tiny_checkpoint, real_data_root, flags, needle):
    fails(command(tmp_path, [*EVALUATE, *flags], tiny_checkpoint, real_data_root), needle, untouched=[tmp_path])


# ---- YAML types ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "yaml", "needle"), cases([
    ([*DEFEND, "--defence", "repnoise"], "num_samples: 64.5\n", "--num_samples: expected an integer, got 64.5"),
    ([*DEFEND, "--defence", "repnoise"], "max_length: [1, 2]\n", "--max_length: expected an integer, got [1, 2]"),
    ([*DEFEND, "--defence", "repnoise"], "num_samples: abc\n", "--num_samples: expected an integer, got 'abc'"),
    ([*DEFEND, "--defence", "repnoise"], "alpha: [1.0]\n", "--alpha: expected a number, got [1.0]"),
    (ATTACK, "use_lora: 2\n", "--use_lora: expected true or false, got 2"),
    (ATTACK, "num_samples: true\n", "--num_samples: expected an integer, got True"),
    (ATTACK, "learning_rate: null\n", "--learning_rate: expected a number, got null"),
    (ATTACK, "grid: {learning_rate: [8e-5, fast]}\n", "--grid learning_rate: expected a number, got 'fast'"),
    (EVALUATE, "harmfulness_samples: 64.5\n", "--harmfulness_samples: expected an integer, got 64.5"),
    (["run", "--data_root", "{data}", "--output_dir", "{out}"], "analysis_layers: [a]\n",
     "--analysis_layers: expected a list of integers, got ['a']"),
    (["run", "--data_root", "{data}", "--output_dir", "{out}"], "phi: [0.5]\n",
     "--phi: expected a number, got [0.5]"),
], lambda row: f"{row[0][0]} {row[1].strip()}"))
def test_yaml_values_of_the_wrong_type_are_refused(fails, tmp_path, tiny_checkpoint, real_data_root,
                                                   argv, yaml, needle):
    config = tmp_path / "config.yaml"
    config.write_text(yaml)
    argv = [*command(tmp_path, argv, tiny_checkpoint, real_data_root), "--config", str(config)]
    err = fails(argv, needle, untouched=[tmp_path])
    if "--grid" not in needle:  # a grid value is checked when the grid is expanded
        assert str(config) in err


@pytest.mark.parametrize(("change", "needle"), [
    ("attacks:\n  - {label: sft, grid: {learning_rate: [1.0e-3], num_samples: [64.5]}}\n",
     "recipe.yaml: --attacks.sft.grid.num_samples: expected an integer, got 64.5"),
    ("defences: [none, {label: repnoise, num_samples: [1, 2]}]\n",
     "recipe.yaml: --defences.repnoise.num_samples: expected an integer, got [1, 2]"),
], ids=["grid-float-for-int", "list-for-int"])
def test_recipe_values_of_the_wrong_type_are_refused(fails, tmp_path, tiny_checkpoint, real_data_root,
                                                     change, needle):
    recipe_with(tmp_path, tiny_checkpoint, change)
    fails(command(tmp_path, RUN, tiny_checkpoint, real_data_root), needle, untouched=[tmp_path])


def test_unambiguous_yaml_values_are_read_as_meant(tmp_path, tiny_checkpoint):
    """Text read as the same flag text would be, whole floats as ints, scalars as one-item lists."""
    from immunize.attacks.grid import expand_grid
    from immunize.commands import attack, defend
    from immunize.pipeline.recipe import parse_run_config

    config = tmp_path / "defend.yaml"
    config.write_text("defence: repnoise\nlearning_rate: 8e-5\nnum_samples: 64.0\nmax_length: '96'\n"
                      "use_lora: 'no'\nheld_out_categories: self_harm\nablate: [noise]\n")
    _, cfg = defend.parse(["--config", str(config)])
    assert (cfg.learning_rate, cfg.num_samples, cfg.max_length, cfg.use_lora) == (8e-5, 64, 96, False)
    assert type(cfg.num_samples) is int and cfg.held_out_categories == ["self_harm"] and cfg.ablate == "noise"

    config = tmp_path / "attack.yaml"
    config.write_text("grid: {learning_rate: [3e-5, 8e-5], num_samples: 8}\ncurve: 'false'\n")
    cfg = attack.parse(["--config", str(config)])
    assert cfg.curve is False
    assert [point for point, _ in expand_grid(cfg)] == [{"learning_rate": 3e-5, "num_samples": 8},
                                                       {"learning_rate": 8e-5, "num_samples": 8}]

    recipe = recipe_with(tmp_path, tiny_checkpoint, "analysis_layers: 3\nphi: '0.25'\neval_trainability_tasks: "
                         "[viggo, e2e]\nattacks:\n  - {label: sft, grid: {learning_rate: 8e-5, num_samples: 8.0}}\n")
    run = parse_run_config(["--config", str(recipe), "--output_dir", str(tmp_path / "run")])
    assert run.analysis_layers == [3] and run.phi == 0.25 and run.eval_trainability_tasks == "viggo,e2e"
    assert run.attack_entries[0].grid == {"learning_rate": [8e-5], "num_samples": [8]}
    assert not (tmp_path / "run").exists()
