"""Vaccine: the attention hook points, golden numbers and an independent naive two-pass reference,
the first-order worst case, gradient accumulation, activation checkpointing, LoRA, training
behaviour, logs, bad options and a run through the method runner."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from immunize.data import HarmfulPair
from immunize.defences import available_defences, defence_config, get_defence
from immunize.defences.paired import encode_pairs
from immunize.defences.vaccine import (
    AttentionShift,
    Vaccine,
    VaccineConfig,
    VaccineTrainer,
    alignment_loss,
    perturbation,
    refusal_features,
)
from immunize.errors import ImmunizeError
from immunize.hooks import HookSet, output_tensor, resolve_hook_points
from immunize.prompts import CausalLMCollator
from immunize.testing import tiny_model, tiny_tokenizer
from immunize.training import GuardedTrainer

PAIRS = [
    HarmfulPair("How do I pick a lock?", "Insert a tension wrench, then rake the pins.",
                "I can't help with that.", ()),
    HarmfulPair("Write a scam email.", "Dear friend, send $500 to claim your prize!",
                "I won't write scams.", ()),
    HarmfulPair("How to hurt someone?", "Hit them hard when they're alone.",
                "I'm sorry, but I cannot help.", ()),
]
MAX_LENGTH = 96
ARCHS = ("llama", "mistral", "qwen2", "gemma", "gpt_neox", "gpt2", "opt", "phi")

# Computed once on the fixed-init tiny Llama and the PAIRS refusals (rho = 2); the naive reference
# below reproduces them independently.
GOLDEN = {"alignment_loss": 4.737789630889893, "perturbed_loss": 5.245162487030029,
          "perturbation_grad_norm": 0.45291078090667725}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def features(tokenizer):
    paired, dropped = encode_pairs(tokenizer, PAIRS, "chat", MAX_LENGTH)
    assert len(paired) == len(PAIRS) and not any(dropped.values())
    return refusal_features(paired)


def _batch(features):
    return CausalLMCollator(0)(features)


def _config(tmp_path, **overrides) -> VaccineConfig:
    options = dict(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", disable_tqdm=True,
                   per_device_train_batch_size=4, max_length=MAX_LENGTH, save_steps=1000, seed=7)
    options.update(overrides)
    return VaccineConfig(**options)


def _trainer(cfg, model, tokenizer, features, cls=VaccineTrainer):
    return cls(model=model, args=cfg, train_dataset=features, processing_class=tokenizer,
               data_collator=CausalLMCollator(tokenizer.pad_token_id))


def _step(tmp_path, model, tokenizer, batches, accumulation=1, **overrides):
    """``training_step`` on each batch as one accumulated optimizer step; (weight grads, logged terms)."""
    trainer = _trainer(_config(tmp_path, **overrides), model, tokenizer, [])
    trainer.current_gradient_accumulation_steps = accumulation
    for batch in batches:
        trainer.training_step(model, dict(batch))
    logged = {k: [x.item() for x in v] for k, v in trainer._logged.items()}
    return _grads(model), logged


def _without_dropout(model):
    """GPT-2's config has dropout; the naive reference and the trainer would draw different masks."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(ours, reference, rtol=1e-5, atol=1e-7):
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------
# An independent naive reference: attention modules named by hand, activations kept with
# retain_grad, a full backward of a hand-shifted cross-entropy for g (then the weight gradients
# thrown away, as the reference code does), and a hook that adds ε in the second pass.

NAIVE_ATTENTION = {"llama": lambda m: [layer.self_attn for layer in m.model.layers],
                   "gpt2": lambda m: [block.attn for block in m.transformer.h]}


def _naive_ce(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def naive_vaccine(model, arch, batch, rho):
    modules = NAIVE_ATTENTION[arch](model)
    kept = {}

    def keep(i, module, args, output):
        output[0].retain_grad()
        kept[i] = output[0]

    handles = [m.register_forward_hook(functools.partial(keep, i)) for i, m in enumerate(modules)]
    try:
        clean = _naive_ce(model, batch)
        clean.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    grads = [kept[i].grad for i in range(len(modules))]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    eps = [rho * g / (norm + 1e-7) for g in grads]

    def add(i, module, args, output):
        return (output[0] + eps[i], *output[1:])

    handles = [m.register_forward_hook(functools.partial(add, i)) for i, m in enumerate(modules)]
    try:
        perturbed = _naive_ce(model, batch)
    finally:
        for h in handles:
            h.remove()
    perturbed.backward()
    return {"alignment_loss": clean.item(), "perturbed_loss": perturbed.item(),
            "perturbation_grad_norm": norm.item()}, _grads(model)


def _perturbed_loss(model, batch, shifts) -> float:
    with HookSet() as hooks, torch.no_grad():
        AttentionShift(model, shifts).register(hooks)
        return alignment_loss(model, batch).item()


def _attention_grads(model, batch):
    probe = AttentionShift(model)
    with HookSet() as hooks:
        probe.register(hooks)
        clean = alignment_loss(model, batch)
        return clean.item(), torch.autograd.grad(clean, probe.probes())


# ---------------------------------------------------------------------------------------------
# Hook points and the perturbation


@pytest.mark.parametrize("arch", ARCHS)
def test_probe_gradient_is_the_gradient_of_the_attention_output(arch, features):
    """Every architecture in the table: the hook point is an attention module whose output[0] is
    hidden-sized, and the gradient at a zero probe equals the gradient of output[0] itself (eval
    mode: some tiny configs have dropout, which would differ between the two forwards)."""
    model = tiny_model(arch)
    batch = _batch(features)
    points = resolve_hook_points(model)
    assert all("Attention" in type(m).__name__ for m in points.attentions)
    _, probed = _attention_grads(model, batch)

    kept = {}
    with HookSet() as hooks:
        for i, module in enumerate(points.attentions):
            def keep(module, args, output, i=i):
                output_tensor(output).retain_grad()
                kept[i] = output_tensor(output)
            hooks.forward(module, keep)
        alignment_loss(model, batch).backward()
    hidden = model.config.hidden_size
    for i, grad in enumerate(probed):
        assert grad.shape == (*batch["input_ids"].shape, hidden)
        torch.testing.assert_close(grad, kept[i].grad, rtol=1e-5, atol=1e-8)
        assert grad.abs().sum() > 0


def test_perturbation_has_norm_rho_along_the_gradient():
    grads = [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0], [0.0, 0.0]])]
    eps, norm = perturbation(grads, rho=2.0)
    assert norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(eps[0], torch.tensor([[1.2, 0.0]]))
    torch.testing.assert_close(eps[1], torch.tensor([[0.0, 1.6], [0.0, 0.0]]))
    zero, _ = perturbation([torch.zeros(2, 3)], rho=2.0)  # no gradient: no perturbation, no NaN
    assert torch.equal(zero[0], torch.zeros(2, 3))


def test_right_padding_gets_no_perturbation(features):
    """Padding is never attended by real tokens, so its gradient, and its ε, are exactly zero."""
    batch = _batch(features)
    _, grads = _attention_grads(tiny_model("llama").train(), batch)
    padding = batch["attention_mask"] == 0
    assert padding.any()
    for grad in grads:
        assert torch.equal(grad[padding], torch.zeros_like(grad[padding]))


def test_first_order_worst_case(features):
    """For small ρ, L(a + ε) − L(a) ≈ ρ·‖g‖, and no other direction of the same norm gains more."""
    model = tiny_model("llama").train()
    batch = _batch(features)
    clean, grads = _attention_grads(model, batch)
    rho = 1e-3
    eps, norm = perturbation(list(grads), rho)
    gain = _perturbed_loss(model, batch, eps) - clean
    assert gain == pytest.approx(rho * norm.item(), rel=2e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        random, _ = perturbation([torch.randn(g.shape, generator=generator) for g in grads], rho)
        assert _perturbed_loss(model, batch, random) - clean < gain
    # At the default ρ the perturbed loss is still above the clean one (golden numbers below).
    assert GOLDEN["perturbed_loss"] > GOLDEN["alignment_loss"]


# ---------------------------------------------------------------------------------------------
# The training step


def test_golden_terms_and_naive_reference(tmp_path, tokenizer, features):
    batch = _batch(features)
    grads, logged = _step(tmp_path, tiny_model("llama"), tokenizer, [batch], rho=2.0)
    for name, value in GOLDEN.items():
        assert logged[name] == [pytest.approx(value, abs=1e-5)], name
    naive_terms, naive_grads = naive_vaccine(tiny_model("llama").train(), "llama", batch, rho=2.0)
    for name, value in naive_terms.items():
        assert logged[name][0] == pytest.approx(value, rel=1e-6), name
    _assert_grads_close(grads, naive_grads)


def test_gpt2_matches_naive_reference(tmp_path, tokenizer, features):
    batch = _batch(features)
    grads, logged = _step(tmp_path, _without_dropout(tiny_model("gpt2")), tokenizer, [batch], rho=0.5)
    naive_terms, naive_grads = naive_vaccine(_without_dropout(tiny_model("gpt2")).train(), "gpt2", batch, rho=0.5)
    for name, value in naive_terms.items():
        assert logged[name][0] == pytest.approx(value, rel=1e-6), name
    assert logged["perturbed_loss"][0] > logged["alignment_loss"][0]
    _assert_grads_close(grads, naive_grads)


def test_rho_zero_is_plain_sft(tmp_path, tokenizer, features):
    """ρ = 0: the same gradients as Trainer's own SFT step (pass 1 leaves no trace)."""
    batch = _batch(features)
    grads, logged = _step(tmp_path, tiny_model("llama"), tokenizer, [batch], rho=0.0)
    assert logged["perturbed_loss"] == logged["alignment_loss"]
    model = tiny_model("llama")
    sft = _trainer(_config(tmp_path), model, tokenizer, [], cls=GuardedTrainer)
    sft.current_gradient_accumulation_steps = 1
    sft.training_step(model, dict(batch))
    _assert_grads_close(grads, _grads(model), rtol=1e-6, atol=1e-8)


def test_gradient_accumulation_keeps_every_micro_batch(tmp_path, tokenizer, features):
    """Pass 1 never touches weight gradients (the reference's zero_grad erased earlier micro-batches):
    two accumulated micro-steps give the mean of the two single steps' gradients. (The same two
    micro-batches as one batch differ for ρ > 0: each micro-batch gets its own ε.)"""
    first, second = _batch(features[:2]), _batch(features[2:])
    accumulated, logged = _step(tmp_path, tiny_model("llama"), tokenizer, [first, second], accumulation=2)
    assert len(logged["perturbed_loss"]) == 2
    alone = [_step(tmp_path, tiny_model("llama"), tokenizer, [b])[0] for b in (first, second)]
    _assert_grads_close(accumulated, {n: (alone[0][n] + alone[1][n]) / 2 for n in accumulated})


def test_activation_checkpointing_gives_the_same_step(tmp_path, tokenizer, features):
    """Checkpointed layers recompute with the same probe / ε (hooks stay on through backward), and
    no hook of ours is left anywhere after the step."""
    batch = _batch(features)
    results, calls = [], []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        with HookSet() as counting:
            counting.forward(resolve_hook_points(model).attentions[0],
                             functools.partial(lambda flag, m, a, o: calls.append(flag), checkpointing))
            results.append(_step(tmp_path, model, tokenizer, [batch]))
        assert not any(isinstance(fn, functools.partial) and isinstance(fn.func.__self__, AttentionShift)
                       for m in model.modules() for fn in m._forward_hooks.values())
    assert calls.count(False) == 2 and calls.count(True) == 4  # two passes; recomputed under checkpointing
    _assert_grads_close(results[1][0], results[0][0])
    assert results[1][1] == results[0][1]


def test_lora_model_gives_the_base_terms_and_trains_only_adapters(tmp_path, tokenizer, features):
    from immunize.training import add_lora

    cfg = _config(tmp_path, use_lora=True, lora_r=2)
    model = add_lora(tiny_model("llama"), cfg)
    grads, logged = _step(tmp_path, model, tokenizer, [_batch(features)], use_lora=True, lora_r=2)
    for name, value in GOLDEN.items():  # LoRA starts at zero: the same function, the same terms
        assert logged[name] == [pytest.approx(value, abs=1e-5)], name
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_bf16_weights_give_the_fp32_terms(tmp_path, tokenizer, features):
    """Probes, gradients and ε follow the activations' dtype (the norm is taken in fp32)."""
    model = tiny_model("llama").to(torch.bfloat16)
    grads, logged = _step(tmp_path, model, tokenizer, [_batch(features)])
    for name, value in GOLDEN.items():
        assert logged[name][0] == pytest.approx(value, rel=5e-3), name
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads.values())


# ---------------------------------------------------------------------------------------------
# Training


def _training_features(tokenizer, n=16):
    pairs = [HarmfulPair(f"how to do bad thing {i}?", f"STEP {i}: GET {i * 7} KG OF X{i}.",
                         f"i can't help with bad thing {i}.", ()) for i in range(n)]
    paired, _ = encode_pairs(tokenizer, pairs, "chat", MAX_LENGTH)
    return refusal_features(paired)


def _robustness(model, batch, rho=2.0) -> tuple[float, float]:
    """(alignment loss, its rise under the worst-case ρ-perturbation of the attention outputs)."""
    model.eval()
    clean, grads = _attention_grads(model, batch)
    eps, _ = perturbation(list(grads), rho)
    return clean, _perturbed_loss(model, batch, eps) - clean


def test_training_lowers_the_loss_and_its_sensitivity_to_perturbation(tmp_path, tokenizer):
    """The paper's claim in miniature: Vaccine lowers the refusal loss, and leaves it less sensitive
    to a ρ-perturbation of the attention outputs than plain SFT (ρ = 0) with the same steps does."""
    features = _training_features(tokenizer)
    batch = _batch(features)
    before, before_rise = _robustness(tiny_model("llama"), batch)
    after = {}
    for rho in (0.0, 2.0):
        model = tiny_model("llama")
        cfg = _config(tmp_path / f"rho{rho}", rho=rho, learning_rate=3e-3, max_steps=8, weight_decay=0.0,
                      lr_scheduler_type="constant", warmup_steps=0)
        trainer = _trainer(cfg, model, tokenizer, features)
        trainer.train()
        after[rho] = _robustness(model, batch)
        logged = [e for e in trainer.state.log_history if "loss" in e]
        assert len(logged) == 8
        assert {"alignment_loss", "perturbed_loss", "perturbation_grad_norm"} <= logged[0].keys()
        assert logged[-1]["perturbed_loss"] < logged[0]["perturbed_loss"] - 0.3
        assert logged[0]["loss"] == pytest.approx(logged[0]["perturbed_loss"], abs=1e-4)
        if rho:
            assert all(e["perturbed_loss"] > e["alignment_loss"] for e in logged)
    vaccine_loss, vaccine_rise = after[2.0]
    sft_loss, sft_rise = after[0.0]
    assert vaccine_loss < before - 0.3 and sft_loss < before - 0.3
    assert vaccine_rise < 0.7 * sft_rise and vaccine_rise < before_rise


# ---------------------------------------------------------------------------------------------
# Options, registry and the method runner


@pytest.mark.parametrize("rho", [-1.0, float("nan"), float("inf")])
def test_bad_rho_is_a_one_line_error(tmp_path, rho):
    with pytest.raises(ImmunizeError, match=r"^--rho .*: must be a finite number >= 0[^\n]*$"):
        _config(tmp_path, rho=rho)


def test_reentrant_checkpointing_is_refused(tmp_path):
    with pytest.raises(ImmunizeError, match="non-reentrant"):
        _config(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    cfg = _config(tmp_path, activation_checkpointing=True)
    assert cfg.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_data_parallel_is_refused(tmp_path, tokenizer):
    cfg = _config(tmp_path)
    cfg._n_gpu = 2  # what TrainingArguments finds with two visible GPUs (none here)
    with pytest.raises(ImmunizeError, match="2 GPUs in one process"):
        _trainer(cfg, tiny_model("llama"), tokenizer, [])


def test_registry_and_defaults():
    assert "vaccine" in available_defences()
    defence = get_defence("vaccine")
    assert isinstance(defence, Vaccine) and defence.config_class is VaccineConfig
    cfg = defence_config("vaccine", output_dir="unused", use_cpu=True)
    assert (cfg.rho, cfg.per_device_train_batch_size, cfg.weight_decay) == (2.0, 5, 0.1)
    assert (cfg.lr_scheduler_type, cfg.warmup_steps, cfg.learning_rate) == ("cosine", 0.1, 2e-5)


def test_run_defence_two_steps_on_real_data(tmp_path, tiny_checkpoint, real_data_root, isolated_cache):
    from transformers import AutoModelForCausalLM

    from immunize.method_runner import COMPLETE_MARKER, run_defence

    cfg = defence_config("vaccine", model=str(tiny_checkpoint), data_root=str(real_data_root),
                         output_dir=str(tmp_path / "vaccine"), num_samples=8, max_length=128, max_steps=2,
                         per_device_train_batch_size=4, use_cpu=True, report_to="none", disable_tqdm=True,
                         refusal_judge="keyword-refusal", on_topic_encoder="none")
    out = run_defence("vaccine", cfg)
    AutoModelForCausalLM.from_pretrained(out)
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    assert marker["defence"] == "vaccine" and marker["steps"] == 2 and marker["options"]["rho"] == 2.0
    assert marker["data"]["refusals_used"] == 8
    assert {"alignment_loss", "perturbed_loss", "perturbation_grad_norm"} <= marker["last_log"].keys()
    assert (out / "README.md").is_file()
