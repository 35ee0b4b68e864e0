import pytest
import torch

from immunize.errors import ImmunizeError
from immunize.prompts import IGNORE_INDEX, CausalLMCollator, check_format, encode, render_prompt
from immunize.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("fmt", ["chat", "plain"])
def test_labels_cover_exactly_the_answer(tok, fmt):
    enc = encode(tok, "How?", "Like this.", fmt, max_length=512)
    prefix = render_prompt(tok, "How?", fmt)
    n_prompt = len(tok(prefix, add_special_tokens=fmt == "plain")["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    answer = tok.decode(enc.input_ids[n_prompt:])
    assert answer.strip().startswith("Like this.")
    assert answer.endswith("<|im_end|>\n" if fmt == "chat" else "</s>")


def test_plain_format_is_the_papers(tok):
    assert render_prompt(tok, "q", "plain") == "Question: q\nAnswer:"
    enc = encode(tok, "q", "a", "plain", max_length=64)
    assert tok.decode(enc.input_ids) == "Question: q\nAnswer: a</s>"


def test_truncation_keeps_masks_aligned(tok):
    enc = encode(tok, "a question", "a long answer " * 20, "chat", max_length=40)
    assert len(enc.input_ids) == len(enc.labels) == 40
    assert enc.n_answer_tokens > 0


def test_collator_pads_outside_losses_and_attention(tok):
    a = encode(tok, "q", "short", "chat", 128)
    b = encode(tok, "q", "a much longer answer", "chat", 128)
    # Pad with an id that also appears inside the text: no token id may act as "ignore".
    pad_id = a.input_ids[-1]
    batch = CausalLMCollator(pad_token_id=pad_id)([a.__dict__, b.__dict__])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    n = len(a.input_ids)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, n:] == 0).all() and (batch["attention_mask"][0, :n] == 1).all()
    assert batch["labels"][0, :n].tolist() == a.labels  # real occurrences of pad_id keep their labels
    assert batch["labels"].dtype == torch.long


def test_unknown_format_and_missing_template(tok):
    with pytest.raises(ImmunizeError, match="--prompt-format"):
        check_format("alpaca")
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ImmunizeError, match="no chat template"):
        render_prompt(bare, "q", "chat")
