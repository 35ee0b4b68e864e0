"""Random initialisation (``random-init``): the model's architecture with freshly initialised weights.

The first row of the RepNoise paper's main table (Rosati et al., NeurIPS 2024, arXiv 2405.14577,
Table 1) is a randomly initialised model: it cannot produce harmful text (nor anything else) before
an attack, and an attack must teach it everything from scratch. It is the lower bound of the
harmfulness scale, not a defence anyone would deploy: it keeps no capability, so the verdict marks
it as having nothing to keep (``keeps_capability = False``) instead of crediting it with stability,
trainability or resistance.

The authors' code, as ``boyiwei/RepNoise-Reproduce`` carries it (commit 4f6572d,
``immunization_llms/training.py``, the ``loss_fn_name == "random"`` branch of
``train_model_simple``), builds ``AutoModelForCausalLM.from_config`` of the model's config after
the run's global seed is set, and keeps the model's tokenizer. Here likewise: the config read from
the checkpoint (so tied embeddings stay tied exactly when the config ties them), the architecture's
own ``_init_weights`` run by ``from_config``, the tokenizer copied unchanged.

Deviations from the reference code:

- The seed is ``--seed`` applied to torch's generator only for the initialisation, inside a forked
  RNG state, so the same seed always gives the same weights and the caller's RNG is untouched.
- The dtype follows the ``none`` defence: ``--dtype auto`` saves fp32 (torch's default, as in the
  reference), ``--dtype bfloat16``/``float16`` initialise and save in that dtype.
- The checkpoint's generation settings (``generation_config.json``) are kept, so attacks and
  evaluations generate from it exactly as from the model it replaces.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from immunize.defences.base import Defence, DefenceArguments


@dataclass
class RandomInitConfig(DefenceArguments):
    output_dir: str = field(default="runs/defend-random-init", metadata={"help": "where the checkpoint goes"})


class RandomInit(Defence):
    config_class = RandomInitConfig
    trains = False
    keeps_capability = False

    def build_model(self, cfg: RandomInitConfig):
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        from immunize.models import choose_dtype, load_tokenizer, resolve_model_source

        source = resolve_model_source(cfg.model)
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        dtype = choose_dtype(cfg.dtype, torch.device("cpu"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        # A checkpoint without generation_config.json keeps the settings derived from its config.
        with contextlib.suppress(OSError):
            model.generation_config = GenerationConfig.from_pretrained(source)
        return model.eval(), load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
