"""The contract every registered defence keeps (peft style: the day a defence is registered, it is
tested). On a tiny model: its checkpoint loads with ``from_pretrained`` and carries a model card; the
data it trained on comes from the defence split only and holds no held-out category; and, for
defences that train, two steps run and a run killed after its first checkpoint resumes to the same
weights as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from immunize.defences import DEFENCES, defence_config, get_defence

HELD_OUT = ["animal_abuse", "self_harm"]


class _Killed(Exception):
    pass


def _config(name: str, checkpoint, out, **overrides):
    import dataclasses

    from immunize.defences import config_class

    options = dict(model=str(checkpoint), output_dir=str(out), max_length=64, num_samples=8, max_steps=2,
                   per_device_train_batch_size=2, save_steps=1, learning_rate=1e-3, held_out_categories=HELD_OUT,
                   use_cpu=True, report_to="none", disable_tqdm=True, seed=3)
    if "refusals" in {f.name for f in dataclasses.fields(config_class(name))}:
        # The tiny model's own answers, judged by the keyword judge (no trained judge, no encoder to load).
        options.update(refusal_judge="keyword-refusal", on_topic_encoder="none")
    options.update(overrides)
    return defence_config(name, **options)


def _weights(directory) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("name", DEFENCES.names())
def test_defence_contract(name, tmp_path, tiny_checkpoint, real_data_root, monkeypatch, isolated_cache):
    from transformers import AutoModelForCausalLM, TrainerCallback

    from immunize.data.splits import load_splits, normalize_prompt
    from immunize.method_runner import MODEL_CARD, is_complete, run_defence
    from immunize.models import load_tokenizer

    defence = get_defence(name)
    cfg = _config(name, tiny_checkpoint, tmp_path / "straight")

    # The data: defence split only, no held-out category, nothing from the attack/held-out/eval prompts.
    data = defence.build_data(cfg, load_tokenizer(str(tiny_checkpoint)))
    if defence.trains:
        assert data is not None and data.features and data.prompts
    if data is not None:
        everything = load_splits(root=real_data_root)
        by_side = load_splits(root=real_data_root, held_out_categories=HELD_OUT)
        used = {normalize_prompt(p) for p in data.prompts}
        beavertails = {normalize_prompt(r.prompt) for r in (*everything.defence, *everything.attack,
                                                              *everything.heldout)}
        assert used & beavertails <= by_side.prompts("defence")
        assert not used & (everything.prompts("attack") | everything.prompts("heldout")
                           | {normalize_prompt(e.prompt) for e in everything.eval})
        held_out_only = {normalize_prompt(r.prompt) for r in everything.defence if set(r.categories) <= set(HELD_OUT)}
        assert not used & held_out_only

    out = run_defence(name, cfg)
    assert is_complete(out)["defence"] == name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    card = (out / MODEL_CARD).read_text()
    assert card.startswith("---\n") and "base_model:" in card and f"method: {name}" in card
    if not defence.trains:
        return

    # Killed after its first checkpoint, then resumed: the same weights as the uninterrupted run.
    original = type(defence).build_trainer

    class KillAfterFirstCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise _Killed

    def killing(self, *args, **kwargs):
        trainer = original(self, *args, **kwargs)
        trainer.add_callback(KillAfterFirstCheckpoint())
        return trainer

    resumed = _config(name, tiny_checkpoint, tmp_path / "resumed")
    monkeypatch.setattr(type(defence), "build_trainer", killing)
    with pytest.raises(_Killed):
        run_defence(name, resumed)
    monkeypatch.setattr(type(defence), "build_trainer", original)
    assert (tmp_path / "resumed" / "checkpoint-1").is_dir() and not is_complete(tmp_path / "resumed")
    run_defence(name, resumed)
    marker = is_complete(tmp_path / "resumed")
    assert marker["steps"] == 2
    straight, again = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == again.keys()
    for key, value in straight.items():
        torch.testing.assert_close(again[key], value, msg=key)
    assert marker["train_loss"] == pytest.approx(is_complete(tmp_path / "straight")["train_loss"])


def test_a_changed_option_never_resumes_or_skips_an_old_run(tmp_path, tiny_checkpoint, real_data_root,
                                                            isolated_cache):
    from immunize.errors import ImmunizeError
    from immunize.method_runner import run_defence

    run_defence("repnoise", _config("repnoise", tiny_checkpoint, tmp_path / "run", max_steps=1))
    changed = _config("repnoise", tiny_checkpoint, tmp_path / "run", max_steps=1, max_grad_norm=0.5)
    with pytest.raises(ImmunizeError, match=r"holds a run with different max_grad_norm;"):
        run_defence("repnoise", changed)


def test_every_registered_defence_has_help_and_a_config_with_the_shared_options():
    import dataclasses

    from immunize.defences import config_class
    from immunize.defences.base import SHARED_OPTIONS

    for entry in DEFENCES:
        assert entry.help
        fields = {f.name for f in dataclasses.fields(config_class(entry.name))}
        assert set(SHARED_OPTIONS) <= fields, entry.name


def test_identity_is_stable_across_copies_and_json_and_counts_data_and_dtype(tmp_path):
    """The identity of the same config is the same however it was built; 1 and 1.0 epochs are one."""
    import dataclasses
    import json

    from immunize.attacks.arguments import ReversedPreferenceArguments
    from immunize.config import fingerprint
    from immunize.method_runner import config_identity, method_identity

    cfg = defence_config("repnoise", output_dir=str(tmp_path / "a"), use_cpu=True, report_to="none")
    again = dataclasses.replace(cfg, output_dir=str(tmp_path / "b"), logging_steps=5)
    assert config_identity(cfg) == config_identity(again) == json.loads(json.dumps(config_identity(cfg)))
    assert fingerprint(config_identity(defence_config("repnoise", num_train_epochs=1, output_dir="x"))) == \
        fingerprint(config_identity(defence_config("repnoise", num_train_epochs=1.0, output_dir="x")))
    dpo = ReversedPreferenceArguments(output_dir=str(tmp_path / "d"), use_cpu=True)
    assert config_identity(dpo) == config_identity(dataclasses.replace(dpo))
    assert config_identity(dataclasses.replace(dpo, pad_token="<x>")) != config_identity(dpo)
    full = method_identity("repnoise", cfg, "abc", "def")
    assert full["dtype"] == "float32" and full["world_size"] == 1 and "data_root" in full["data"]
