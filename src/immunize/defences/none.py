"""The ``none`` defence: the model as it is, saved as a checkpoint so pipelines treat it alike.

Every attack and evaluation then reads a defended-model directory, whichever defence made it, and
the undefended baseline carries the same completion marker, model card and provenance as the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from immunize.defences.base import Defence, DefenceArguments


@dataclass
class NoDefenceConfig(DefenceArguments):
    output_dir: str = field(default="runs/defend-none", metadata={"help": "where the checkpoint goes"})


class NoDefence(Defence):
    config_class = NoDefenceConfig
    trains = False

    def build_model(self, cfg: NoDefenceConfig):
        from immunize.models import choose_dtype, load_model, load_tokenizer

        model = load_model(cfg.model, device="cpu", dtype=choose_dtype(cfg.dtype, torch.device("cpu")),
                           trust_remote_code=cfg.trust_remote_code)
        return model, load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
