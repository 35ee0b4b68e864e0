"""random-init: fresh weights from the model's own config and initialiser, seeded, tied embeddings and
generation settings kept, saved by the method runner as a loadable checkpoint that keeps no capability."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from immunize.defences import available_defences, defence_config, get_defence
from immunize.defences.random_init import RandomInit
from immunize.testing import fixed_init, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    """A tiny Llama whose config ties the LM head to the embeddings, with its own generation settings."""
    config = tiny_model("llama").config
    config.tie_word_embeddings = True
    model = fixed_init(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    model.generation_config = GenerationConfig(max_new_tokens=7, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    path = tmp_path_factory.mktemp("tied-llama")
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


def _build(checkpoint, tmp_path, **options):
    cfg = defence_config("random-init", model=str(checkpoint), output_dir=str(tmp_path / "out"), **options)
    return get_defence("random-init").build_model(cfg)


def _config_dict(config) -> dict:
    out = config.to_dict()
    out.pop("transformers_version", None)
    return out


def test_registered_as_keeping_no_capability():
    assert "random-init" in available_defences()
    defence = get_defence("random-init")
    assert isinstance(defence, RandomInit)
    assert defence.trains is False and defence.keeps_capability is False


def test_fresh_weights_same_architecture(tiny_checkpoint, tmp_path):
    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    model, tokenizer = _build(tiny_checkpoint, tmp_path)
    assert _config_dict(model.config) == _config_dict(original.config)
    before, after = original.state_dict(), model.state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    for name, value in after.items():
        assert value.dtype == torch.float32
        if "norm" in name:  # norms start at one, in the fixed init and in the model's own
            assert torch.equal(value, torch.ones_like(value))
        else:
            assert not torch.allclose(value, before[name]), name
    # The architecture's own initialiser: normal(0, initializer_range) for linear layers.
    std = model.model.layers[0].self_attn.q_proj.weight.std().item()
    assert std == pytest.approx(model.config.initializer_range, rel=0.25)
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()


def test_deterministic_for_a_seed_and_leaves_the_callers_rng_alone(tiny_checkpoint, tmp_path):
    state = torch.get_rng_state()
    first = _build(tiny_checkpoint, tmp_path, seed=3)[0].state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    again = _build(tiny_checkpoint, tmp_path, seed=3)[0].state_dict()
    other = _build(tiny_checkpoint, tmp_path, seed=4)[0].state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(first[name], other[name])


def test_dtype_follows_the_none_defence(tiny_checkpoint, tmp_path):
    model, _ = _build(tiny_checkpoint, tmp_path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_run_defence_writes_a_loadable_checkpoint(tied_checkpoint, tmp_path):
    from immunize.method_runner import MODEL_CARD, is_complete, run_defence

    cfg = defence_config("random-init", model=str(tied_checkpoint), output_dir=str(tmp_path / "out"), seed=5,
                         report_to="none")
    out = run_defence("random-init", cfg)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    expected, _ = _build(tied_checkpoint, tmp_path, seed=5)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in expected.state_dict().items())
    # Tied exactly as the config says, before and after saving.
    assert AutoConfig.from_pretrained(out).tie_word_embeddings is True
    for model in (expected, loaded):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    original = AutoModelForCausalLM.from_pretrained(tied_checkpoint)
    assert not torch.allclose(loaded.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert loaded.generation_config.max_new_tokens == 7
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tiny_tokenizer().get_vocab()
    marker = is_complete(out)
    assert marker["method"] == "random-init" and marker["keeps_capability"] is False
    assert marker["options"]["seed"] == 5 and marker["data"] is None
    assert "keeps_capability: false" in (out / MODEL_CARD).read_text()
