"""Model loading: hub ids, local directories, GGUF files and named aliases."""

from immunize.models.aliases import ALIASES, ModelAlias
from immunize.models.loading import (
    choose_device,
    choose_dtype,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_fingerprint,
    resolve_model_source,
)

__all__ = [
    "ALIASES",
    "ModelAlias",
    "choose_device",
    "choose_dtype",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_fingerprint",
    "resolve_model_source",
]
