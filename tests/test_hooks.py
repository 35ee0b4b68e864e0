"""The per-architecture hook-point table and the hook context manager."""

from __future__ import annotations

import pytest
import torch

from immunize.errors import ImmunizeError
from immunize.hooks import ARCHITECTURES, HookSet, output_tensor, resolve_hook_points, unwrap_model
from immunize.testing import fixed_init, tiny_model

ARCHS = ("llama", "mistral", "qwen2", "gemma", "gpt_neox", "gpt2", "opt", "phi")
IDS = torch.tensor([[2, 40, 41, 42, 43, 44, 45], [2, 50, 51, 52, 53, 0, 0]])
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads waiting
    for each other make every small op up to 30x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lens_matches_model(model) -> None:
    """The table's read-out of the last layer reproduces the model's own logits, and the MLP hook
    point is a feed-forward output: one call per layer per forward, hidden-sized."""
    points = resolve_hook_points(model)
    captured, mlp_calls = {}, []
    with HookSet() as hooks:
        hooks.forward(points.layers[-1], lambda m, a, o: captured.__setitem__("last", output_tensor(o)))
        for mlp in points.mlps:
            hooks.forward(mlp, lambda m, a, o: mlp_calls.append(o.shape[-1]))
        with torch.no_grad():
            logits = model(input_ids=IDS, attention_mask=MASK).logits
    with torch.no_grad():
        lens = points.lm_head(points.head_input(captured["last"]))
    torch.testing.assert_close(lens, logits, rtol=1e-5, atol=1e-5)
    hidden = unwrap_model(model).config.hidden_size
    assert mlp_calls == [hidden] * points.num_layers


@pytest.mark.parametrize("arch", ARCHS)
def test_table_covers_architecture(arch):
    assert arch in ARCHITECTURES
    model = tiny_model(arch)
    points = resolve_hook_points(model)
    assert points.model_type == arch and points.num_layers == 2
    assert points.lm_head is model.get_output_embeddings()
    _lens_matches_model(model)


def test_opt_without_final_norm_and_with_projection():
    """OPT-350m style: post-layer norm (no final norm) and a project_out before the LM head."""
    from transformers import AutoModelForCausalLM, OPTConfig

    config = OPTConfig(vocab_size=103, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                       word_embed_proj_dim=8, do_layer_norm_before=False, max_position_embeddings=64,
                       pad_token_id=0)
    model = fixed_init(AutoModelForCausalLM.from_config(config)).eval()
    points = resolve_hook_points(model)
    assert points.final_norm is None and len(points.pre_head) == 1
    _lens_matches_model(model)


def test_resolved_on_unwrapped_peft_model():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    wrapped = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    assert unwrap_model(wrapped) is base
    points = resolve_hook_points(wrapped)
    assert points.layers[0] is base.model.layers[0] and points.mlps[1] is base.model.layers[1].mlp
    _lens_matches_model(wrapped)


def test_unsupported_architecture_names_the_table():
    from transformers import AutoModelForCausalLM, BloomConfig

    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=103, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(ImmunizeError, match=r"'bloom'.*immunize\.hooks\.ARCHITECTURES.*gpt2"):
        resolve_hook_points(model)


def test_hookset_removes_every_hook_even_on_error():
    model = tiny_model("gpt2")
    modules = list(model.modules())
    calls = []
    with pytest.raises(RuntimeError, match="boom"), HookSet() as hooks:
        for module in modules:
            hooks.forward(module, lambda m, a, o: calls.append(1))
            hooks.pre_forward(module, lambda m, a, k: None)
        assert len(hooks) == 2 * len(modules)
        model(input_ids=IDS)
        raise RuntimeError("boom")
    assert calls and all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
    before = len(calls)
    model(input_ids=IDS)
    assert len(calls) == before
