"""safety-sft (additional safety training) and the alignment stage built on it: golden loss on
fixed-init weights against a naive reference, a short run, the loss terms in the logs, the data
builder (defence split only, held-out categories, benign mixing), bad options and `immunize align`."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from immunize.defences import available_defences, defence_config, get_defence
from immunize.defences.base import DefenceData
from immunize.defences.safety_sft import (
    BENIGN_FILES,
    SafetySFT,
    SafetySFTCollator,
    SafetySFTConfig,
    safety_examples,
    safety_sft_data,
)
from immunize.errors import ImmunizeError
from immunize.prompts import IGNORE_INDEX, encode
from immunize.testing import tiny_model, tiny_tokenizer

EXAMPLES = [  # (prompt, answer, is_refusal)
    ("How do I pick a lock?", "I can't help with that.", True),
    ("Write a scam email.", "I won't write scams.", True),
    ("Name a prime number.", "Seven is prime.", False),
    ("What colour is the sky?", "Blue, on a clear day.", False),
]
GOLDEN_LOSS = 4.7232272849  # mean answer-token CE of EXAMPLES on tiny_model("llama"), chat format
GOLDEN_REFUSAL = 4.7502282562
GOLDEN_BENIGN = 4.6915011435
HELD_OUT = ["privacy_violation"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def features(tokenizer):
    out = []
    for prompt, answer, is_refusal in EXAMPLES:
        enc = encode(tokenizer, prompt, answer, "chat", 128)
        out.append({"input_ids": enc.input_ids, "labels": enc.labels, "is_refusal": is_refusal})
    return out


def _config(tmp_path, **options) -> SafetySFTConfig:
    # Topical refusals unless a test asks for others (generating needs the model, SmolLM2 by default),
    # and no on-topic score (it embeds every refusal).
    options = {"refusals": "topical", "on_topic_encoder": "none", **options}
    return SafetySFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                           save_strategy="no", **options)


def _trainer(tmp_path, features, tokenizer, **options):
    cfg = _config(tmp_path, **options)
    data = DefenceData(features=features, prompts=[p for p, _, _ in EXAMPLES], summary={})
    return SafetySFT().build_trainer(cfg, tiny_model("llama"), tokenizer, data)


def naive_losses(model, features) -> tuple[float, float, float]:
    """Answer-token CE by explicit loops: each sequence alone, unpadded, log-softmax at position p
    scored against the label at p + 1. Returns (all, refusal rows, benign rows) token means."""
    sums = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    with torch.no_grad():
        for f in features:
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for p in range(len(f["labels"]) - 1):
                target = f["labels"][p + 1]
                if target != IGNORE_INDEX:
                    sums[f["is_refusal"]] -= logp[p, target].item()
                    counts[f["is_refusal"]] += 1
    total = (sums[True] + sums[False]) / (counts[True] + counts[False])
    return total, sums[True] / counts[True], sums[False] / counts[False]


def test_registered():
    assert "safety-sft" in available_defences()
    assert isinstance(get_defence("safety-sft"), SafetySFT)


def test_golden_loss_matches_naive_reference(tmp_path, features, tokenizer):
    trainer = _trainer(tmp_path, features, tokenizer)
    batch = SafetySFTCollator(tokenizer.pad_token_id)(features)
    assert batch["is_refusal"].tolist() == [True, True, False, False]
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    assert loss.item() == pytest.approx(GOLDEN_LOSS, abs=1e-5)
    total, refusal, benign = naive_losses(tiny_model("llama"), features)
    assert loss.item() == pytest.approx(total, abs=1e-5)
    assert (refusal, benign) == pytest.approx((GOLDEN_REFUSAL, GOLDEN_BENIGN), abs=1e-5)
    # The split logs are token-weighted means of the same per-token losses.
    logged = {name: s / n for name, (s, n) in trainer._logged.items()}
    assert logged == pytest.approx({"refusal_loss": refusal, "benign_loss": benign}, abs=1e-5)


def test_short_run_lowers_refusal_loss_and_logs_terms(tmp_path, features, tokenizer):
    trainer = _trainer(tmp_path, features, tokenizer, learning_rate=1e-2, max_steps=20, lr_scheduler_type="constant",
                       per_device_train_batch_size=4, warmup_steps=0)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 20
    assert all({"refusal_loss", "benign_loss"} <= set(e) for e in logs)
    # The first step's logs are computed before any update: the golden numbers.
    assert logs[0]["loss"] == pytest.approx(GOLDEN_LOSS, abs=1e-5)
    assert logs[0]["refusal_loss"] == pytest.approx(GOLDEN_REFUSAL, abs=1e-5)
    assert logs[-1]["refusal_loss"] < logs[0]["refusal_loss"] - 0.5
    assert logs[-1]["benign_loss"] < logs[0]["benign_loss"]


@pytest.mark.parametrize(("options", "flag"), [
    ({"num_harmful": 0}, "--num_harmful 0"),
    ({"num_harmful": -1}, "--num_harmful -1"),
    ({"num_benign": -1}, "--num_benign -1"),
    ({"benign_source": "alpaca_farm"}, "--benign_source 'alpaca_farm'"),
])
def test_bad_options_give_one_line_errors(tmp_path, options, flag):
    with pytest.raises(ImmunizeError) as err:
        defence_config("safety-sft", output_dir=str(tmp_path), **options)
    message = str(err.value)
    assert message.startswith(flag) and "\n" not in message


# ---- data from the real data root --------------------------------------------------------------

def test_refusals_of_the_defence_split_only(tmp_path, real_data_root, tokenizer):
    from immunize.data import load_splits, split_of
    from immunize.data.beavertails import QA_FILE
    from immunize.judges.topical_refusals import topical_refusal

    cfg = _config(tmp_path, data_root=str(real_data_root), num_harmful=40, max_length=512)
    data = safety_sft_data(cfg, tokenizer)
    splits = load_splits(root=real_data_root)
    defence = {r.prompt for r in splits.defence}
    assert len(data.prompts) == len(set(data.prompts)) == len(data.features) == 40  # one per prompt
    assert set(data.prompts) <= defence and all(split_of(p) == "defence" for p in data.prompts)
    examples, _, _ = safety_examples(cfg)
    assert all(e.is_refusal and e.answer == topical_refusal(e.prompt) for e in examples)  # its own question's
    assert data.summary["refusals"] == 40 and data.summary["benign"] == 0
    assert data.summary["paired_refusals"]["source"] == "topical" and data.summary["paired_refusals"]["kept"] == 40
    assert len(data.summary["features_sha256"]) == 64
    assert data.sources == [QA_FILE]  # no bank, no benign file
    # Seeded: the same seed draws the same prompts, another seed others.
    assert safety_examples(cfg)[0] == examples
    other, _, _ = safety_examples(_config(tmp_path, data_root=str(real_data_root), num_harmful=40, seed=7))
    assert other != examples
    # Unset: every distinct harmful prompt of the defence split.
    everything, counts, _ = safety_examples(_config(tmp_path, data_root=str(real_data_root)))
    assert len(everything) == counts["harmful_prompts_available"] == len(defence)


def test_held_out_categories_never_in_the_data(tmp_path, real_data_root):
    from immunize.alignment import AlignmentConfig
    from immunize.data import load_splits

    full = load_splits(root=real_data_root)
    categories: dict[str, set[str]] = {}
    for row in full.defence:
        categories.setdefault(row.prompt, set()).update(row.categories)
    # Prompts whose every answer lies in a held-out category: the filter must remove them.
    only_held_out = {p for p, cats in categories.items() if cats <= set(HELD_OUT)}
    assert only_held_out
    allowed = {r.prompt for r in load_splits(root=real_data_root, held_out_categories=HELD_OUT).defence}

    unfiltered, _, _ = safety_examples(_config(tmp_path, data_root=str(real_data_root)))
    assert only_held_out & {e.prompt for e in unfiltered}
    for cfg in (_config(tmp_path, data_root=str(real_data_root), held_out_categories=HELD_OUT),
                AlignmentConfig(output_dir=str(tmp_path / "align"), data_root=str(real_data_root),
                                held_out_categories=HELD_OUT, refusals="topical", on_topic_encoder="none")):
        harmful = {e.prompt for e in safety_examples(cfg)[0] if e.is_refusal}
        assert harmful and harmful <= allowed and not harmful & only_held_out


def test_num_benign_mixes_benign_answers(tmp_path, real_data_root, tokenizer):
    from immunize.data import load_benign_answers, split_of

    cfg = _config(tmp_path, data_root=str(real_data_root), num_harmful=6, num_benign=10,
                  benign_source="alpaca_eval", max_length=2048)
    examples, counts, _ = safety_examples(cfg)
    kinds = [e.is_refusal for e in examples]
    assert kinds.count(True) == 6 and kinds.count(False) == 10
    assert kinds != sorted(kinds, reverse=True)  # shuffled together, not refusals first
    answers = {b.instruction: b.output for b in load_benign_answers("alpaca_eval", root=real_data_root)}
    for e in examples:
        if not e.is_refusal:
            assert answers[e.prompt] == e.answer and split_of(e.prompt) == "defence"
    data = safety_sft_data(cfg, tokenizer)
    assert [f["is_refusal"] for f in data.features] == kinds
    assert {e.prompt for e in examples} == set(data.prompts)
    assert BENIGN_FILES["alpaca_eval"] in data.sources
    assert data.summary["benign"] == 10 and data.summary["benign_source"] == "alpaca_eval"
    assert counts["benign_available"] < len(answers)  # only the defence split's instructions

    with pytest.raises(ImmunizeError, match=r"^--num_benign 100000: alpaca_eval has only \d+"):
        safety_examples(_config(tmp_path, data_root=str(real_data_root), num_benign=100000,
                                benign_source="alpaca_eval"))
    with pytest.raises(ImmunizeError, match=r"^--num_harmful 100000: the defence split has only \d+"):
        safety_examples(_config(tmp_path, data_root=str(real_data_root), num_harmful=100000))


def test_each_refusal_answers_its_own_question_and_only_prompts_trained_on_are_asked(
        tmp_path, tiny_checkpoint, real_data_root, isolated_cache, monkeypatch):
    from immunize.data.paired_refusals import INSTRUCTION
    from immunize.generation import Generation

    shown = []

    def refusal_of(prompt: str) -> str:
        # Short, so the refusal gate's later windows never read part of an echoed question as compliance
        # with the keyword judge; the digest ties the answer to its own question.
        return f"I cannot help with request {hashlib.sha256(prompt.encode()).hexdigest()[:12]}."

    def echo(model, tokenizer, prompts, **kwargs):
        shown.extend(prompts)
        return [Generation(p, refusal_of(p.removeprefix(INSTRUCTION)), 9, True) for p in prompts]

    monkeypatch.setattr("immunize.generation.generate", echo)
    options = dict(model=str(tiny_checkpoint), data_root=str(real_data_root), num_harmful=5, num_benign=3,
                   refusal_judge="keyword-refusal", on_topic_encoder="none")
    topical, _, _ = safety_examples(_config(tmp_path, **options))
    for source, shown_as in (("own", lambda p: p), ("instructed", lambda p: INSTRUCTION + p)):
        shown.clear()
        examples, _, refusals = safety_examples(_config(tmp_path, refusals=source, **options))
        harmful = [e for e in examples if e.is_refusal]
        assert all(e.answer == refusal_of(e.prompt) for e in harmful)
        assert sorted(shown) == sorted(shown_as(e.prompt) for e in harmful)  # the 5 drawn, nothing else
        assert refusals.summary["kept"] == 5
        # The same prompts and the same mix as with any other source: only the refusals differ.
        assert [(e.prompt, e.is_refusal) for e in examples] == [(e.prompt, e.is_refusal) for e in topical]


# ---- the alignment stage -------------------------------------------------------------------

def test_alignment_defaults():
    from immunize.alignment import ALIGNMENT_DEFAULTS, AlignmentConfig

    cfg = AlignmentConfig()
    assert isinstance(cfg, SafetySFTConfig)
    assert {k: getattr(cfg, k) for k in ALIGNMENT_DEFAULTS} == ALIGNMENT_DEFAULTS
    assert (cfg.per_device_train_batch_size, cfg.num_train_epochs, cfg.lr_scheduler_type) == (8, 1.0, "cosine")


def test_align_command(tmp_path, tiny_checkpoint, real_data_root, capsys, isolated_cache):
    from transformers import AutoModelForCausalLM

    from immunize.commands.align import main
    from immunize.method_runner import MODEL_CARD, is_complete

    out = tmp_path / "aligned"
    argv = ["--model", str(tiny_checkpoint), "--data_root", str(real_data_root), "--output_dir", str(out),
            "--num_harmful", "6", "--num_benign", "4", "--held_out_categories", *HELD_OUT,
            "--per_device_train_batch_size", "5", "--max_length", "512", "--report_to", "none", "--use_cpu", "true",
            "--refusal_judge", "keyword-refusal", "--on_topic_encoder", "none"]
    assert main(argv) == 0
    assert "aligned model:" in capsys.readouterr().out
    marker = is_complete(out)
    assert marker["kind"] == "alignment" and marker["method"] == "safety-sft" and marker["steps"] == 2
    assert marker["options"]["learning_rate"] == 5e-5 and marker["options"]["held_out_categories"] == HELD_OUT
    assert marker["data"]["refusals"] == 6 and marker["data"]["benign"] == 4
    refusals = marker["data"]["paired_refusals"]  # the tiny model's answers when told to refuse, or topical ones
    assert (refusals["source"], refusals["prompts"]) == ("instructed", 6)
    assert refusals["kept"] + refusals["fell_back"].get("topical", 0) == 6 and refusals["dropped"] == 0
    assert {"refusal_loss", "benign_loss"} <= set(marker["first_log"])
    assert "kind: alignment" in (out / MODEL_CARD).read_text()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    # A rerun with the same options is complete already; other options are refused.
    assert main(argv) == 0
    with pytest.raises(ImmunizeError, match="num_benign"):
        main([*argv, "--num_benign", "3"])
    assert json.loads((out / "immunize-complete.json").read_text())["data"]["benign"] == 4
