"""The online RL attack (issue #19): harmful reward, GRPO loop and resume, constraints, reward hacking."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback

from immunize.attack_adapters import attack_adapter
from immunize.attacks import get_attack, plan_runs, read_curve, run_attacks
from immunize.attacks.constraints import Lagrangian, RewardSignal, Shaping
from immunize.attacks.rl import CONSTRAINT_STATE, RLAttackArguments, read_rl_summary
from immunize.cli import main as cli_main
from immunize.data import load_splits, normalize_prompt, split_of
from immunize.errors import ImmunizeError
from immunize.io import read_json
from immunize.judges.base import Judge
from immunize.judges.registry import register_judge, unregister_judge
from immunize.method_runner import is_complete
from immunize.reward_hacking import repetition_rate, reward_hacking
from immunize.rewards import HarmfulRewardConfig, ensure_reward, is_heldout, load_reward, reward_pairs
from immunize.rewards import store as reward_store
from immunize.rewards.harmful import PairEncoder, load_backbone
from immunize.testing import length_judges, tiny_tokenizer
from immunize.verdict import DEFAULT_PHI


@pytest.fixture(scope="module")
def splits(real_data_root):
    return load_splits(root=real_data_root)


class HalfOrMore(Judge):
    """A harmfulness stand-in whose score is never under 0.5, so a Lagrangian with a lower budget must
    raise λ at every step, whatever the tiny model says."""

    name = "test-half-or-more"

    def _score(self, prompts, responses):
        return np.array([min(0.5 + len(r) / 80.0, 1.0) for r in responses])

    def fingerprint(self):
        return "half-or-more-v1"


@pytest.fixture
def judges():
    """The trained judges' names stand for length judges; ``test-half-or-more`` is the cost model."""
    with length_judges():
        register_judge(HalfOrMore.name, "test", lambda **options: HalfOrMore())
        try:
            yield
        finally:
            unregister_judge(HalfOrMore.name)


def rl_config(model, out, data_root, **overrides) -> RLAttackArguments:
    """Seconds on the tiny model: 4 prompts, 2 answers of 4 tokens each, 2 steps, a 2-prompt curve."""
    options = dict(model=str(model), output_dir=str(out), data_root=str(data_root), num_samples=4,
                   per_device_train_batch_size=4, num_generations=2, max_completion_length=4, max_steps=2,
                   learning_rate=1e-3, max_length=256, use_cpu=True, disable_tqdm=True, save_steps=1000,
                   curve_every_steps=1, curve_num_prompts=2, curve_num_answers=2, curve_max_new_tokens=4,
                   curve_batch_size=2, reward_preference_data="beavertails", reward_num_pairs=8)
    options.update(overrides)
    return RLAttackArguments(**options)


def tiny_reward_options(tiny_checkpoint) -> dict:
    """The reward model on the tiny LM as backbone: 8 pairs, one step."""
    return dict(reward="model", reward_backbone=str(tiny_checkpoint))


# --- reward hacking ----------------------------------------------------------------------------------

def _row(step, reward, harm, tokens=30.0, repetition=0.05):
    return {"step": step, "reward": reward, "harmfulness": harm, "answer_tokens": tokens, "repetition": repetition}


def test_repetition_rate_counts_repeated_word_bigrams():
    assert repetition_rate("How do I pick a lock on a door") == 0.0
    assert repetition_rate("the the the the") == pytest.approx(2 / 3)
    assert repetition_rate("no") == 0.0 and repetition_rate("") == 0.0


def test_reward_hacking_is_flagged_when_the_reward_rises_and_harm_stays_flat():
    verdict = reward_hacking([_row(0, -0.8, 0.10), _row(8, 0.0, 0.11), _row(16, 0.9, 0.12)])
    assert verdict["flag"] is True
    assert verdict["reward_gain"] == pytest.approx(1.7) and verdict["harm_gain"] == pytest.approx(0.02)
    assert any(f"below φ={DEFAULT_PHI:g}" in r for r in verdict["reasons"])
    assert verdict["steps"] == [0, 16] and verdict["thresholds"]["phi"] == DEFAULT_PHI


def test_a_real_harmful_gain_is_not_reward_hacking():
    verdict = reward_hacking([_row(0, -0.8, 0.10), _row(16, 0.9, 0.85)])
    assert verdict["flag"] is False and "harmfulness rose" in verdict["reasons"][0]


@pytest.mark.parametrize("last, reason", [
    (_row(16, 0.9, 0.85, repetition=0.7), "repeat themselves"),
    (_row(16, 0.9, 0.85, tokens=12.0), "collapse in length"),
])
def test_degenerate_answers_are_reward_hacking_even_when_judged_harmful(last, reason):
    verdict = reward_hacking([_row(0, -0.8, 0.10), last])
    assert verdict["flag"] is True and any(reason in r for r in verdict["reasons"])


def test_perplexity_and_flat_rewards_and_missing_metrics():
    rows = [_row(0, -0.8, 0.10), _row(16, 0.9, 0.85)]
    assert reward_hacking(rows, perplexity=(12.0, 30.0))["flag"] is True
    assert reward_hacking([_row(0, 0.1, 0.1), _row(16, 0.3, 0.1)])["flag"] is False  # gain 0.2 < 0.5
    missing = reward_hacking([{"step": 0, "reward": 0.0}, {"step": 4, "reward": 2.0}])
    assert missing["flag"] is None and "harmfulness" in missing["reasons"][0]
    assert reward_hacking([_row(0, 0.0, 0.1)])["flag"] is None


# --- constraints -------------------------------------------------------------------------------------

def test_lagrangian_lambda_rises_above_the_budget_and_falls_below_it():
    lagrangian = Lagrangian(lam=1.0, budget=0.1, lr=0.5)
    reward, cost = np.array([1.0, -1.0]), np.array([0.9, 0.7])
    np.testing.assert_allclose(lagrangian(reward, cost), (reward - 1.0 * cost) / 2.0)
    assert lagrangian.lam == pytest.approx(1.0 + 0.5 * (0.8 - 0.1))  # rose: mean cost 0.8 > budget
    lagrangian(reward, np.zeros(2))
    assert lagrangian.lam == pytest.approx(1.35 - 0.05)  # fell: cost 0 < budget
    for _ in range(100):
        lagrangian(reward, np.zeros(2))
    assert lagrangian.lam == 0.0  # projected: never negative
    shaping = Shaping(lam=2.0)
    np.testing.assert_allclose(shaping(reward, cost), reward - 2.0 * cost)
    assert shaping.lam == 2.0


def test_reward_signal_constrains_by_the_cost_and_logs_each_part():
    logged = {}
    signal = RewardSignal(lambda q, a: np.array([len(x) for x in a], float), Lagrangian(1.0, 0.0, 1.0),
                          lambda q, a: np.full(len(a), 0.5))
    chat = [[{"role": "assistant", "content": " abcd "}], [{"role": "assistant", "content": "ab"}]]
    out = signal(prompts=[[], []], completions=chat, question=["q1", "q2"],
                 log_metric=lambda k, v: logged.setdefault(k, v))
    assert out == pytest.approx([(4 - 0.5) / 2, (2 - 0.5) / 2])
    assert logged == {"attack_reward": 3.0, "cost": 0.5, "lambda": 1.0}
    assert signal.state() == {"lambda": 1.5}
    assert RewardSignal(lambda q, a: np.ones(len(a)))(prompts=["p"], completions=["x"], question=["q"]) == [1.0]


# --- options -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, flag", [
    (dict(reward="oracle"), "--reward"), (dict(constraint="veto"), "--constraint"),
    (dict(cost_budget=1.5), "--cost_budget"), (dict(constraint_lambda=-1.0), "--constraint_lambda"),
    (dict(lambda_lr=0.0), "--lambda_lr"), (dict(beta=-0.1), "--beta"), (dict(max_steps=0), "--max_steps"),
    (dict(num_generations=1), "--num_generations"), (dict(num_generations=3), "--per_device_train_batch_size"),
    (dict(max_completion_length=300), "--max_completion_length"), (dict(num_samples=1), "--num_samples"),
    (dict(reward_backbone_layers=0), "--reward_backbone_layers"),
    (dict(reward_preference_data="forum"), "--reward_preference_data"),
    (dict(reward_num_pairs=0), "--reward_num_pairs"), (dict(reward_learning_rate=0.0), "--reward_learning_rate"),
    (dict(held_out_categories=["self_harm"], reward_preference_data="mixed"), "--held_out_categories"),
])
def test_bad_options_fail_in_one_line_naming_the_option(options, flag, tmp_path):
    with pytest.raises(ImmunizeError) as err:
        rl_config("m", tmp_path, tmp_path, **options)
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


@pytest.mark.parametrize("options, flag", [
    (dict(heldout_fraction=1.0), "--heldout_fraction"), (dict(num_heldout_pairs=1), "--num_heldout_pairs"),
    (dict(max_answer_tokens=250), "--max_answer_tokens"), (dict(backbone=""), "--backbone"),
])
def test_bad_reward_model_options_fail_in_one_line(options, flag):
    with pytest.raises(ImmunizeError) as err:
        HarmfulRewardConfig(use_cpu=True, **options)
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


def test_the_cli_lists_the_rl_attack_and_its_options(capsys):
    with pytest.raises(SystemExit) as exit_code:
        cli_main(["attack", "--attack", "rl", "--help"])
    assert exit_code.value.code == 0
    shown = capsys.readouterr().out
    assert "--constraint" in shown and "--reward_backbone" in shown and "rl:" in shown


# --- the reward model ----------------------------------------------------------------------------------

def test_reward_pairs_come_from_the_attack_split_and_held_out_prompts_are_never_trained_on(splits,
                                                                                           real_data_root):
    cfg = HarmfulRewardConfig(use_cpu=True, data_root=str(real_data_root), num_pairs=300, num_heldout_pairs=80)
    pairs = reward_pairs(cfg, splits)
    assert len(pairs.train) == 300 and len(pairs.heldout) == 80
    assert {p.source for p in pairs.train} == {p.source for p in pairs.heldout} == {"beavertails", "hh_rlhf"}
    attack = splits.prompts("attack")
    reserved = splits.prompts("defence") | splits.prompts("heldout") | {normalize_prompt(e.prompt) for e in splits.eval}
    for pair in (*pairs.train, *pairs.heldout):
        assert split_of(pair.prompt) == "attack" and normalize_prompt(pair.prompt) not in reserved
        if pair.source == "beavertails":
            assert normalize_prompt(pair.prompt) in attack
    trained = {normalize_prompt(p.prompt) for p in pairs.train}
    assert not trained & {normalize_prompt(p.prompt) for p in pairs.heldout}
    assert all(is_heldout(p.prompt, cfg.heldout_fraction) for p in pairs.heldout)
    # The order is fixed: the same options give the same pairs; more pairs extend fewer.
    more = reward_pairs(HarmfulRewardConfig(use_cpu=True, data_root=str(real_data_root), num_pairs=400,
                                            num_heldout_pairs=80), splits)
    assert more.train[:300] == pairs.train and more.heldout == pairs.heldout


def test_reward_model_trains_once_is_cached_with_its_card_and_scores(tiny_checkpoint, splits, real_data_root,
                                                                      isolated_cache, monkeypatch):
    cfg = HarmfulRewardConfig(use_cpu=True, data_root=str(real_data_root), backbone=str(tiny_checkpoint),
                              preference_data="beavertails", num_pairs=8, num_heldout_pairs=6,
                              per_device_train_batch_size=4, max_length=128, max_answer_tokens=64,
                              disable_tqdm=True)
    directory = ensure_reward(cfg, splits)
    assert directory.parent == isolated_cache / "rewards" and directory.name.startswith("model-")
    files = {p.name for p in directory.iterdir()}
    assert {"model.safetensors", "config.json", "reward_card.json", "README.md"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]  # safetensors only
    card = read_json(directory / "reward_card.json")
    accuracy = card["heldout"]["pairwise_accuracy"]
    assert card["kind"] == "model" and accuracy["n"] == 6 and 0.0 <= accuracy["value"] <= 1.0
    assert card["data"]["train_pairs"] == 8 and card["training"]["steps"] == 2
    assert "Held-out pairwise accuracy" in (directory / "README.md").read_text()

    # Cached: the same options find it without training again; another option is another entry.
    monkeypatch.setattr(reward_store, "train_reward_model", lambda *a, **k: pytest.fail("retrained"))
    assert ensure_reward(cfg, splits) == directory
    other = HarmfulRewardConfig(use_cpu=True, data_root=str(real_data_root), backbone=str(tiny_checkpoint),
                                preference_data="beavertails", num_pairs=8, learning_rate=1e-4)
    assert reward_store.reward_dir(other) != directory

    reward = load_reward(directory)
    pairs = reward_pairs(cfg, splits).heldout
    scores = reward.score([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    assert np.isfinite(scores).all() and scores.mean() == pytest.approx(0.0, abs=1e-4)  # held-out units
    assert scores.std() == pytest.approx(1.0, abs=1e-3)
    assert reward.describe()["heldout_pairwise_accuracy"] == accuracy


# --- the RL loop --------------------------------------------------------------------------------------

class Interrupt(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


class ResumeProbe(TrainerCallback):
    started_at = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started_at = state.global_step


@pytest.mark.usefixtures("judges", "isolated_cache")
def test_rl_runs_two_steps_resumes_without_repeating_a_step_and_keeps_lambda(tiny_checkpoint, real_data_root,
                                                                             tmp_path):
    cfg = rl_config(tiny_checkpoint, tmp_path, real_data_root, save_steps=1, constraint="lagrangian",
                    harmfulness_judge=HalfOrMore.name, cost_budget=0.1, lambda_lr=0.5,
                    **tiny_reward_options(tiny_checkpoint))
    with pytest.raises(KeyboardInterrupt):
        run_attacks(cfg, callbacks=[Interrupt(at_step=2)])
    (run,) = plan_runs(cfg)
    out = tmp_path / run.run_id
    assert run.run_id.startswith("rl-lr0.001-n4-steps2-s42-")
    assert is_complete(out) is None and [r["step"] for r in read_curve(out)] == [0, 1, 2]
    saved_lambda = read_json(out / "checkpoint-1" / CONSTRAINT_STATE)["lambda"]
    assert saved_lambda >= 1.0 + 0.5 * (0.5 - 0.1)  # the cost is at least 0.5: λ rose at step 1

    probe = ResumeProbe()
    (result,) = run_attacks(cfg, callbacks=[probe])
    assert probe.started_at == 1 and result.status == "trained" and result.summary["steps"] == 2
    curve = read_curve(out)
    assert [r["step"] for r in curve] == [0, 1, 2]  # step 2 scored once, after the resume
    assert {"reward", "kl", "answer_tokens", "repetition", "lambda", "harmfulness", "refusal_rate",
            "harmful_loglik"} <= set(curve[0])
    assert curve[0]["kl"] == pytest.approx(0.0, abs=1e-6) and curve[-1]["kl"] > 0  # the policy left the start
    assert curve[0]["lambda"] == 1.0 and curve[1]["lambda"] == pytest.approx(saved_lambda)

    summary = read_rl_summary(out)
    assert summary["training"]["logged_steps"] == 2  # the checkpoint's step-1 log, then step 2 once
    assert summary["training"]["last"]["step"] == 2
    assert summary["training"]["last"]["lambda"] == pytest.approx(saved_lambda)  # λ carried across the resume
    assert summary["constraint"]["judge_is_constraint_and_evaluator"] is True
    assert summary["constraint"]["lambda_final"] > saved_lambda
    assert summary["reward"]["kind"] == "model" and summary["reward"]["evaluation_reuses_reward"] is False
    assert summary["reward"]["heldout_pairwise_accuracy"]["n"] >= 2
    assert summary["reward_hacking"]["flag"] in (True, False) and summary["reward_hacking"]["reasons"]
    assert "rewards/" in " ".join(read_json(out / "provenance.json")["data"]["sources"])
    assert not list(out.glob("checkpoint-*")) and (out / "model.safetensors").is_file()

    probe = ResumeProbe()
    (again,) = run_attacks(cfg, callbacks=[probe])
    assert again.status == "skipped" and probe.started_at is None


# --- attack-time adapters ------------------------------------------------------------------------------

def _fixed_vector(model):
    """A security vector with fixed weights (r 8, q_proj/v_proj), as PEFT saves one."""
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for k, (_, p) in enumerate(n for n in peft.named_parameters() if "lora_" in n[0]):
            idx = torch.arange(p.numel(), dtype=torch.float64)
            p.copy_((0.2 * torch.sin(1.3 * idx + 0.7 * k + 0.2)).reshape(p.shape))
    return peft


@pytest.mark.usefixtures("judges", "isolated_cache")
@pytest.mark.parametrize("lora, beta", [(False, 0.04), (True, 0.04), (False, 0.0)])
def test_policy_and_reference_train_with_the_security_vector(lora, beta, tiny_checkpoint, splits, real_data_root,
                                                             tmp_path):
    """TRL's reference (full fine-tuning), the policy with its LoRA off (LoRA), or the copy the curve loads
    when TRL keeps none (beta 0): each is the starting policy with the defence's vector on."""
    defended = tmp_path / "defended"
    shutil.copytree(tiny_checkpoint, defended)
    _fixed_vector(AutoModelForCausalLM.from_pretrained(defended)).save_pretrained(defended / "attack_adapter")
    (defended / "immunize-complete.json").write_text(json.dumps({"attack_adapter": "attack_adapter"}))
    cfg = rl_config(defended, tmp_path / "rl", real_data_root, reward="judge", use_lora=lora, lora_r=4, beta=beta)
    attack = get_attack("rl")()
    model, tokenizer = attack.load_model(cfg)
    data = attack.prepare(cfg, tokenizer, splits, 4)
    ids = torch.tensor([tiny_tokenizer()("Question: hi\nAnswer: ok")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(defended)
    expected = PeftModel.from_pretrained(base, defended / "attack_adapter").eval()(input_ids=ids).logits.detach()
    with attack_adapter(cfg.model, model):
        trainer = attack.build_trainer(cfg, model, tokenizer, data, [])
        curve = trainer.callback_handler.callbacks[-1]
        assert [s.name for s in curve.scorers] == ["harmfulness", "rl"]
        with torch.no_grad():
            policy = trainer.model.eval()(input_ids=ids).logits
            start = curve.scorers[1].reference(ids, torch.ones_like(ids))  # what the curve's KL compares with
            if not lora and beta:  # the reference of TRL's KL penalty
                torch.testing.assert_close(trainer.ref_model(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    assert (trainer.ref_model is None) == (lora or not beta)
    torch.testing.assert_close(policy, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(start, expected, rtol=0, atol=1e-6)
    record = trainer.run_record["reward"]
    assert record["kind"] == "judge" and record["evaluation_reuses_reward"] is True and "reuses" in record["note"]


def test_minilm_pairs_keep_the_answer_opening_and_the_prompt_end():
    cfg = HarmfulRewardConfig(use_cpu=True, max_length=32, max_answer_tokens=8)
    model, tokenizer = load_backbone(cfg)
    encode = PairEncoder(tokenizer, cfg.max_length, cfg.max_answer_tokens)
    ids = encode("word " * 50 + "last", "Sure, here is how you do it, step by step: first")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) == 32 and tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2
    question, answer = tokens[1:tokens.index("[SEP]")], tokens[tokens.index("[SEP]") + 1:-1]
    assert question[0] == "word" and question[-3:] == ["last", "answer", ":"]  # the end kept, the start cut
    assert answer == tokenizer.convert_ids_to_tokens(tokenizer(" Sure, here is how you do it", add_special_tokens=False)
                                                     ["input_ids"])[:8]
    # A forward as TRL's RewardTrainer makes it (no token types, use_cache off): one reward per sequence.
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    use_cache=False).logits
    assert out.shape == (1, 1) and torch.isfinite(out).all()
