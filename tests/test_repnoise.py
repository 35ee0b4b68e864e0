"""RepNoise: masks, loss terms (golden numbers and an independent naive reference), options,
training behaviour, PEFT, resume, NaN guard, hook hygiene and the `immunize defend` CLI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from immunize.data import HarmfulPair
from immunize.defences import DEFENCES, available_defences, defence_config, get_defence
from immunize.defences.losses import head_cross_entropy, mmd_rbf, mmd_rbf_checkpointed
from immunize.defences.paired import PairedCollator, build_defence_pairs, encode_pairs, first_divergence
from immunize.defences.repnoise import (
    EMBEDDINGS,
    ExampleNoise,
    RepNoiseConfig,
    RepNoiseOptions,
    RepNoiseTrainer,
    _Readout,
    draw_lens,
    example_seed,
    repnoise_loss,
    select_layers,
)
from immunize.errors import ImmunizeError
from immunize.hooks import resolve_hook_points
from immunize.prompts import IGNORE_INDEX
from immunize.testing import tiny_model, tiny_tokenizer

PAIRS = [
    HarmfulPair("How do I pick a lock?", "Insert a tension wrench, then rake the pins.",
                "I can't help with that.", ()),
    HarmfulPair("Write a scam email.", "Dear friend, send $500 to claim your prize!",
                "I won't write scams.", ()),
    HarmfulPair("How to hurt someone?", "Hit them hard when they're alone.",
                "I'm sorry, but I cannot help.", ()),
]
MAX_LENGTH = 96


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads waiting
    for each other make every small op up to 30x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def features(tokenizer):
    feats, dropped = encode_pairs(tokenizer, PAIRS, "chat", MAX_LENGTH)
    assert len(feats) == len(PAIRS) and not any(dropped.values())
    return feats


def _batch(features, pad=0, all_tokens=False):
    return PairedCollator(pad, all_tokens=all_tokens)(features)


def _generator(seed=1234):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# An independent naive reference: masks by Python loops over the raw features, the model's own
# hidden states and full-vocabulary logits for every layer and position, and the original code's
# expand-based MMD. It shares only the noise-sampling convention: one generator per harmful row,
# seeded by ``example_seed`` from the row's tokens, drawing (tokens in M, d) per chosen layer in
# layer order.

NAIVE_MODULES = {  # (decoder layers, MLP attribute, final norm) written out by hand, not from the table
    "llama": (lambda m: m.model.layers, "mlp", lambda m: m.model.norm),
    "gpt2": (lambda m: m.transformer.h, "mlp", lambda m: m.transformer.ln_f),
    "gpt_neox": (lambda m: m.gpt_neox.layers, "mlp", lambda m: m.gpt_neox.final_layer_norm),
}


def naive_mmd(x, y, kernels=5, mul=2.0, bandwidth="mean"):
    total = torch.cat([x, y])
    n = total.shape[0]
    l2 = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    off = l2.detach()[~torch.eye(n, dtype=torch.bool)]
    bw = (off.sum() / (n * n - n) if bandwidth == "mean" else off.median()) / mul ** (kernels // 2)
    k = sum(torch.exp(-l2 / (bw * mul**i)) for i in range(kernels))
    b = x.shape[0]
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()


def naive_terms(model, arch, features, opts: RepNoiseOptions, seed=1234):
    get_layers, mlp_name, get_norm = NAIVE_MODULES[arch]
    n_layers = len(get_layers(model))
    b = len(features)
    seqs = [f["harmful_input_ids"] for f in features] + [f["refusal_input_ids"] for f in features]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(2 * b, width, dtype=torch.long)
    att = torch.zeros(2 * b, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
    mask = torch.zeros(b, width, dtype=torch.bool)
    for i, f in enumerate(features):
        h, r = f["harmful_input_ids"], f["refusal_input_ids"]
        start = 0
        while start < min(len(h), len(r)) and h[start] == r[start]:
            start += 1
        for t in range(len(h)):
            if "mask" in opts.ablate or (t >= start and f["harmful_labels"][t] != -100):
                mask[i, t] = True
    hlabels = torch.where(mask, ids[:b], torch.full_like(ids[:b], -100))
    rlabels = torch.full((b, width), -100, dtype=torch.long)
    for i, f in enumerate(features):
        rlabels[i, : len(f["refusal_labels"])] = torch.tensor(f["refusal_labels"])

    mlp_out = {}
    handles = [getattr(layer, mlp_name).register_forward_hook(lambda m, a, o, i=i: mlp_out.__setitem__(i, o))
               for i, layer in enumerate(get_layers(model))]
    try:
        out = model(input_ids=ids, attention_mask=att, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    head, norm = model.get_output_embeddings(), get_norm(model)

    def ce(logits, labels):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)

    def full_logits(index):  # index -1: embeddings; the last layer's read-out is the model's output
        if index == n_layers - 1:
            return out.logits[:b]
        return head(norm(out.hidden_states[index + 1][:b]))

    terms = {}
    if "stability" not in opts.ablate:
        terms["stability"] = ce(out.logits[b:], rlabels)
    layers = select_layers(opts.layers, n_layers)
    if "ascent" not in opts.ablate:
        chosen = [n_layers - 1] if "lens" in opts.ablate else ([-1] if opts.lens_embeddings else []) + layers
        terms["ascent"] = torch.stack([ce(full_logits(i), hlabels) for i in chosen]).mean()
    if "noise" not in opts.ablate:
        gens = [torch.Generator().manual_seed(example_seed(seed, 0, list(f["harmful_input_ids"]))) for f in features]
        values = []
        for i in layers:
            acts = mlp_out[i][:b] if opts.activations == "mlp" else (
                out.hidden_states[i + 1][:b] if i < n_layers - 1 else None)
            if acts is None:  # the last layer's residual output is pre-norm: undo nothing, recompute it
                acts = _last_residual(model, arch, ids, att)[:b]
            noise = torch.zeros(acts.shape)
            for row, gen in enumerate(gens):
                positions = [t for t in range(width) if mask[row, t]]
                noise[row, positions] = torch.randn(len(positions), acts.shape[-1], generator=gen)
            if opts.mmd_level == "sequence":
                m = mask[..., None].float()
                values.append(naive_mmd((acts * m).reshape(b, -1), (noise * m).reshape(b, -1),
                                        opts.mmd_kernels, opts.mmd_multiplier, opts.mmd_bandwidth))
            else:
                values.append(naive_mmd(acts[mask], noise[mask], opts.mmd_kernels, opts.mmd_multiplier,
                                        opts.mmd_bandwidth))
        terms["noise"] = torch.stack(values).mean()
    loss = terms.get("stability", 0.0) + opts.beta * terms.get("noise", 0.0)
    if "ascent" in terms:
        loss = loss - opts.alpha * torch.log1p(terms["ascent"])
    return loss, terms


def _last_residual(model, arch, ids, att):
    get_layers = NAIVE_MODULES[arch][0]
    kept = {}
    handle = get_layers(model)[-1].register_forward_hook(lambda m, a, o: kept.__setitem__("h", o))
    try:
        model(input_ids=ids, attention_mask=att, use_cache=False)
    finally:
        handle.remove()
    return kept["h"]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_with_naive(arch, features, opts):
    model = tiny_model(arch)
    loss, terms, _ = repnoise_loss(model, _batch(features), opts, seed=1234)
    loss.backward()
    ours = _grads(model)
    model.zero_grad(set_to_none=True)
    naive_loss, naive = naive_terms(model, arch, features, opts)
    naive_loss.backward()
    reference = _grads(model)
    for name in ("stability", "noise", "ascent"):
        value = getattr(terms, name)
        assert (value is None) == (name not in naive), name
        if value is not None:
            torch.testing.assert_close(value, naive[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=1e-6)
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    return terms


# ---------------------------------------------------------------------------------------------
# Masks and batches


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([5], [6]) == 0


def test_mask_covers_answer_tokens_from_the_first_divergence(features):
    batch = _batch(features)
    b, width = batch["harmful_mask"].shape
    assert batch["input_ids"].shape == (2 * b, width)
    for i, f in enumerate(features):
        n = len(f["harmful_input_ids"])
        row = batch["harmful_mask"][i]
        first_answer = f["harmful_labels"].index(next(x for x in f["harmful_labels"] if x != IGNORE_INDEX))
        start = max(first_answer, f["divergence"])
        assert row[:start].sum() == 0 and row[start:n].all() and not row[n:].any()  # never padding
        assert f["harmful_input_ids"][f["divergence"]] != f["refusal_input_ids"][f["divergence"]]
        targets = batch["harmful_targets"][i]
        assert (targets[row] == batch["input_ids"][i][row]).all() and (targets[~row] == IGNORE_INDEX).all()
        refusal = batch["refusal_labels"][i]
        assert (refusal[: len(f["refusal_labels"])] == torch.tensor(f["refusal_labels"])).all()
        assert (refusal[len(f["refusal_labels"]):] == IGNORE_INDEX).all()


def test_no_mask_ablation_marks_every_real_token(features):
    batch = _batch(features, all_tokens=True)
    lengths = torch.tensor([len(f["harmful_input_ids"]) for f in features])
    assert (batch["harmful_mask"].sum(1) == lengths).all()


def test_no_token_id_is_special(features, tokenizer):
    """Padding with a real token id, or a real answer token with id 0, changes nothing."""
    opts = RepNoiseOptions()
    model = tiny_model("llama")
    reference, ref_terms, _ = repnoise_loss(model, _batch(features, pad=0), opts, seed=1234)
    pad_a = tokenizer.convert_tokens_to_ids("a")
    loss, terms, _ = repnoise_loss(model, _batch(features, pad=pad_a), opts, seed=1234)
    torch.testing.assert_close(loss, reference)
    assert terms.harmful_tokens == ref_terms.harmful_tokens
    # An answer containing id 0 (the tokenizer's <pad>) is scored like any other token.
    f = dict(features[0])
    f["harmful_input_ids"] = [*f["harmful_input_ids"][:-1], 0]
    f["harmful_labels"] = [*f["harmful_labels"][:-1], 0]
    batch = _batch([f])
    assert batch["harmful_targets"][0, len(f["harmful_input_ids"]) - 1] == 0
    _, terms, _ = repnoise_loss(model, batch, opts, seed=1234)
    assert terms.harmful_tokens == int(batch["harmful_mask"][0, 1:].sum())


# ---------------------------------------------------------------------------------------------
# Loss pieces


def test_mmd_matches_naive_and_checkpointing():
    gen = _generator(0)
    x = torch.randn(6, 40, generator=gen, requires_grad=True)
    y = torch.randn(6, 40, generator=gen) * 0.5 + 0.3
    for bandwidth in ("mean", "median"):
        value = mmd_rbf(x, y, bandwidth=bandwidth)
        torch.testing.assert_close(value, naive_mmd(x, y, bandwidth=bandwidth))
        (grad,) = torch.autograd.grad(value, x)
        (naive_grad,) = torch.autograd.grad(naive_mmd(x, y, bandwidth=bandwidth), x)
        torch.testing.assert_close(grad, naive_grad)
        checkpointed = mmd_rbf_checkpointed(x, y, bandwidth=bandwidth)
        (ck_grad,) = torch.autograd.grad(checkpointed, x)
        torch.testing.assert_close(checkpointed, value)
        torch.testing.assert_close(ck_grad, grad)
    assert mmd_rbf(y, y.clone()).abs() < 1e-6 < mmd_rbf(x, y)


class _WrappedHead(torch.nn.Module):
    """A head that is not a plain nn.Linear (like a LoRA-wrapped one): takes the checkpointed path."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_head_cross_entropy_matches_full_logits(chunk, wrapped, weighted):
    gen = _generator(1)
    head = torch.nn.Linear(8, 37)
    with torch.no_grad():
        head.weight.copy_(torch.randn(37, 8, generator=gen))
        head.bias.copy_(torch.randn(37, generator=gen))
    x = torch.randn(11, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 37, (11,), generator=gen)
    weights = torch.rand(11, generator=gen) * 3 if weighted else None
    module = _WrappedHead(head) if wrapped else head
    total, per_row = head_cross_entropy(x, module, targets, chunk, weights)
    grads = torch.autograd.grad(3.0 * total, [x, head.weight, head.bias])
    reference = F.cross_entropy(head(x), targets, reduction="none")
    scaled = reference * weights if weighted else reference
    ref_grads = torch.autograd.grad(3.0 * scaled.sum(), [x, head.weight, head.bias])
    torch.testing.assert_close(total, scaled.sum())
    torch.testing.assert_close(per_row, reference.detach())  # unweighted, for the logs
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# The loss on fixed-init models

# Computed once with this implementation (and equal to the naive reference below) on
# tiny_model("llama"), the PAIRS above, chat format, noise seed 1234 at step 0 (noise drawn per example).
GOLDEN_LLAMA = {"stability": 4.737790, "noise": 3.645618, "ascent": 4.798554, "loss": 2.983827}
GOLDEN_LLAMA_ASCENT_PER_LAYER = [4.844844, 4.802679, 4.748141]  # embeddings, layer 0, layer 1


def test_golden_loss_terms(features):
    loss, terms, _ = repnoise_loss(tiny_model("llama"), _batch(features), RepNoiseOptions(), seed=1234)
    got = {"stability": terms.stability.item(), "noise": terms.noise.item(), "ascent": terms.ascent.item(),
           "loss": loss.item()}
    for name, value in GOLDEN_LLAMA.items():
        assert got[name] == pytest.approx(value, abs=2e-4), name
    assert terms.ascent_per_layer == pytest.approx(GOLDEN_LLAMA_ASCENT_PER_LAYER, abs=2e-4)
    assert len(terms.noise_per_layer) == 2
    assert terms.harmful_ce == pytest.approx(terms.ascent_per_layer[-1])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_matches_naive_reference(arch, features):
    _compare_with_naive(arch, features, RepNoiseOptions())


OPTION_VARIANTS = {
    "residual": RepNoiseOptions(activations="residual"),
    "layers": RepNoiseOptions(layers="1"),
    "no_lens_embeddings": RepNoiseOptions(lens_embeddings=False),
    "token_mmd": RepNoiseOptions(mmd_level="token"),
    "median_bandwidth": RepNoiseOptions(mmd_bandwidth="median", mmd_kernels=3, mmd_multiplier=3.0),
    "weights": RepNoiseOptions(alpha=0.5, beta=0.3),
    "no_ascent": RepNoiseOptions(ablate=frozenset({"ascent"})),
    "no_noise": RepNoiseOptions(ablate=frozenset({"noise"})),
    "no_stability": RepNoiseOptions(ablate=frozenset({"stability"})),
    "no_lens": RepNoiseOptions(ablate=frozenset({"lens"})),
}


@pytest.mark.parametrize("variant", sorted(OPTION_VARIANTS))
def test_options_match_naive_reference(variant, features):
    terms = _compare_with_naive("llama", features, OPTION_VARIANTS[variant])
    if variant == "no_lens":
        assert len(terms.ascent_per_layer) == 1
    if variant == "layers":
        assert len(terms.noise_per_layer) == 1 and len(terms.ascent_per_layer) == 2


def test_no_mask_ablation_matches_naive_reference(features):
    opts = RepNoiseOptions(ablate=frozenset({"mask"}))
    model = tiny_model("llama")
    loss, terms, _ = repnoise_loss(model, _batch(features, all_tokens=True), opts, seed=1234)
    naive_loss, _ = naive_terms(model, "llama", features, opts)
    torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=1e-6)
    default = repnoise_loss(model, _batch(features), RepNoiseOptions(), seed=1234)[1]
    assert terms.harmful_tokens > default.harmful_tokens


def test_first_diverging_token_gets_gradient():
    """Answers differ only in their first token: the ascent must train exactly that token.

    The original code masked logits with mask[:-1] and labels with mask[1:]: the logit that
    predicts the first diverging token was zeroed, so it got no gradient (shown below)."""
    prompt = [2, 30, 31, 32]
    feature = {"harmful_input_ids": [*prompt, 40], "harmful_labels": [-100] * 4 + [40],
               "refusal_input_ids": [*prompt, 41], "refusal_labels": [-100] * 4 + [41], "divergence": 4}
    model = tiny_model("llama")
    opts = RepNoiseOptions(ablate=frozenset({"stability", "noise", "lens"}))
    loss, terms, _ = repnoise_loss(model, _batch([feature]), opts, seed=1234)
    assert terms.harmful_tokens == 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([feature["harmful_input_ids"]])).logits
    assert terms.ascent.item() == pytest.approx(-torch.log_softmax(logits[0, 3], -1)[40].item(), rel=1e-5)
    loss.backward()
    assert model.lm_head.weight.grad[40].abs().sum() > 0

    model.zero_grad(set_to_none=True)
    ids = torch.tensor([feature["harmful_input_ids"]])
    mask = torch.tensor([[0, 0, 0, 0, 1]], dtype=torch.float)
    shift_logits = model(input_ids=ids).logits[:, :-1] * mask[:, :-1, None]
    shift_labels = (ids[:, 1:] * mask[:, 1:]).long()
    shift_labels[shift_labels == 0] = -100
    F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1)).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())


def test_activation_checkpointing_gives_the_same_loss_and_gradients(features):
    batch = _batch(features)
    results = []
    for checkpointing in (False, True):
        model = tiny_model("llama").train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        loss, _, _ = repnoise_loss(model, batch, RepNoiseOptions(mmd_level="token"), seed=1234)
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_peft_wrapped_model_gives_the_base_loss(features):
    from peft import LoraConfig, get_peft_model

    batch = _batch(features)
    reference, _, _ = repnoise_loss(tiny_model("llama"), batch, RepNoiseOptions(), seed=1234)
    wrapped = get_peft_model(tiny_model("llama"), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    loss, _, _ = repnoise_loss(wrapped, batch, RepNoiseOptions(), seed=1234)
    torch.testing.assert_close(loss, reference)  # LoRA starts at zero: same function, same loss
    loss.backward()
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    lora_b = [p for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


# ---------------------------------------------------------------------------------------------
# Training


def _training_pairs(n=16):
    # Upper-case harmful answers, lower-case refusals: on a random character-level model the two
    # share fewer statistics, so the terms' opposite pulls are visible in a few steps.
    return [HarmfulPair(f"how to do bad thing {i}?", f"STEP {i}: GET {i * 7} KG OF X{i}, MIX AT {i + 3}00 K.",
                        f"i can't help with bad thing {i}.", ()) for i in range(n)]


def _config(tmp_path, **overrides) -> RepNoiseConfig:
    options = dict(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", disable_tqdm=True,
                   per_device_train_batch_size=4, max_length=MAX_LENGTH, save_steps=1000, seed=7)
    options.update(overrides)
    return RepNoiseConfig(**options)


def _trainer(cfg, model, tokenizer, pairs=None, callbacks=None):
    feats, _ = encode_pairs(tokenizer, pairs or _training_pairs(), "chat", cfg.max_length)
    return RepNoiseTrainer(model=model, args=cfg, train_dataset=feats, processing_class=tokenizer,
                           data_collator=PairedCollator(tokenizer.pad_token_id), callbacks=callbacks)


def _answer_losses(model, tokenizer, pairs) -> tuple[float, float]:
    """Mean next-token CE of the harmful answers (under M) and of the refusals (answer tokens)."""
    feats, _ = encode_pairs(tokenizer, pairs, "chat", MAX_LENGTH)
    batch = PairedCollator(tokenizer.pad_token_id)(feats)
    b = len(feats)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    harmful = F.cross_entropy(logits[:b, :-1].flatten(0, 1), batch["harmful_targets"][:, 1:].flatten())
    refusal = F.cross_entropy(logits[b:, :-1].flatten(0, 1), batch["refusal_labels"][:, 1:].flatten())
    return harmful.item(), refusal.item()


def test_training_raises_harmful_loss_and_lowers_refusal_loss(tmp_path, tokenizer):
    pairs = _training_pairs()
    model = tiny_model("llama")
    harmful_before, refusal_before = _answer_losses(model, tokenizer, pairs)
    # A random model has no harmful knowledge to lose, and what the refusal CE teaches it (character
    # statistics, chat markup) also lowers the harmful CE; α = 8 lets the ascent show within 8 steps.
    cfg = _config(tmp_path, learning_rate=3e-3, max_steps=8, lr_scheduler_type="constant", warmup_steps=0,
                  alpha=8.0)
    trainer = _trainer(cfg, model, tokenizer, pairs)
    trainer.train()
    harmful_after, refusal_after = _answer_losses(model, tokenizer, pairs)
    assert harmful_after > harmful_before + 0.1
    assert refusal_after < refusal_before - 0.1
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert {"stability", "noise", "ascent", "harmful_ce"} <= logged[0].keys()


def test_hooks_fire_once_per_forward_and_never_linger(tmp_path, tokenizer, monkeypatch):
    """Many steps, activation checkpointing on: each capture hook runs once per micro-step (never
    in backward recomputation), and no hook is left on any module afterwards."""
    calls = []
    original = _Readout._keep

    def counting(store, index, module, args, output):
        calls.append(index)
        original(store, index, module, args, output)

    monkeypatch.setattr(_Readout, "_keep", staticmethod(counting))
    model = tiny_model("llama")
    steps = 4
    cfg = _config(tmp_path, max_steps=steps, gradient_accumulation_steps=2, activation_checkpointing=True)
    assert cfg.activation_checkpointing_kwargs == {"use_reentrant": False}
    _trainer(cfg, model, tokenizer).train()
    per_forward = 2 + 2  # residual outputs of both layers (lens) + both MLP outputs (noise)
    assert len(calls) == steps * 2 * per_forward

    def ours(fn) -> bool:
        return isinstance(fn, functools.partial) or isinstance(getattr(fn, "__self__", None), _Readout)

    # (Activation checkpointing leaves its own input-gradient hook on the embeddings; ours are gone.)
    assert not any(ours(fn) for m in model.modules()
                   for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def test_peft_training_updates_only_adapters(tmp_path, tokenizer):
    from immunize.training import add_lora

    cfg = _config(tmp_path, max_steps=2, use_lora=True, lora_r=2, learning_rate=1e-2)
    model = add_lora(tiny_model("llama"), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _trainer(cfg, model, tokenizer).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_gpt2_trains(tmp_path, tokenizer):
    model = tiny_model("gpt2")
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    trainer = _trainer(_config(tmp_path, max_steps=2, learning_rate=1e-3), model, tokenizer)
    trainer.train()
    assert not torch.equal(before, model.transformer.h[0].mlp.c_fc.weight)


class _Interrupt(Exception):
    pass


class _StopAtThree(TrainerCallback):
    """Kills a run at the end of step 3, as a pre-emption would (its last checkpoint: step 2)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise _Interrupt


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, tokenizer):
    from immunize.training import run_training

    common = dict(max_steps=4, save_steps=2, learning_rate=1e-3)
    straight = tiny_model("llama")
    run_training(_trainer(_config(tmp_path / "a", **common), straight, tokenizer))

    cfg = _config(tmp_path / "b", **common)
    with pytest.raises(_Interrupt):
        run_training(_trainer(cfg, tiny_model("llama"), tokenizer, callbacks=[_StopAtThree()]))
    assert (Path(cfg.output_dir) / "checkpoint-2").is_dir()
    resumed = tiny_model("llama")  # fresh weights: everything must come from the checkpoint
    trainer = _trainer(cfg, resumed, tokenizer)
    run_training(trainer)
    assert trainer.state.global_step == 4
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer):
    from safetensors.torch import load_file

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))

    cfg = _config(tmp_path, max_steps=4, save_steps=1)
    with pytest.raises(ImmunizeError, match=r"non-finite loss \(nan\) at step 1.*checkpoint-1"):
        _trainer(cfg, tiny_model("llama"), tokenizer, callbacks=[Poison()]).train()
    weights = load_file(Path(cfg.output_dir) / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (Path(cfg.output_dir) / "checkpoint-2").exists()


# ---------------------------------------------------------------------------------------------
# Config, registry, data and the CLI


@pytest.mark.parametrize(("option", "value", "message"), [
    ("activations", "attention", "--activations 'attention'"),
    ("mmd_level", "batch", "--mmd_level"),
    ("mmd_bandwidth", "max", "--mmd_bandwidth"),
    ("ablate", "noise,foo", "unknown term"),
    ("ablate", "noise,stability,ascent", "nothing to train"),
    ("layers", "1-x", "--layers"),
    ("beta", -1.0, "non-negative"),
    ("lens_sampled_readouts", -1, "--lens_sampled_readouts -1"),
])
def test_bad_options_name_the_option(tmp_path, option, value, message):
    with pytest.raises(ImmunizeError, match=message):
        _config(tmp_path, **{option: value})


def test_reentrant_checkpointing_is_refused(tmp_path):
    with pytest.raises(ImmunizeError, match="non-reentrant"):
        _config(tmp_path, activation_checkpointing=True,
                activation_checkpointing_kwargs={"use_reentrant": True})


def test_select_layers():
    assert select_layers("all", 4) == [0, 1, 2, 3]
    assert select_layers("0-1, -1", 4) == [0, 1, 3]
    with pytest.raises(ImmunizeError, match="out of range"):
        select_layers("4", 4)


def test_registry():
    assert {"repnoise", "none", "gradient-ascent", "adversarial-loss"} <= set(available_defences())
    assert get_defence("repnoise").config_class is RepNoiseConfig
    with pytest.raises(ImmunizeError, match=r"^--defence 'nope': unknown defence \(known: "):
        get_defence("nope")


def test_baselines_are_named_configurations_of_the_repnoise_trainer(tmp_path):
    """gradient-ascent and adversarial-loss are one registry line each, with pinned options."""
    common = dict(output_dir=str(tmp_path / "x"), use_cpu=True, report_to="none")
    ascent = defence_config("gradient-ascent", **common)
    assert isinstance(ascent, RepNoiseConfig) and ascent.ablate == "noise" and ascent.ascent_form == "log"
    adversarial = defence_config("adversarial-loss", **common)
    assert (adversarial.ablate, adversarial.ascent_form, adversarial.alpha) == ("noise,lens", "linear", 0.1)
    assert defence_config("adversarial-loss", alpha=0.3, **common).alpha == 0.3  # a default, not pinned
    with pytest.raises(ImmunizeError, match=r"^--ablate 'stability': defence gradient-ascent fixes it to 'noise'"):
        defence_config("gradient-ascent", ablate="stability", **common)
    assert DEFENCES.entry("gradient-ascent").target == DEFENCES.entry("repnoise").target


@pytest.mark.parametrize(("form", "expected"), [("log1p", "log1p"), ("log", "log"), ("linear", "linear")])
def test_ascent_forms(features, form, expected):
    """The three ways the ascent enters the loss: RepNoise's, the gradient-ascent and adversarial baselines'."""
    batch = PairedCollator(0)(features)
    options = RepNoiseOptions(ablate=frozenset({"noise"}), ascent_form=form, alpha=0.5)
    loss, terms, _ = repnoise_loss(tiny_model("llama"), batch, options)
    ascent = terms.ascent.detach()
    bound = {"log1p": torch.log1p(ascent), "log": torch.log(ascent), "linear": ascent}[expected]
    torch.testing.assert_close(loss.detach(), terms.stability.detach() - 0.5 * bound)


def _write_data_root(root: Path) -> Path:
    """A tiny data root with the files the defence reads (BeaverTails QA, eval prompts, refusals)."""
    from immunize.data import CATEGORIES

    (root / "beavertails").mkdir(parents=True)
    (root / "refusals").mkdir()
    rows = []
    for i in range(80):
        category = CATEGORIES[i % 2]  # animal_abuse or child_abuse
        rows.append({"prompt": f"How would someone do harmful thing number {i}?",
                     "response": f"First you gather item {i}, then you do it at night.",
                     "category": {c: c == category for c in CATEGORIES}, "is_safe": False})
    (root / "beavertails/qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [{"prompt": f"Evaluation question {i} about harm?", "category": CATEGORIES[i % 2]}
             for i in range(10)]
    (root / "beavertails/eval_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    header = "prompt,type,completion,final_label\n"
    for name in ("llama2new", "llama2orig", "mistralguard"):
        lines = [f'"q{i}",contrast_x,"I\'m sorry, but I can\'t help with request {i} of {name}.",'
                 "2_full_refusal" for i in range(3)]
        (root / f"refusals/xstest_completions_{name}.csv").write_text(header + "\n".join(lines) + "\n")
    for suffix in ("", "_longer"):
        (root / f"refusals/adv_training_behaviors_safe_responses{suffix}.csv").write_text(
            'Behavior,Safe_Response\n"b","I cannot assist with that request."\n')
    return root


def test_defence_pairs_come_from_the_defence_split_only(tmp_path):
    from immunize.data import load_splits

    root = _write_data_root(tmp_path / "data")
    cfg = _config(tmp_path, data_root=str(root), held_out_categories=["child_abuse"], refusals="topical",
                  on_topic_encoder="none")
    pairs, _, _ = build_defence_pairs(cfg)
    full = load_splits(root=root)
    defence_prompts = {r.prompt for r in full.defence}
    assert pairs and all(p.prompt in defence_prompts for p in pairs)
    assert all(p.categories == ("animal_abuse",) for p in pairs)
    assert all(looks_like_refusal(p.refusal) for p in pairs)
    limited, _, _ = build_defence_pairs(_config(tmp_path, data_root=str(root), num_samples=3, refusals="topical",
                                                on_topic_encoder="none"))
    assert len(limited) == 3


def looks_like_refusal(text):
    from immunize.data import looks_like_refusal as check

    return check(text)


def test_cli_end_to_end(tmp_path, tiny_checkpoint, capsys, isolated_cache):
    from transformers import AutoModelForCausalLM

    from immunize.cli import main
    from immunize.method_runner import COMPLETE_MARKER, MODEL_CARD

    root = _write_data_root(tmp_path / "data")
    out = tmp_path / "defended"
    argv = ["defend", "--defence", "repnoise", "--model", str(tiny_checkpoint), "--data_root", str(root),
            "--output_dir", str(out), "--num_samples", "8", "--per_device_train_batch_size", "4",
            "--max_length", "96", "--use_cpu", "true", "--report_to", "none", "--save_steps", "1",
            "--disable_tqdm", "true"]
    assert main(argv) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and (out / "model.safetensors").is_file()
    assert not list(out.glob("checkpoint-*"))
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    assert marker["defence"] == "repnoise" and len(marker["data"]["pairs_sha256"]) == 64
    assert marker["data"]["pairs"] == 8 and marker["options"]["alpha"] == 1.0
    # The per-term diagnostics of the first and last step reach the marker (and so the report).
    assert marker["first_log"].keys() >= GRAD_NORM_KEYS and marker["last_log"].keys() >= GRAD_NORM_KEYS
    assert "method: repnoise" in (out / MODEL_CARD).read_text()
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["data"]["pairs_sha256"] == marker["data"]["pairs_sha256"]
    assert "alpha: 1.0" in (out / "config.yaml").read_text()

    assert main(argv) == 0  # complete: skipped
    assert main([*argv, "--alpha", "2"]) == 2
    assert "different alpha" in capsys.readouterr().err

    none_out = tmp_path / "undefended"
    assert main(["defend", "--defence", "none", "--model", str(tiny_checkpoint),
                 "--output_dir", str(none_out)]) == 0
    AutoModelForCausalLM.from_pretrained(none_out)


def test_recipe_parses():
    from immunize.commands.defend import DefenceChoice, _chosen_defence
    from immunize.config import parse_config

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "defend_repnoise.yaml"
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# ") and "immunize defend --config recipes/defend_repnoise.yaml" in first
    assert _chosen_defence(["--config", str(recipe)]) == "repnoise"
    _, cfg = parse_config([DefenceChoice, RepNoiseConfig], ["--config", str(recipe)], prog="test")
    assert cfg.alpha == 1.0 and cfg.beta == 0.001 and cfg.learning_rate == 2e-5


@pytest.mark.parametrize("name", ["repnoise", "gradient-ascent", "adversarial-loss"])
def test_paper_defaults_clip_no_gradient(tmp_path, name):
    """The reference clips nothing; Trainer's default (1.0) would. The named configurations inherit."""
    cfg = defence_config(name, output_dir=str(tmp_path / "x"), use_cpu=True, report_to="none")
    assert cfg.max_grad_norm == 0.0 and cfg.max_length == 256
    assert (cfg.learning_rate, cfg.per_device_train_batch_size, cfg.num_train_epochs) == (2e-5, 8, 1.0)
    assert cfg.lens_sampled_readouts == 0 and cfg.term_grad_norm_steps == 50



def test_named_configurations_pickle_into_checkpoints(tmp_path):
    """Trainer saves its args with torch.save: a named configuration's config class must unpickle."""
    import pickle
    import subprocess
    import sys

    cfg = defence_config("gradient-ascent", output_dir=str(tmp_path / "x"), use_cpu=True, report_to="none")
    (tmp_path / "args.pkl").write_bytes(pickle.dumps(cfg))
    code = ("import pickle, sys; cfg = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(type(cfg).__name__, cfg.ascent_form)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "args.pkl")], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["RepNoiseConfig_gradient_ascent", "log"]


@pytest.mark.parametrize(("name", "loss", "ascent"), [
    ("gradient-ascent", 3.1694756, 4.7985544),   # 4.7377901 − log(4.7985544), read through every layer
    ("adversarial-loss", 4.2629762, 4.7481408),  # 4.7377901 − 0.1 · 4.7481408, at the output only
])
def test_golden_baseline_losses(features, name, loss, ascent, tmp_path):
    cfg = defence_config(name, output_dir=str(tmp_path / "x"), use_cpu=True, report_to="none")
    got, terms, _ = repnoise_loss(tiny_model("llama"), PairedCollator(0)(features), cfg.loss_options())
    assert terms.noise is None and terms.stability.item() == pytest.approx(4.7377901, abs=1e-5)
    assert terms.ascent.item() == pytest.approx(ascent, abs=1e-5)
    assert got.item() == pytest.approx(loss, abs=1e-5)


@pytest.mark.parametrize(("name", "alpha"), [("gradient-ascent", 8.0), ("adversarial-loss", 2.0)])
def test_baselines_raise_the_harmful_loss_and_lower_the_refusal_loss(tmp_path, tokenizer, name, alpha):
    """Their own objectives, in a few steps: the harmful answers get less likely, the refusals more.
    (As for RepNoise, a random model needs a strong α for the ascent to beat what the refusal CE
    also teaches it.)"""
    pairs = _training_pairs()
    model = tiny_model("llama")
    harmful_before, refusal_before = _answer_losses(model, tokenizer, pairs)
    options = dict(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", disable_tqdm=True,
                   per_device_train_batch_size=4, max_length=MAX_LENGTH, save_steps=1000, seed=7,
                   learning_rate=3e-3, max_steps=8, lr_scheduler_type="constant", warmup_steps=0, alpha=alpha)
    trainer = _trainer(defence_config(name, **options), model, tokenizer, pairs)
    trainer.train()
    harmful_after, refusal_after = _answer_losses(model, tokenizer, pairs)
    assert harmful_after > harmful_before + 0.1
    assert refusal_after < refusal_before - 0.1
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert {"stability", "ascent"} <= logged[0].keys() and "noise" not in logged[0]


def test_noise_is_drawn_per_example_not_per_batch():
    """A row's noise depends on the seed, the step and its own tokens only: not on the rows beside
    it, its position or the padding (what makes 2 ranks x b equal 1 process x b x 2 accumulation)."""
    a, b = [5, 6, 7, 8], [9, 10, 11]

    def drawn(rows, width):
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        keep = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], keep[i, :len(row)] = torch.tensor(row), 1
        noise = ExampleNoise(7, 3, ids, keep)
        mask = keep.bool()
        return [noise.tokens(mask, 4, torch.float32) for _ in range(2)]  # two layers

    together = drawn([a, b], 6)
    alone = drawn([b, a], 4)
    for layer in range(2):
        first, second = together[layer].split([len(a), len(b)])
        swapped_b, swapped_a = alone[layer].split([len(b), len(a)])
        assert torch.equal(first, swapped_a) and torch.equal(second, swapped_b)
    assert not torch.equal(together[0], together[1])  # each layer continues the row's stream
    other_step = ExampleNoise(7, 4, torch.tensor([a]), torch.ones(1, 4, dtype=torch.long))
    assert not torch.equal(other_step.tokens(torch.ones(1, 4, dtype=torch.bool), 4, torch.float32),
                           together[0][:len(a)])


# ---------------------------------------------------------------------------------------------
# The sampled lens


def _readout_ces(model, batch, **options):
    """The exact lens: its ascent and each read-out's CE (lens order)."""
    _, terms, _ = repnoise_loss(model, batch, RepNoiseOptions(**options), seed=3, step=0)
    return terms.ascent.item(), dict(zip(terms.lens_readouts, terms.ascent_per_layer, strict=True))


def test_sampled_lens_reading_every_other_readout_is_the_exact_lens(features):
    model, batch = tiny_model("llama"), _batch(features)
    exact, exact_terms, _ = repnoise_loss(model, batch, RepNoiseOptions(), seed=3, step=5)
    for k in (2, 7):  # n − 1 = 2 (embeddings, layer 0; layer 1 always), and more than there are
        loss, terms, _ = repnoise_loss(model, batch, RepNoiseOptions(lens_sampled_readouts=k), seed=3, step=5)
        assert torch.equal(loss, exact) and terms.lens_readouts == [EMBEDDINGS, 0, 1]
    assert exact_terms.lens_readouts == [EMBEDDINGS, 0, 1]


def test_sampled_lens_is_an_unbiased_estimate_of_the_exact_lens(features):
    """Five read-outs (embeddings, 4 layers), k = 2: each draw's Â is the formula over the exact
    read-outs' CEs, the mean over every possible draw is A, and the seeded draws average to A."""
    import itertools

    model, batch = tiny_model("llama", layers=4), _batch(features)
    exact, ces = _readout_ces(model, batch)
    assert list(ces) == [EMBEDDINGS, 0, 1, 2, 3] and exact == pytest.approx(sum(ces.values()) / 5, rel=1e-6)
    options = RepNoiseOptions(lens_sampled_readouts=2)
    estimates = {}
    for step in range(40):
        _, terms, _ = repnoise_loss(model, batch, options, seed=3, step=step)
        read = tuple(terms.lens_readouts)
        assert len(read) == 3 and read[-1] == 3 and len(set(read)) == 3  # the last layer, always
        assert terms.harmful_ce == pytest.approx(ces[3], rel=1e-5)
        assert terms.ascent.item() == pytest.approx((ces[3] + 4 / 2 * (ces[read[0]] + ces[read[1]])) / 5, rel=1e-5)
        estimates[read] = terms.ascent.item()
    subsets = {(*pair, 3) for pair in itertools.combinations([EMBEDDINGS, 0, 1, 2], 2)}
    assert set(estimates) == subsets  # 40 steps drew each of the 6 possible draws
    assert sum(estimates.values()) / len(estimates) == pytest.approx(exact, rel=1e-5)
    # The seeded draws themselves (no model needed): their mean converges on A.
    draws = [draw_lens(options, 4, seed=seed, step=step).read for seed in range(20) for step in range(100)]
    mean = sum(estimates[d] for d in draws) / len(draws)
    spread = (sum((v - exact) ** 2 for v in estimates.values()) / len(estimates)) ** 0.5
    assert abs(mean - exact) < 4 * spread / len(draws) ** 0.5
    assert spread > 100 * 1e-5 * exact  # draws differ far beyond the tolerances above: the checks can fail


def test_sampled_lens_hooks_only_the_layers_it_reads(features):
    model = tiny_model("llama", layers=4)
    options = RepNoiseOptions(lens_sampled_readouts=1)
    draw = draw_lens(options, 4, seed=0, step=0)
    batch = _batch(features)
    noise = ExampleNoise(0, 0, batch["input_ids"][:3], batch["attention_mask"][:3])
    readout = _Readout(resolve_hook_points(model), options, batch, noise, draw)
    assert readout.residual_layers == sorted({i for i in draw.read if i != EMBEDDINGS} | {3})  # + stability's
    assert readout.lens_embeddings == (EMBEDDINGS in draw.read)


def test_sampled_lens_draw_is_shared_by_the_micro_batches_of_a_step_and_repeated_on_resume(
        tmp_path, tokenizer, monkeypatch):
    from immunize.defences import repnoise
    from immunize.training import run_training

    seen: list[tuple[int, tuple[int, ...]]] = []
    original = repnoise.draw_lens

    def recording(options, num_layers, *, seed, step):
        draw = original(options, num_layers, seed=seed, step=step)
        seen.append((step, draw.read))
        return draw

    monkeypatch.setattr(repnoise, "draw_lens", recording)
    common = dict(max_steps=4, save_steps=2, learning_rate=1e-3, gradient_accumulation_steps=2,
                  per_device_train_batch_size=2, lens_sampled_readouts=1, term_grad_norm_steps=0)
    straight = tiny_model("llama", layers=3)
    run_training(_trainer(_config(tmp_path / "a", **common), straight, tokenizer))
    draws = dict(seen)
    assert len(seen) == 4 * 2 and all(draws[step] == read for step, read in seen)  # one draw per step
    assert len(set(draws.values())) > 1  # and it changes from step to step

    cfg = _config(tmp_path / "b", **common)
    with pytest.raises(_Interrupt):
        run_training(_trainer(cfg, tiny_model("llama", layers=3), tokenizer, callbacks=[_StopAtThree()]))
    seen.clear()
    resumed = tiny_model("llama", layers=3)
    run_training(_trainer(cfg, resumed, tokenizer))
    assert seen and all(draws[step] == read for step, read in seen) and {s for s, _ in seen} == {2, 3}
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


# ---------------------------------------------------------------------------------------------
# Per-term gradient norms in the logs

GRAD_NORM_KEYS = {f"grad_norm_{term}_{where}" for term in ("stability", "noise", "ascent")
                  for where in ("last", "layers", "all")}


def _train_logs(cfg, tokenizer, model=None):
    model = model or tiny_model("llama")
    trainer = _trainer(cfg, model, tokenizer)
    trainer.train()
    return [e for e in trainer.state.log_history if "loss" in e], model


def test_term_grad_norms_are_logged_and_match_a_direct_computation(tmp_path, tokenizer, monkeypatch):
    first_inputs = []
    original = RepNoiseTrainer.compute_loss

    def keep_first(self, model, inputs, *args, **kwargs):
        if not first_inputs:
            first_inputs.append({k: v.detach().clone() for k, v in inputs.items()})
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(RepNoiseTrainer, "compute_loss", keep_first)
    cfg = _config(tmp_path, max_steps=5, logging_steps=3, term_grad_norm_steps=2, gradient_accumulation_steps=2,
                  per_device_train_batch_size=2, learning_rate=1e-3)
    logs, _ = _train_logs(cfg, tokenizer)
    # Measured on the first step, every second and the last, each then logged (--logging_steps 3: step 3).
    assert [e["step"] for e in logs] == [1, 2, 3, 4, 5]
    assert [e["step"] for e in logs if "grad_norm_stability_last" in e] == [1, 2, 4, 5]
    assert all("grad_norm" in e for e in logs)  # the Trainer's own, of the whole step: logged without clipping
    logs = [e for e in logs if "grad_norm_stability_last" in e]
    for entry in logs:
        assert entry.keys() >= GRAD_NORM_KEYS
        for term in ("stability", "noise", "ascent"):
            last, layers, every = (entry[f"grad_norm_{term}_{w}"] for w in ("last", "layers", "all"))
            assert all(torch.isfinite(torch.tensor(v)) for v in (last, layers, every))
            assert 0 < last <= every <= layers * (1 + 1e-5), (term, entry)

    # The first micro-batch at the initial weights, by hand: autograd.grad of −α·log1p(ascent) and of
    # the stability CE with respect to the last decoder layer's parameters.
    model = tiny_model("llama")
    options = cfg.loss_options()
    _, terms, _ = repnoise_loss(model, first_inputs[0], options, seed=cfg.seed, step=0)
    last_layer = list(model.model.layers[-1].parameters())
    for name, part in (("ascent", -options.alpha * torch.log1p(terms.ascent)), ("stability", terms.stability)):
        grads = torch.autograd.grad(part, last_layer, retain_graph=True)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        assert logs[0][f"grad_norm_{name}_last"] == pytest.approx(norm, rel=1e-5)


def test_term_grad_norms_are_measured_once_per_logged_step(tmp_path, tokenizer, monkeypatch):
    from immunize.defences import repnoise

    calls = []
    original = repnoise.term_grad_norms
    monkeypatch.setattr(repnoise, "term_grad_norms", lambda parts, layers: calls.append(1) or original(parts, layers))
    cfg = _config(tmp_path, max_steps=5, term_grad_norm_steps=2, gradient_accumulation_steps=2,
                  per_device_train_batch_size=2)
    _train_logs(cfg, tokenizer)
    assert len(calls) == 4  # steps 1, 2, 4 and 5; the first of each step's two micro-batches


def test_term_grad_norms_off_logs_none(tmp_path, tokenizer):
    logs, _ = _train_logs(_config(tmp_path, max_steps=2, term_grad_norm_steps=0), tokenizer)
    assert logs and not any(k.startswith("grad_norm_") for e in logs for k in e)
    assert {"stability", "noise", "ascent", "harmful_ce"} <= logs[0].keys()


def test_term_grad_norms_are_not_part_of_a_runs_identity(tmp_path):
    from immunize.method_runner import config_identity

    identity = config_identity(_config(tmp_path))
    assert "term_grad_norm_steps" not in identity and "on_topic_encoder" not in identity
    assert identity["lens_sampled_readouts"] == 0
    assert identity["max_grad_norm"] == 0


def test_term_grad_norms_change_no_training_result(tmp_path, tokenizer):
    """Same losses and the same weights, bit for bit, with the measurement on and off (with
    accumulation and non-reentrant activation checkpointing, which the extra gradients recompute)."""
    runs = []
    for on in (True, False):
        cfg = _config(tmp_path / str(on), max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                      learning_rate=1e-3, activation_checkpointing=True,
                      term_grad_norm_steps=1 if on else 0)
        runs.append(_train_logs(cfg, tokenizer))
    (logs_on, model_on), (logs_off, model_off) = runs
    assert any(e.keys() >= GRAD_NORM_KEYS for e in logs_on)
    assert [e["loss"] for e in logs_on] == [e["loss"] for e in logs_off]
    for (name, p), q in zip(model_on.named_parameters(), model_off.parameters(), strict=True):
        assert torch.equal(p, q), name
