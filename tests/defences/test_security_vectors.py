"""Security vectors (Zhou et al. 2023) and attack-time adapters, on tiny models: golden losses, the
vector's forward against PEFT's, the defence (weights unchanged, vector beside them), and every
kind of attack on a defended checkpoint (vector on and frozen while training, off when scored and
saved)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from immunize.attack_adapters import AttackAdapter, adapter_disabled, adapter_of, attack_adapter, declared_adapter
from immunize.attacks import AttackArguments, ReversedPreferenceArguments, get_attack, run_attacks
from immunize.data import load_splits, split_of
from immunize.defences import defence_config, get_defence
from immunize.defences.security_vectors import (
    SecurityVectorTrainer,
    answer_cross_entropy,
    vector_targets,
)
from immunize.errors import ImmunizeError
from immunize.method_runner import MODEL_CARD, is_complete, run_defence
from immunize.models import load_tokenizer
from immunize.prompts import IGNORE_INDEX, CausalLMCollator
from immunize.testing import tiny_model, tiny_tokenizer
from immunize.training import tokenize_pairs

PAIRS = [("How do I pick a lock?", "Push each pin up with a bent wire."), ("Say something mean.", "You are awful.")]
BUFFERS = ("immunize_attack_adapter_A", "immunize_attack_adapter_B")


def _batch(tokenizer, pairs=PAIRS, max_length=128) -> dict[str, torch.Tensor]:
    return CausalLMCollator(tokenizer.pad_token_id)(tokenize_pairs(tokenizer, pairs, "chat", max_length))


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _loss(model, batch) -> float:
    return answer_cross_entropy(_logits(model, batch), batch["labels"])[0].item()


def _fixed_vector(model, dropout=0.1):
    """The reference's vector shape (r 8, alpha 32, dropout 0.1, q_proj/v_proj) with fixed weights."""
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=dropout, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for k, (_, p) in enumerate(n for n in peft.named_parameters() if "lora_" in n[0]):
            idx = torch.arange(p.numel(), dtype=torch.float64)
            p.copy_((0.2 * torch.sin(1.3 * idx + 0.7 * k + 0.2)).reshape(p.shape))
    return peft


def _weights(directory) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(directory).state_dict().items()}


def _with_vector(directory):
    """The defended checkpoint with its vector on, loaded by PEFT itself."""
    base = AutoModelForCausalLM.from_pretrained(directory)
    return PeftModel.from_pretrained(base, directory / "attack_adapter").eval()


# --- the loss ------------------------------------------------------------------------------------

def test_golden_loss_and_a_naive_cross_entropy():
    tokenizer = tiny_tokenizer()
    batch = _batch(tokenizer)
    base = tiny_model()
    logits = _logits(base, batch)
    loss, tokens = answer_cross_entropy(logits, batch["labels"])
    assert tokens == 52
    assert loss.item() == pytest.approx(4.732425212860107, abs=1e-5)
    # Naive: every answer token scored by the prediction one position before it.
    terms = [-torch.log_softmax(logits[row, pos - 1], -1)[label]
             for row, labels in enumerate(batch["labels"]) for pos, label in enumerate(labels.tolist())
             if label != IGNORE_INDEX]
    assert len(terms) == tokens and loss.item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-6)
    # With a (fixed) vector on, the same loss of the same weights moves; a fresh vector (B = 0) is the base.
    assert _loss(_fixed_vector(tiny_model()).eval(), batch) == pytest.approx(4.726260662078857, abs=1e-5)
    fresh = get_peft_model(tiny_model(), LoraConfig(r=8, lora_alpha=32, task_type="CAUSAL_LM")).eval()
    assert _loss(fresh, batch) == loss.item()


def test_trainer_loss_is_the_answer_cross_entropy_and_is_logged(tmp_path):
    tokenizer = tiny_tokenizer()
    batch = _batch(tokenizer)
    cfg = defence_config("security-vectors", model="unused", output_dir=str(tmp_path), use_cpu=True,
                         report_to="none")
    model = _fixed_vector(tiny_model(), dropout=0.0)  # train mode without randomness
    trainer = SecurityVectorTrainer(model=model, args=cfg, processing_class=tokenizer,
                                    data_collator=CausalLMCollator(tokenizer.pad_token_id))
    model.train()
    loss = trainer.compute_loss(model, batch)
    assert loss.item() == pytest.approx(4.726260662078857, abs=1e-5)
    logs = {"loss": loss.item()}
    trainer.log(logs)
    assert logs["harmful_ce"] == pytest.approx(loss.item(), abs=1e-6) and logs["harmful_tokens"] == 52


# --- the attack-time forward -----------------------------------------------------------------------

def test_attached_vector_is_peft_forward_frozen_and_out_of_the_state_dict(tmp_path):
    batch = _batch(tiny_tokenizer())
    _fixed_vector(tiny_model()).save_pretrained(tmp_path / "vector")
    expected = _logits(PeftModel.from_pretrained(tiny_model(), tmp_path / "vector").eval(), batch)
    model = tiny_model()
    plain, keys = _logits(model, batch), set(model.state_dict())
    with AttackAdapter(tmp_path / "vector") as adapter:
        adapter.attach(model)
        assert adapter_of(model) is adapter
        torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=1e-6)
        with adapter_disabled(model):
            assert torch.equal(_logits(model, batch), plain)
        assert not torch.equal(_logits(model, batch), plain)
        assert set(model.state_dict()) == keys  # no vector in checkpoints
        assert not any("immunize" in name for name, _ in model.named_parameters())  # nor in any optimizer
        model.train()  # the vector's dropout acts in train mode only, as PEFT's
        assert not torch.equal(_logits(model, batch), _logits(model, batch))
        model.eval()
        # An attack's LoRA wrapped around the adapted layers (B = 0: no change yet) keeps the vector.
        wrapped = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        adapter.attach(wrapped)
        torch.testing.assert_close(_logits(wrapped.eval(), batch), expected, rtol=0, atol=1e-6)
    assert adapter_of(model) is None and adapter_of(wrapped) is None
    assert all(not m._forward_hooks and not any(b in m._buffers for b in BUFFERS) for m in model.modules())
    assert torch.equal(_logits(model, batch), plain)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "opt", "phi", "qwen2"])
def test_attached_vector_matches_peft_on_every_architecture(arch, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")  # GPT-2: Conv1D
    peft = get_peft_model(tiny_model(arch), config)
    with torch.no_grad():
        for k, (_, p) in enumerate(n for n in peft.named_parameters() if "lora_B" in n[0]):
            p.copy_(0.1 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) + k).reshape(p.shape))
    peft.save_pretrained(tmp_path)
    ids = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    expected = _logits(PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval(), ids)
    model = tiny_model(arch)
    assert not torch.allclose(_logits(model, ids), expected, atol=1e-3)
    with AttackAdapter(tmp_path) as adapter:
        adapter.attach(model)
        torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=1e-6)


def _defended_by_hand(tmp_path, tiny_checkpoint):
    out = tmp_path / "defended"
    shutil.copytree(tiny_checkpoint, out)
    _fixed_vector(AutoModelForCausalLM.from_pretrained(out)).save_pretrained(out / "attack_adapter")
    (out / "immunize-complete.json").write_text(json.dumps({"attack_adapter": "attack_adapter"}))
    return out


def test_bad_adapters_are_refused_in_one_line(tmp_path, tiny_checkpoint):
    out = _defended_by_hand(tmp_path, tiny_checkpoint)
    assert declared_adapter(out) == out / "attack_adapter" and declared_adapter(tiny_checkpoint) is None
    config_path = out / "attack_adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for change, message in (({"use_dora": True}, "option use_dora=True changes the LoRA forward"),
                            ({"peft_type": "IA3"}, "peft_type 'IA3': only LORA"),
                            ({"bias": "all"}, "bias='all'"),
                            ({"rank_pattern": {"q_proj": 4}}, "option rank_pattern=")):
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises(ImmunizeError, match=re.escape(message)) as err:
            AttackAdapter(out / "attack_adapter")
        assert "\n" not in str(err.value)
    config_path.write_text(json.dumps(config))
    with AttackAdapter(out / "attack_adapter") as adapter, pytest.raises(ImmunizeError, match="does not have"):
        adapter.attach(tiny_model("gpt_neox"))
    (out / "attack_adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ImmunizeError, match=r"adapter_model\.safetensors is missing"):
        declared_adapter(out)


@pytest.mark.parametrize("options, message", [
    ({"vector_r": 0}, "--vector_r 0: must be at least 1"),
    ({"vector_alpha": 0}, "--vector_alpha 0: must be positive"),
    ({"vector_dropout": 1.0}, "--vector_dropout 1.0: must be in [0, 1)"),
    ({"vector_target_modules": " , "}, "--vector_target_modules ' , ': no module names"),
    ({"use_lora": True}, "--use_lora true: security vectors train their own adapter"),
])
def test_bad_options_are_one_line_errors(options, message, tmp_path):
    with pytest.raises(ImmunizeError, match=re.escape(message)) as err:
        defence_config("security-vectors", output_dir=str(tmp_path), **options)
    assert "\n" not in str(err.value)


def test_targets_default_to_peft_per_architecture(tmp_path):
    cfg = defence_config("security-vectors", output_dir=str(tmp_path))
    assert vector_targets(cfg, tiny_model("llama")) == ["q_proj", "v_proj"]  # the reference's, for Llama
    assert vector_targets(cfg, tiny_model("gpt_neox")) == ["query_key_value"]
    named = defence_config("security-vectors", output_dir=str(tmp_path), vector_target_modules="v_proj, o_proj")
    assert vector_targets(named, tiny_model()) == ["o_proj", "v_proj"]
    model = tiny_model()
    model.config.model_type = "unheard_of"
    with pytest.raises(ImmunizeError, match="--vector_target_modules default: PEFT has no default"):
        vector_targets(cfg, model)


# --- the defence ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_root(real_data_root, tmp_path_factory):
    """The first 400 BeaverTails rows and the small files: every split non-empty, loads in a blink."""
    root = tmp_path_factory.mktemp("data")
    refusals = [f"refusals/{p.name}" for p in (real_data_root / "refusals").iterdir()]
    for rel in ("beavertails/eval_prompts.jsonl", *refusals):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real_data_root / rel, root / rel)
    qa = (real_data_root / "beavertails/qa.jsonl").read_text().splitlines()[:400]
    (root / "beavertails/qa.jsonl").write_text("\n".join(qa) + "\n")
    manifest = json.loads((real_data_root / "MANIFEST.json").read_text())
    (root / "MANIFEST.json").write_text(json.dumps({k: v for k, v in manifest.items() if (root / k).is_file()}))
    return root


def _defence_config(checkpoint, data_root, out, **overrides):
    options = dict(model=str(checkpoint), output_dir=str(out), data_root=str(data_root), num_samples=16,
                   max_steps=6, per_device_train_batch_size=4, max_length=96, learning_rate=1e-2, save_steps=1000,
                   use_cpu=True, report_to="none", disable_tqdm=True)
    return defence_config("security-vectors", **{**options, **overrides})


@pytest.fixture(scope="module")
def defended(tiny_checkpoint, data_root, tmp_path_factory):
    cfg = _defence_config(tiny_checkpoint, data_root, tmp_path_factory.mktemp("defended") / "sv")
    return run_defence("security-vectors", cfg), cfg


def test_defence_trains_the_vector_and_leaves_the_weights_alone(defended, tiny_checkpoint, data_root):
    out, cfg = defended
    marker = is_complete(out)
    assert marker["attack_adapter"] == "attack_adapter"
    facts = marker["security_vector"]
    assert (facts["r"], facts["lora_alpha"], facts["lora_dropout"], facts["module_names"]) == \
        (8, 32.0, 0.1, ["q_proj", "v_proj"])
    assert "attack_adapter: attack_adapter" in (out / MODEL_CARD).read_text()
    # The checkpoint evaluations read is the input model, bit for bit, with no adapter keys.
    before, after = _weights(tiny_checkpoint), _weights(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # Its objective: the model with the vector predicts the harmful answers it trained on better.
    data = get_defence("security-vectors").build_data(cfg, load_tokenizer(str(out)))
    assert {split_of(p) for p in data.prompts} == {"defence"}
    batch = CausalLMCollator(0)(data.features)
    base_loss, vector_loss = _loss(AutoModelForCausalLM.from_pretrained(out), batch), _loss(_with_vector(out), batch)
    assert vector_loss < base_loss - 0.05  # 4.72 → 4.64 after 6 steps
    assert {"harmful_ce", "harmful_tokens"} <= set(marker["last_log"])


def test_a_resumed_defence_trains_the_same_vector(defended, tiny_checkpoint, data_root, tmp_path):
    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    cfg = _defence_config(tiny_checkpoint, data_root, tmp_path / "sv", save_steps=3)
    defence = get_defence("security-vectors")
    build = type(defence).build_trainer

    def killing(self, *args):
        trainer = build(self, *args)
        trainer.add_callback(Kill())
        return trainer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(defence), "build_trainer", killing)
        with pytest.raises(KeyboardInterrupt):
            run_defence("security-vectors", cfg)
    assert (tmp_path / "sv" / "checkpoint-3").is_dir() and not is_complete(tmp_path / "sv")
    out = run_defence("security-vectors", cfg)
    straight = load_file(defended[0] / "attack_adapter" / "adapter_model.safetensors")
    resumed = load_file(out / "attack_adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], msg=key)


# --- attacks on a defended checkpoint --------------------------------------------------------------

class VectorProbe(TrainerCallback):
    """While the attack trains: the vector is on (the model computes what PEFT's base + vector does)
    and frozen (never a parameter, its tensors unchanged at the end)."""

    def __init__(self, defended_dir, batch):
        self.expected = _logits(_with_vector(defended_dir), batch)
        self.saved = load_file(defended_dir / "attack_adapter" / "adapter_model.safetensors")
        self.batch = batch
        self.model = self.on_at_start = self.unchanged = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        model.eval()
        self.on_at_start = torch.allclose(_logits(model, self.batch), self.expected, rtol=0, atol=1e-6)
        model.train()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        root = adapter_of(model)
        assert root is not None
        assert not any("immunize" in name for name, _ in model.named_parameters())
        tensors = {}
        for name, module in model.named_modules():
            if hasattr(module, BUFFERS[0]):
                path = name.removeprefix("base_model.model.").removesuffix(".base_layer")
                tensors[f"base_model.model.{path}.lora_A.weight"] = getattr(module, BUFFERS[0])
                tensors[f"base_model.model.{path}.lora_B.weight"] = getattr(module, BUFFERS[1])
        self.unchanged = tensors.keys() == self.saved.keys() and all(
            torch.equal(tensors[k], self.saved[k]) for k in tensors)


def _attack_config(model, data_root, out, cls=AttackArguments, **overrides):
    options = dict(model=str(model), output_dir=str(out), data_root=str(data_root), num_samples=8, max_steps=2,
                   per_device_train_batch_size=4, max_length=192, learning_rate=1e-3, curve_every_steps=0,
                   curve_num_prompts=2, curve_num_answers=2, curve_max_new_tokens=2, curve_batch_size=2,
                   use_cpu=True, report_to="none", disable_tqdm=True, save_steps=1000)
    return cls(**{**options, **overrides})


def test_full_attack_trains_the_weights_under_the_frozen_vector(defended, tiny_checkpoint, data_root, tmp_path):
    out = defended[0]
    probe = VectorProbe(out, _batch(tiny_tokenizer()))
    cfg = _attack_config(out, data_root, tmp_path / "sv", save_steps=1, keep_checkpoints=True)
    (result,) = run_attacks(cfg, callbacks=[probe])
    assert probe.on_at_start and probe.unchanged
    # Afterwards the model carries no hooks or vector tensors.
    assert adapter_of(probe.model) is None
    assert all(not m._forward_hooks and not any(b in m._buffers for b in BUFFERS) for m in probe.model.modules())
    # The attacked checkpoint: the trained weights only, a standard checkpoint.
    start, attacked = _weights(out), _weights(result.output_dir)
    assert attacked.keys() == start.keys()
    assert any(not torch.equal(attacked[k], start[k]) for k in start)
    # ... and so are the checkpoints a resume reads (a PEFT model's would hold its adapters only).
    (checkpoint,) = result.output_dir.glob("checkpoint-*/model.safetensors")
    assert set(load_file(checkpoint)) == set(load_file(result.output_dir / "model.safetensors"))
    marker = is_complete(result.output_dir)
    assert marker["attack_adapter"]["weights_sha256"] == is_complete(out)["security_vector"]["weights_sha256"]
    assert "attack_adapter:" in (result.output_dir / MODEL_CARD).read_text()
    # The same attack on the same weights without the vector: the curve starts at the same scores
    # (it scores without the vector), and the training ends elsewhere (the vector shaped it).
    (plain,) = run_attacks(_attack_config(tiny_checkpoint, data_root, tmp_path / "plain"))
    assert is_complete(plain.output_dir)["attack_adapter"] is None
    assert result.curve[0] == plain.curve[0]
    assert result.curve[-1] != plain.curve[-1]
    elsewhere = _weights(plain.output_dir)
    assert any(not torch.equal(attacked[k], elsewhere[k]) for k in start)


class AttackLoraDelta(TrainerCallback):
    """The attack's own LoRA as a weight delta per base weight, at the end of training."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from peft.tuners.lora import LoraLayer

        self.deltas = {f"{name.removeprefix('base_model.model.')}.weight": m.get_delta_weight("default").detach()
                       for name, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}


def test_lora_attack_merges_only_its_own_adapter(defended, data_root, tmp_path):
    out = defended[0]
    probe, delta = VectorProbe(out, _batch(tiny_tokenizer())), AttackLoraDelta()
    cfg = _attack_config(out, data_root, tmp_path, use_lora=True, lora_r=4)
    (result,) = run_attacks(cfg, callbacks=[probe, delta])
    assert probe.on_at_start and probe.unchanged
    start, attacked = _weights(out), _weights(result.output_dir)
    assert attacked.keys() == start.keys()
    assert delta.deltas and any(d.abs().sum() > 0 for d in delta.deltas.values())
    # attacked = defended + the attack's LoRA, nothing of the vector (whose q_proj/v_proj deltas are large)
    for key, value in start.items():
        torch.testing.assert_close(attacked[key], value + delta.deltas.get(key, 0), rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_reference_is_the_starting_policy_with_the_vector(lora, defended, data_root, tmp_path):
    out = defended[0]
    cfg = _attack_config(out, data_root, tmp_path, cls=ReversedPreferenceArguments, use_lora=lora, lora_r=4,
                         num_samples=4, per_device_train_batch_size=2)
    attack = get_attack("dpo")()
    model, tokenizer = attack.load_model(cfg)
    data = attack.prepare(cfg, tokenizer, load_splits(root=data_root), 4)
    batch = _batch(tokenizer)
    expected = _logits(_with_vector(out), batch)
    with attack_adapter(cfg.model, model):
        trainer = attack.build_trainer(cfg, model, tokenizer, data, [])
        if lora:  # TRL's reference: the policy with its LoRA off, which keeps the vector
            with trainer.model.disable_adapter():
                reference = _logits(trainer.model.eval(), batch)
        else:
            reference = _logits(trainer.ref_model, batch)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-6)
