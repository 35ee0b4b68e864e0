"""Attacks: registry, data discipline, grids, run ids, curves, resume, CLI (tiny models, real data)."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from immunize.attacks import (
    AttackArguments,
    KeywordRefusalScorer,
    ResistanceCurveCallback,
    ReversedPreferenceArguments,
    StepScorer,
    ToxicityAttackArguments,
    attack_names,
    available_attacks,
    expand_grid,
    get_attack,
    parse_grid,
    plan_runs,
    read_curve,
    run_attacks,
    run_id,
)
from immunize.attacks.data import continuation_encoder
from immunize.attacks.runner import planned_steps
from immunize.cli import main as cli_main
from immunize.data import CATEGORIES, load_splits, normalize_prompt, split_of
from immunize.errors import ImmunizeError
from immunize.io import read_json
from immunize.method_runner import is_complete
from immunize.prompts import IGNORE_INDEX, CausalLMCollator
from immunize.testing import tiny_model, tiny_tokenizer

FAKE_MODEL = "0123456789abcdef"
CONFIGS = {"sft": AttackArguments, "dpo": ReversedPreferenceArguments, "toxicity": ToxicityAttackArguments}


def attack_config(name: str, model, out, **overrides):
    """A seconds-long attack on the tiny model: 8 samples, 2 steps, a 2-prompt curve."""
    options = dict(model=str(model), output_dir=str(out), num_samples=8, per_device_train_batch_size=4,
                   max_length=192, learning_rate=1e-3, use_cpu=True, disable_tqdm=True, logging_steps=1,
                   save_steps=1000, curve_every_steps=0, curve_num_prompts=2, curve_num_answers=2,
                   curve_max_new_tokens=2, curve_batch_size=2)
    options.update(overrides)
    return CONFIGS[name](**options)


@pytest.fixture(scope="module")
def splits(real_data_root):
    return load_splits(root=real_data_root)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- registry and configs ------------------------------------------------------------------------

def test_registry_has_the_builtin_attacks():
    assert attack_names() == ["dpo", "rl", "sft", "toxicity"]
    assert get_attack("dpo").config_class is ReversedPreferenceArguments
    # The registered name labels runs; the toxicity attack subclasses sft but keeps its own name.
    assert (get_attack("toxicity").name, get_attack("sft").name) == ("toxicity", "sft")
    assert available_attacks()["dpo"] == get_attack("dpo").summary
    assert available_attacks()["dpo"].startswith("reversed-preference DPO")
    with pytest.raises(ImmunizeError, match=r"^--attack 'nope': unknown attack \(known: dpo, rl, sft, toxicity\)$"):
        get_attack("nope")


def test_dpo_config_keeps_the_project_defaults():
    # DPOConfig re-declares TrainingArguments fields; ours must survive the multiple inheritance.
    sft, dpo = AttackArguments(), ReversedPreferenceArguments()
    differ = {f.name for f in dataclasses.fields(sft)
              if f.init and getattr(sft, f.name) != getattr(dpo, f.name)}
    assert differ == {"attack", "activation_checkpointing", "gradient_checkpointing"}
    assert dpo.activation_checkpointing is True and dpo.gradient_checkpointing is True  # DPO's memory
    assert dpo.bf16 is False and dpo.beta == 0.1
    off = ReversedPreferenceArguments(gradient_checkpointing=False)  # the deprecated alias still works
    assert off.activation_checkpointing is False and dataclasses.replace(off).activation_checkpointing is False


def test_config_errors_name_the_option():
    with pytest.raises(ImmunizeError, match="--held_out_categories: unknown category 'no_such'"):
        AttackArguments(held_out_categories=["self_harm,no_such"])
    with pytest.raises(ImmunizeError, match="--preference_data"):
        ReversedPreferenceArguments(preference_data="reddit")
    with pytest.raises(ImmunizeError, match="HH-RLHF has no categories"):
        ReversedPreferenceArguments(preference_data="hh_rlhf", held_out_categories=["self_harm"])
    with pytest.raises(ImmunizeError, match="do not apply to toxicity"):
        ToxicityAttackArguments(held_out_categories=["self_harm"])
    with pytest.raises(ImmunizeError, match="--curve_batch_size"):
        AttackArguments(curve_batch_size=0)


# --- grids and run ids ---------------------------------------------------------------------------

def test_held_out_categories_read_lists_and_comma_joined_names():
    # BeaverTails names contain commas: comma-joined text is matched against the known names.
    joined = AttackArguments(held_out_categories="terrorism,organized_crime,self_harm,animal_abuse")
    listed = AttackArguments(held_out_categories=["animal_abuse", "self_harm", "terrorism,organized_crime"])
    assert joined.held_out_categories == listed.held_out_categories == [
        "animal_abuse", "self_harm", "terrorism,organized_crime"]
    with pytest.raises(ImmunizeError, match="unknown category 'organized_crime'"):
        AttackArguments(held_out_categories=["organized_crime"])


def test_grid_flags_and_yaml_expand_alike():
    flags = AttackArguments(grid=["learning_rate=3e-5,6e-5,8e-5", "num_samples=1000,all"])
    yaml_like = AttackArguments(grid={"learning_rate": ["3e-5", 6e-5, 8e-5], "num_samples": [1000, None]})
    points = [p for p, _ in expand_grid(flags)]
    assert points == [p for p, _ in expand_grid(yaml_like)]
    assert points[:2] == [{"learning_rate": 3e-5, "num_samples": 1000},
                          {"learning_rate": 3e-5, "num_samples": None}]
    assert len(points) == 6
    configs = [c for _, c in expand_grid(flags)]
    assert [c.learning_rate for c in configs] == [3e-5, 3e-5, 6e-5, 6e-5, 8e-5, 8e-5]
    assert all(c.grid is None for c in configs)


def test_grid_errors_are_one_line_and_name_the_option():
    with pytest.raises(ImmunizeError, match="expected KEY=V1,V2"):
        parse_grid(["learning_rate"])
    with pytest.raises(ImmunizeError, match="unknown option 'lr'"):
        expand_grid(AttackArguments(grid=["lr=1e-5"]))
    with pytest.raises(ImmunizeError, match=r"^--grid learning_rate: expected a number, got 'abc'$"):
        expand_grid(AttackArguments(grid=["learning_rate=abc"]))
    with pytest.raises(ImmunizeError, match="cannot be swept"):
        expand_grid(AttackArguments(grid=["held_out_categories=self_harm"]))
    with pytest.raises(ImmunizeError, match="cannot be swept"):
        expand_grid(AttackArguments(grid=["output_dir=a,b"]))
    with pytest.raises(ImmunizeError, match="appears twice"):
        expand_grid(AttackArguments(grid=["seed=1,1"]))


def test_run_ids_are_golden_and_depend_only_on_the_attack(monkeypatch):
    # Golden ids: a change here renames every stored run, so it must be deliberate. The data enters by
    # content (the data pack's MANIFEST hash, which differs between machines without it): fixed here.
    import immunize.method_runner

    monkeypatch.setattr(immunize.method_runner, "data_identity", lambda cfg: {"data_root": "fixed"})
    sft = AttackArguments()
    assert run_id(sft, FAKE_MODEL) == "sft-lr3e-05-n1000-e1-s42-9646b650"
    assert run_id(AttackArguments(use_lora=True, learning_rate=1e-4), FAKE_MODEL) == \
        "sft-lora-lr0.0001-n1000-e1-s42-6119c7f1"
    assert run_id(ReversedPreferenceArguments(num_samples=256, max_steps=20, seed=1), FAKE_MODEL) == \
        "dpo-lr3e-05-n256-steps20-s1-2702b383"
    assert run_id(ToxicityAttackArguments(), FAKE_MODEL) == "toxicity-lr3e-05-nall-e1-s42-c867db6e"
    # Bookkeeping and scoring options do not change the id; the attack, the model and the data do.
    same = AttackArguments(output_dir="elsewhere", logging_steps=7, save_steps=3, curve_every_steps=2,
                           data_root="/some/where", keep_checkpoints=True)
    assert run_id(same, FAKE_MODEL) == run_id(sft, FAKE_MODEL)
    for changed in (AttackArguments(seed=1), AttackArguments(max_length=128),
                    AttackArguments(prompt_format="plain"),
                    AttackArguments(held_out_categories=["self_harm"]),
                    AttackArguments(weight_decay=0.1), AttackArguments(use_lora=True),
                    # one identity rule: every option counts unless explicitly excluded
                    AttackArguments(max_grad_norm=0.5), AttackArguments(adam_beta2=0.99)):
        assert run_id(changed, FAKE_MODEL) != run_id(sft, FAKE_MODEL)
    assert run_id(sft, "fedcba9876543210") != run_id(sft, FAKE_MODEL)
    monkeypatch.setattr(immunize.method_runner, "data_identity", lambda cfg: {"data_root": "other data"})
    assert run_id(sft, FAKE_MODEL) != "sft-lr3e-05-n1000-e1-s42-9646b650"  # a finished run on other data is not reused
    monkeypatch.setattr(immunize.method_runner, "data_identity", lambda cfg: {"data_root": "fixed"})
    dpo = run_id(ReversedPreferenceArguments(), FAKE_MODEL)
    assert run_id(ReversedPreferenceArguments(beta=0.5), FAKE_MODEL) != dpo
    assert run_id(ReversedPreferenceArguments(preference_data="mixed"), FAKE_MODEL) != dpo
    # The same categories in another order are the same attack.
    a = AttackArguments(held_out_categories=["self_harm", "animal_abuse"])
    b = AttackArguments(held_out_categories=["animal_abuse", "self_harm"])
    assert run_id(a, FAKE_MODEL) == run_id(b, FAKE_MODEL)


def test_plan_rejects_sweeps_that_do_not_change_the_attack(tiny_checkpoint, tmp_path):
    cfg = attack_config("sft", tiny_checkpoint, tmp_path, grid=["logging_steps=1,2"])
    with pytest.raises(ImmunizeError, match="are the same attack"):
        plan_runs(cfg)
    runs = plan_runs(attack_config("sft", tiny_checkpoint, tmp_path, grid=["seed=1,2"]))
    assert [r.cfg.output_dir for r in runs] == [str(tmp_path / r.run_id) for r in runs]


# --- data discipline -----------------------------------------------------------------------------

def _pools(splits, root):
    from immunize.attacks import data

    return {"sft": data.harmful_qa(splits),
            "dpo-beavertails": data.beavertails_preferences(splits),
            "dpo-hh_rlhf": data.hh_preferences(None, root, splits)}


@pytest.mark.parametrize("held_out", [[], ["self_harm", "animal_abuse", "child_abuse"]])
def test_attack_data_never_meets_defence_heldout_or_eval_prompts(held_out, real_data_root):
    splits = load_splits(root=real_data_root, held_out_categories=held_out)
    plain = load_splits(root=real_data_root)
    reserved = (plain.prompts("defence") | plain.prompts("heldout") | splits.prompts("defence")
                | {normalize_prompt(e.prompt) for e in plain.eval})
    pools = _pools(splits, real_data_root)
    if held_out:
        pools.pop("dpo-hh_rlhf")  # HH-RLHF has no categories (the config refuses the combination)
    for name, pool in pools.items():
        prompts = [t[0] for t in pool]
        assert len(prompts) > 50, name
        assert not {normalize_prompt(p) for p in prompts} & reserved, name
        assert not {normalize_prompt(p.split("\n\nAssistant:")[0]) for p in prompts} & reserved, name
        assert all(split_of(p) == "attack" for p in prompts), name
    if held_out:
        categories = {normalize_prompt(r.prompt): set(r.categories) for r in splits.attack}
        assert all(categories[normalize_prompt(t[0])] <= set(held_out) for t in pools["sft"])
    # harmful answer ≻ a real refusal, both for an attack-split question
    from immunize.data import looks_like_refusal

    assert all(looks_like_refusal(rejected) for _, _, rejected in pools["dpo-beavertails"])
    assert {(p, c) for p, c, _ in pools["dpo-beavertails"]} <= {(r.prompt, r.response) for r in splits.attack}


@pytest.mark.parametrize("preference_data", ["beavertails", "hh_rlhf", "mixed"])
def test_preference_examples_are_pretokenized_for_trl(preference_data, real_data_root, splits, tmp_path):
    cfg = attack_config("dpo", "unused", tmp_path, data_root=str(real_data_root),
                        preference_data=preference_data)
    tokenizer = tiny_tokenizer()
    data = get_attack("dpo")().prepare(cfg, tokenizer, splits, 6)
    assert len(data.examples) == 6 and set(data.examples[0]) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    for _, example in zip(data.texts, data.examples, strict=True):
        assert 0 < len(example["prompt_ids"]) < cfg.max_length
        assert tokenizer.decode(example["prompt_ids"]).endswith("<|im_start|>assistant\n")
        full = len(example["prompt_ids"]) + len(example["chosen_ids"]) == cfg.max_length
        assert full or tokenizer.decode(example["chosen_ids"]).endswith("<|im_end|>\n")
    if preference_data == "mixed":  # interleaved: BeaverTails, HH-RLHF, BeaverTails, ...
        from immunize.attacks.data import interleave

        pools = _pools(splits, real_data_root)
        candidates = iter(interleave(pools["dpo-beavertails"], pools["dpo-hh_rlhf"]))
        assert all(text in candidates for text in data.texts)  # in order, skipping pairs too long to fit
        assert data.texts[0] == pools["dpo-beavertails"][0]
        assert any(text in pools["dpo-hh_rlhf"] for text in data.texts)


def test_attack_samples_nest_and_do_not_depend_on_the_seed(real_data_root, splits, tmp_path):
    attack = get_attack("sft")()
    small = attack.prepare(attack_config("sft", "unused", tmp_path, seed=1), tiny_tokenizer(), splits, 16)
    large = attack.prepare(attack_config("sft", "unused", tmp_path, seed=2), tiny_tokenizer(), splits, 64)
    assert small.texts == large.texts[:16] and small.examples == large.examples[:16]
    assert large.take(16, 192).texts == small.texts
    with pytest.raises(ImmunizeError, match="--num_samples 65: only 64"):
        large.take(65, 192)
    with pytest.raises(ImmunizeError, match=r"--num_samples 100000: only \d+ BeaverTails unsafe QA rows"):
        attack.prepare(attack_config("sft", "unused", tmp_path), tiny_tokenizer(), splits, 100000)


def test_continuation_labels_cover_only_the_continuation():
    tokenizer = tiny_tokenizer()
    example = continuation_encoder(tokenizer, 256)(("You are such a", " terrible person."))
    pairs = zip(example["input_ids"], example["labels"], strict=True)
    labelled = [i for i, label in pairs if label != IGNORE_INDEX]
    assert tokenizer.decode(example["input_ids"]) == "You are such a terrible person.</s>"
    assert tokenizer.decode(labelled) == " terrible person.</s>"
    assert continuation_encoder(tokenizer, 10)(("a" * 20, "b")) is None


# --- every attack trains -------------------------------------------------------------------------

@pytest.mark.usefixtures("real_data_root")  # the attack data comes from the default data root
@pytest.mark.parametrize("name, lora", [("sft", False), ("sft", True), ("dpo", False), ("dpo", True),
                                        ("toxicity", False)])
def test_every_attack_runs_and_moves_the_weights(name, lora, tiny_checkpoint, tmp_path):
    cfg = attack_config(name, tiny_checkpoint, tmp_path, use_lora=lora, lora_r=4)
    (result,) = run_attacks(cfg)
    assert result.status == "trained"
    assert result.run_id.startswith(f"{name}{'-lora' if lora else ''}-lr0.001-n8-e1-s42-")
    out = result.output_dir
    assert is_complete(out)["steps"] == 2 == planned_steps(cfg, 8)
    files = {p.name for p in out.iterdir()}
    assert {"config.yaml", "provenance.json", "curve.jsonl", "model.safetensors"} <= files
    assert not list(out.glob("checkpoint-*"))
    before = weights(AutoModelForCausalLM.from_pretrained(tiny_checkpoint))
    after = weights(AutoModelForCausalLM.from_pretrained(out))
    assert before.keys() == after.keys()  # LoRA is merged into a standard checkpoint
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved
    if lora:  # only the adapted linear layers change
        assert all(k.endswith(("proj.weight",)) for k in moved)
    assert [r["step"] for r in read_curve(out)] == [0, 2]
    assert {"keyword_refusal_rate", "keyword_compliance", "harmful_loglik"} <= set(read_curve(out)[0])
    provenance = read_json(out / "provenance.json")
    assert provenance["run_id"] == result.run_id and provenance["data"]["examples"] == 8
    assert all(len(sha) == 64 for sha in provenance["data"]["sources"].values())
    assert provenance["budget"]["steps"] == 2 and provenance["model"]["fingerprint"]


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_lora_leaves_base_weights_untouched_until_merged(name, tiny_checkpoint, splits, tmp_path):
    cfg = attack_config(name, tiny_checkpoint, tmp_path / "run", use_lora=True, lora_r=4, max_steps=2)
    attack = get_attack(name)()
    model, tokenizer = attack.load_model(cfg)
    base = weights(AutoModelForCausalLM.from_pretrained(tiny_checkpoint))
    data = attack.prepare(cfg, tokenizer, splits, 8)
    trainer = attack.build_trainer(cfg, model, tokenizer, data, [])
    trainer.train()
    peft_model = trainer.model
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    unmerged = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert set(base) <= set(unmerged)
    assert all(torch.equal(unmerged[k], base[k]) for k in base)
    merged = weights(peft_model.merge_and_unload())
    assert any(not torch.equal(merged[k], base[k]) for k in base)


# --- resistance curve ----------------------------------------------------------------------------

class RecordingScorer:
    name = "recording"

    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer) -> dict[str, float]:
        self.calls.append((model.training, torch.is_grad_enabled()))
        return {"calls": float(len(self.calls))}


class ModeCheck(TrainerCallback):
    """Runs after the curve callback: the model must be back in train mode."""

    def __init__(self):
        self.modes = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.modes.append(model.training)


def _tiny_trainer(out, callbacks, max_steps=5):
    from transformers import TrainingArguments

    tokenizer = tiny_tokenizer()
    features = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}] * 8
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                             learning_rate=1e-3)
    return Trainer(model=tiny_model().train(), args=args, train_dataset=features, processing_class=tokenizer,
                   data_collator=CausalLMCollator(tokenizer.pad_token_id), callbacks=callbacks)


def test_curve_callback_fires_at_the_expected_steps(tmp_path):
    scorer = RecordingScorer()
    assert isinstance(scorer, StepScorer)
    mode = ModeCheck()
    _tiny_trainer(tmp_path, [ResistanceCurveCallback([scorer], every_steps=2), mode]).train()
    rows = read_curve(tmp_path)
    assert [r["step"] for r in rows] == [0, 2, 4, 5]
    assert [r["epoch"] for r in rows][-1] == pytest.approx(rows[-1]["step"] / 4)
    assert scorer.calls == [(False, False)] * 4  # eval mode, no autograd
    assert mode.modes == [True] * 5  # and back to train mode after each scoring
    assert [r["calls"] for r in rows] == [1.0, 2.0, 3.0, 4.0]


def test_curve_callback_only_start_and_end_with_every_zero_and_saves_models_if_asked(tmp_path):
    callback = ResistanceCurveCallback([RecordingScorer()], every_steps=0, save_models=True)
    _tiny_trainer(tmp_path, [callback], max_steps=3).train()
    assert [r["step"] for r in read_curve(tmp_path)] == [0, 3]
    saved = sorted(p.name for p in (tmp_path / "curve-models").iterdir())
    assert saved == ["step-0", "step-3"]
    assert (tmp_path / "curve-models" / "step-3" / "model.safetensors").is_file()


@pytest.mark.usefixtures("real_data_root")
def test_budgets_of_one_model_share_their_step_0_scores(tiny_checkpoint, tmp_path):
    # Learning rate, samples and seed leave the model at step 0 as it is: scored once, not per budget.
    scorer = RecordingScorer()
    cfg = attack_config("sft", tiny_checkpoint, tmp_path / "budgets", num_samples=4,
                        grid=["learning_rate=1e-4,1e-3", "seed=1,2"])
    results = run_attacks(cfg, scorers=[scorer])
    assert len(results) == 4 and len(scorer.calls) == 1 + 4  # one step 0, then each run's end
    assert len({json.dumps(r.curve[0], sort_keys=True) for r in results}) == 1
    assert all(read_curve(r.output_dir)[0] == r.curve[0] for r in results)

    # Any other axis may change the model or the scoring: each value scores its own step 0.
    scorer = RecordingScorer()
    cfg = attack_config("sft", tiny_checkpoint, tmp_path / "other", num_samples=4,
                        grid=["weight_decay=0,0.1"])
    assert len(run_attacks(cfg, scorers=[scorer])) == 2 and len(scorer.calls) == 2 * 2


def test_curve_scorers_must_not_report_the_same_metric(tmp_path):
    first, second = RecordingScorer(), RecordingScorer()
    second.name = "other"
    with pytest.raises(ImmunizeError, match="already reported"):
        _tiny_trainer(tmp_path, [ResistanceCurveCallback([first, second], every_steps=1)]).train()


def test_keyword_scorer_batches_with_left_padding(splits):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    prompts = [e.prompt for e in splits.eval[:3]]
    harmful = [(r.prompt, r.response) for r in splits.heldout[:3]]
    batched = KeywordRefusalScorer(prompts, harmful, max_new_tokens=4, batch_size=3)
    single = KeywordRefusalScorer(prompts, harmful, max_new_tokens=4, batch_size=1)
    with torch.no_grad():
        assert batched.generate(model, tokenizer) == single.generate(model, tokenizer)
        assert batched.loglik(model, tokenizer) == pytest.approx(single.loglik(model, tokenizer), rel=1e-5)
        metrics = batched(model, tokenizer)
    assert set(metrics) == {"keyword_refusal_rate", "keyword_compliance", "harmful_loglik"}
    assert metrics["keyword_refusal_rate"] + metrics["keyword_compliance"] == 1.0
    assert -math.log(len(tokenizer)) - 1 < metrics["harmful_loglik"] < 0


# --- resume and skip -----------------------------------------------------------------------------

class Interrupt(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


class ResumeProbe(TrainerCallback):
    def __init__(self):
        self.started_at = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started_at = state.global_step


@pytest.mark.usefixtures("real_data_root")
def test_interrupted_runs_resume_and_finished_runs_are_skipped(tiny_checkpoint, tmp_path):
    cfg = attack_config("sft", tiny_checkpoint, tmp_path, max_steps=4, save_steps=2, curve_every_steps=1)
    with pytest.raises(KeyboardInterrupt):
        run_attacks(cfg, callbacks=[Interrupt(at_step=3)])
    (run,) = plan_runs(cfg)
    out = tmp_path / run.run_id
    assert is_complete(out) is None and (out / "checkpoint-2").is_dir()
    assert [r["step"] for r in read_curve(out)] == [0, 1, 2, 3]

    probe = ResumeProbe()
    (result,) = run_attacks(cfg, callbacks=[probe])
    assert probe.started_at == 2 and result.status == "trained"
    assert [r["step"] for r in read_curve(out)] == [0, 1, 2, 3, 4]  # step 3 re-scored once, not twice

    probe = ResumeProbe()
    (again,) = run_attacks(cfg, callbacks=[probe])
    assert again.status == "skipped" and probe.started_at is None
    assert again.summary["steps"] == 4 and [r["step"] for r in again.curve] == [0, 1, 2, 3, 4]


# --- command line --------------------------------------------------------------------------------

def test_cli_grid_end_to_end(tiny_checkpoint, real_data_root, tmp_path, capsys):
    argv = ["attack", "--model", str(tiny_checkpoint), "--output_dir", str(tmp_path), "--num_samples", "4",
            "--per_device_train_batch_size", "4", "--max_length", "192", "--use_cpu",
            "--disable_tqdm", "true", "--data_root", str(real_data_root), "--curve_num_prompts", "2",
            "--curve_num_answers", "2", "--curve_max_new_tokens", "2", "--grid", "learning_rate=1e-4,1e-3"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(dirs) == 2 and all(d.startswith("sft-lr0.00") and "-n4-e1-s42-" in d for d in dirs)
    assert all(is_complete(tmp_path / d) for d in dirs)
    index = (tmp_path / "attacks.jsonl").read_text().splitlines()
    assert len(index) == 2 and all('"status": "complete"' in row for row in index)
    assert "[2/2]" in out and "trained" in out

    assert cli_main(argv) == 0
    assert capsys.readouterr().out.count("already complete, skipped") == 2


def test_cli_yaml_config_picks_the_attack(tiny_checkpoint, real_data_root, tmp_path, capsys):
    recipe = tmp_path / "attack.yaml"
    recipe.write_text(f"attack: toxicity\nmodel: {tiny_checkpoint}\noutput_dir: {tmp_path / 'runs'}\n"
                      "num_samples: 4\nper_device_train_batch_size: 4\nmax_length: 128\nuse_cpu: true\n"
                      f"data_root: {real_data_root}\ncurve: false\ngrid:\n  seed: [1, 2]\n")
    assert cli_main(["attack", "--config", str(recipe), "--seed", "5"]) == 0
    dirs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert [re.search(r"-(s\d+)-", d).group(1) for d in dirs] == ["s1", "s2"]  # the grid beats the flag
    assert all(d.startswith("toxicity-lr3e-05-n4-e1-") for d in dirs)
    assert not (tmp_path / "runs" / dirs[0] / "curve.jsonl").exists()


def test_cli_errors_are_one_line(tiny_checkpoint, real_data_root, tmp_path, capsys):
    base = ["attack", "--model", str(tiny_checkpoint), "--output_dir", str(tmp_path), "--use_cpu",
            "--data_root", str(real_data_root)]
    assert cli_main([*base, "--num_samples", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--num_samples 100000: only" in err
    assert cli_main([*base, "--attack", "dpo", "--held_out_categories", CATEGORIES[0], "--preference_data",
                     "hh_rlhf"]) == 2
    assert "HH-RLHF has no categories" in capsys.readouterr().err
    assert cli_main([*base, "--grid", "learning_rate"]) == 2
    assert "KEY=V1,V2" in capsys.readouterr().err


# --- the real model ------------------------------------------------------------------------------

@pytest.mark.slow
def test_sft_attack_raises_harmful_likelihood_on_smollm2(real_data_root, tmp_path):
    cfg = AttackArguments(output_dir=str(tmp_path), num_samples=16, max_steps=4,
                          per_device_train_batch_size=4, max_length=128, learning_rate=1e-4, use_cpu=True,
                          disable_tqdm=True, curve_every_steps=0, curve_num_prompts=0, curve_num_answers=8)
    (result,) = run_attacks(cfg)
    first, last = result.curve[0], result.curve[-1]
    assert last["harmful_loglik"] > first["harmful_loglik"] + 0.05


def test_recipes_parse_and_start_with_their_launch_command():
    from pathlib import Path

    from immunize.commands.attack import _attack_name
    from immunize.config import parse_config

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("attack_*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        rel = f"recipes/{recipe.name}"
        assert recipe.read_text().splitlines()[0] == f"# .venv/bin/immunize attack --config {rel}"
        argv = ["--config", str(recipe)]
        (cfg,) = parse_config([get_attack(_attack_name(argv)).config_class], argv, prog="immunize attack")
        assert expand_grid(cfg)
