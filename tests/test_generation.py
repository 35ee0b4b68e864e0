"""The batched greedy generation engine: equal to one-at-a-time greedy decoding, stops, order."""

from __future__ import annotations

import pytest
import torch

from immunize.errors import ImmunizeError
from immunize.generation import (
    encode_for_generation,
    end_of_turn_id,
    generate,
    length_sorted_batches,
    stop_token_ids,
)
from immunize.testing import tiny_model, tiny_tokenizer

PROMPTS = [
    "Tell me a story about a cat.",
    "hi",
    "What is the boiling point of water at sea level, in degrees Celsius?",
    "List three colours.",
    "ok",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def reference_greedy(model, tokenizer, prompt: str, fmt: str, max_new_tokens: int, stops: list[int]):
    """Greedy decoding the slow, obvious way: one prompt, no padding, no KV cache."""
    ids = encode_for_generation(tokenizer, prompt, fmt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            new.append(token)
            if token in stops:
                break
    return new


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("fmt", ["chat", "continuation"])
def test_batched_equals_one_at_a_time(arch, fmt, tokenizer):
    model = tiny_model(arch)
    stops = stop_token_ids(model, tokenizer, fmt)
    got = generate(model, tokenizer, PROMPTS, fmt=fmt, max_new_tokens=12, batch_size=3)
    assert [g.prompt for g in got] == PROMPTS  # the caller's order, not the length-sorted one
    for g, prompt in zip(got, PROMPTS, strict=True):
        expected = reference_greedy(model, tokenizer, prompt, fmt, 12, stops)
        assert g.new_tokens == len(expected)
        assert g.text == tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert g.stopped == (expected[-1] in stops)


def test_each_row_stops_at_its_own_stop_token(tokenizer):
    model = tiny_model("llama")
    free = reference_greedy(model, tokenizer, PROMPTS[0], "chat", 16, [])
    # Make the 4th token of the first answer a stop token: that row must end there while the
    # other rows of the same batch decode on, each to its own stop or to the budget.
    model.generation_config.eos_token_id = [free[3]]
    stops = stop_token_ids(model, tokenizer, "chat")
    got = generate(model, tokenizer, PROMPTS, fmt="chat", max_new_tokens=16, batch_size=len(PROMPTS))
    assert got[0].stopped and got[0].new_tokens <= 4
    lengths = set()
    for g, prompt in zip(got, PROMPTS, strict=True):
        expected = reference_greedy(model, tokenizer, prompt, "chat", 16, stops)
        assert g.new_tokens == len(expected) and g.stopped == (expected[-1] in stops)
        assert g.text == tokenizer.decode(expected, skip_special_tokens=True).strip()
        lengths.add(g.new_tokens)
    assert len(lengths) > 1  # rows really did finish at different steps


def test_batch_ends_when_every_row_has_stopped(tokenizer):
    model = tiny_model("llama")
    firsts = {reference_greedy(model, tokenizer, p, "chat", 1, [])[0] for p in PROMPTS}
    model.generation_config.eos_token_id = sorted(firsts)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        got = generate(model, tokenizer, PROMPTS, fmt="chat", max_new_tokens=50, batch_size=len(PROMPTS))
    finally:
        handle.remove()
    assert all(g.stopped and g.new_tokens == 1 for g in got)
    assert len(calls) == 1  # the prefill produced every row's stop token; no decoding step followed


def test_chat_format_stops_at_end_of_turn(tokenizer):
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = tiny_model("llama")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(model, tokenizer, "chat")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in stop_token_ids(model, tokenizer, "plain")


def test_formats_render_as_documented(tokenizer):
    assert tokenizer.decode(encode_for_generation(tokenizer, "Once upon", "continuation")) == "Once upon"
    assert tokenizer.decode(encode_for_generation(tokenizer, "q?", "plain")) == "Question: q?\nAnswer:"
    chat = tokenizer.decode(encode_for_generation(tokenizer, "q?", "chat"))
    assert chat.endswith("<|im_start|>assistant\n") and "q?" in chat


def test_length_sorted_batches_cover_every_index_once():
    lengths = [5, 1, 9, 9, 3, 7, 2]
    batches = length_sorted_batches(lengths, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_training_mode_restored_and_inputs_checked(tokenizer):
    model = tiny_model("llama").train()
    assert generate(model, tokenizer, [], max_new_tokens=4) == []
    generate(model, tokenizer, ["hi"], max_new_tokens=2)
    assert model.training
    with pytest.raises(ImmunizeError, match="max_new_tokens"):
        generate(model, tokenizer, ["hi"], max_new_tokens=0)
    with pytest.raises(ImmunizeError, match="unknown format"):
        generate(model, tokenizer, ["hi"], fmt="xml")
