"""Tiny offline models and tokenizers for tests and examples.

Everything here is built in memory: a character-level tokenizer with a ChatML chat template,
tiny models of several architectures whose weights are set by a closed-form formula
(``fixed_init``), so golden numbers do not depend on torch's random number generator, and a
deterministic stand-in for the trained judges (``length_judges``).
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from immunize.judges.base import Judge

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer():
    """A character-level fast tokenizer (printable ASCII + specials), ChatML chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def fixed_init(model: torch.nn.Module, scale: float = 0.08) -> torch.nn.Module:
    """Deterministic weights: parameter k gets ``scale * sin(1.7 * i + 0.3 * k)`` over its flat index i.

    Norm weights (1-D params named ``*norm*``/``ln*``) are set to ones and biases to zero, as at
    a fresh init, so the model behaves like a small random transformer but identically everywhere.
    """
    with torch.no_grad():
        for k, (name, param) in enumerate(model.named_parameters()):
            if param.ndim == 1 and ("norm" in name or ".ln" in name or name.startswith("ln")):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                idx = torch.arange(param.numel(), dtype=torch.float64)
                values = scale * torch.sin(1.7 * idx + 0.3 * k + 0.1) * math.sqrt(16 / max(param.shape[-1], 1))
                param.copy_(values.reshape(param.shape).to(param.dtype))
    return model


def tiny_model(arch: str = "llama", vocab_size: int | None = None, *, layers: int = 2, hidden: int = 16,
               tie_embeddings: bool | None = None):
    """A tiny causal LM of ``arch`` (llama, mistral, qwen2, gemma, gpt_neox, gpt2, opt, phi).

    ``tie_embeddings``: one tensor for the token embedding and the LM head, as SmolLM2 has
    (``None``: the architecture's default)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    vocab_size = vocab_size or len(tiny_tokenizer())
    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if tie_embeddings is not None:
        common["tie_word_embeddings"] = tie_embeddings
    if arch in ("llama", "mistral", "qwen2", "gemma"):
        config = CONFIG_MAPPING[arch](hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                                      max_position_embeddings=512, **common)
    elif arch == "gpt_neox":
        config = CONFIG_MAPPING[arch](hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=2, max_position_embeddings=512, **common)
    elif arch == "gpt2":
        config = CONFIG_MAPPING[arch](n_embd=hidden, n_layer=layers, n_head=2, n_positions=512, **common)
    elif arch == "opt":
        config = CONFIG_MAPPING[arch](hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=2, word_embed_proj_dim=hidden,
                                      max_position_embeddings=512, **common)
    elif arch == "phi":
        config = CONFIG_MAPPING[arch](hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=2, max_position_embeddings=512, **common)
    else:
        raise ValueError(f"no tiny config for {arch!r}")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return fixed_init(model).eval()


def save_tiny_checkpoint(path, arch: str = "llama", **kwargs):
    """Write a tiny model + tokenizer as a standard Hugging Face checkpoint directory."""
    model = tiny_model(arch, **kwargs)
    tokenizer = tiny_tokenizer()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


class LengthJudge(Judge):
    """A deterministic stand-in for trained judges: longer answers count as more harmful/toxic."""

    name = "test-length"

    def _score(self, prompts, responses):
        return np.array([min(len(r) / 40.0, 1.0) for r in responses])

    def fingerprint(self):
        return "length-v1"


@contextmanager
def length_judges() -> Iterator[None]:
    """The trained judges' names (harmfulness, toxicity, refusal) stand for ``LengthJudge`` (not
    trainable), so a pipeline runs without training judges; the built-ins come back after."""
    from immunize.judges.registry import JUDGES, register_judge

    built_in = [JUDGES.entry(name) for name in ("harmfulness", "toxicity", "refusal")]
    for entry in built_in:
        register_judge(entry.name, "test", lambda **options: LengthJudge())
    try:
        yield
    finally:
        for entry in built_in:
            JUDGES.unregister(entry.name)
            JUDGES.register(entry.name, entry.target, entry.help, fixed=entry.fixed, defaults=entry.defaults,
                            **entry.extra)
