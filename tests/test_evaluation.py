"""Evaluation sections, result files and reuse, the lm-eval capability tasks, trainability, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from immunize.cli import main as cli_main
from immunize.errors import ImmunizeError
from immunize.evaluation import (
    SCHEMA_VERSION,
    EvaluationConfig,
    HarmfulnessStepScorer,
    bootstrap_ci,
    evaluate,
    judging,
    ratio_bootstrap_ci,
    resolve_suite,
    section_names,
    summarize,
)
from immunize.evaluation.config import fixed_subset
from immunize.evaluation.trainability import finetune_and_score, rouge_scores
from immunize.tasks import convert_truthfulqa, materialize
from immunize.tasks.functions import process_results_mc2
from immunize.testing import tiny_model, tiny_tokenizer


class FakeJudge:
    """Deterministic stand-in for ``immunize.judges``: the score grows with the response length."""

    threshold = 0.5

    def __init__(self, name: str, scale: float = 40.0):
        self.name = name
        self.scale = scale

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        return np.array([min(1.0, len(r) / self.scale) for r in responses])

    def label(self, prompts, responses):
        return self.score(prompts, responses) >= self.threshold

    def fingerprint(self):
        return f"fake-{self.name}-{self.scale}"


def fake_judges(scale: float = 40.0):
    return {role: FakeJudge(role, scale) for role in ("harmfulness", "refusal", "toxicity")}


TINY_SIZES = dict(
    batch_size=4,
    bootstrap_resamples=200,
    harmfulness_samples=5,
    harmfulness_max_new_tokens=8,
    overrefusal_samples=4,
    overrefusal_max_new_tokens=8,
    toxicity_samples=4,
    toxicity_max_new_tokens=6,
    mmlu_subjects="marketing",
    capability_limit=2,
    perplexity_samples=3,
    perplexity_max_length=512,
    trainability_tasks="viggo",
    trainability_steps=1,
    trainability_batch_size=2,
    trainability_eval_samples=2,
    trainability_max_new_tokens=8,
)


# --- statistics --------------------------------------------------------------------------------------


def test_bootstrap_ci_is_seeded_and_sane():
    rng = np.random.default_rng(0)
    sample = rng.random(400) < 0.3
    low, high = bootstrap_ci(sample, seed=1, resamples=2000)
    assert low < sample.mean() < high
    expected_half_width = 1.96 * math.sqrt(sample.mean() * (1 - sample.mean()) / sample.size)
    assert (high - low) / 2 == pytest.approx(expected_half_width, rel=0.15)
    assert bootstrap_ci(sample, seed=1, resamples=2000) == (low, high)
    assert bootstrap_ci(sample, seed=2, resamples=2000) != (low, high)
    narrow = bootstrap_ci(np.tile(sample, 16), seed=1, resamples=2000)
    assert narrow[1] - narrow[0] < (high - low) / 2
    assert bootstrap_ci(np.full(10, 0.25)) == (0.25, 0.25)
    assert bootstrap_ci([]) is None
    assert summarize([]) == {"value": None, "ci95": None, "n": 0}
    assert summarize([1.0, 0.0, 1.0, 1.0])["value"] == 0.75


def test_ratio_bootstrap_ci_resamples_pairs():
    nll = np.array([10.0, 20.0, 30.0, 40.0])
    tokens = np.array([10.0, 10.0, 10.0, 10.0])
    low, high = ratio_bootstrap_ci(nll, tokens, seed=0, transform=np.exp)
    assert math.exp(1.0) <= low <= math.exp(2.5) <= high <= math.exp(4.0)
    assert ratio_bootstrap_ci(np.full(5, 2.0), np.full(5, 1.0)) == (2.0, 2.0)


def test_fixed_subset_is_stable_and_order_free():
    items = [f"prompt {i}" for i in range(50)]
    names = {"option": "harmfulness_samples", "source": "prompts.jsonl"}
    first = fixed_subset(items, 10, key=str, **names)
    assert first == fixed_subset(list(reversed(items)), 10, key=str, **names)
    assert first != items[:10]
    assert len(fixed_subset(items, 0, key=str, **names)) == len(fixed_subset(items, 50, key=str, **names)) == 50
    with pytest.raises(ImmunizeError, match=r"^--harmfulness_samples 51: prompts.jsonl has only 50$"):
        fixed_subset(items, 51, key=str, **names)


def test_suite_fills_only_unset_options():
    cfg = resolve_suite(EvaluationConfig(suite="quick", harmfulness_samples=7))
    assert cfg.harmfulness_samples == 7 and cfg.toxicity_samples is not None
    assert resolve_suite(EvaluationConfig(suite="full")).harmfulness_samples == 0
    with pytest.raises(ImmunizeError, match="--suite"):
        EvaluationConfig(suite="medium")
    with pytest.raises(ImmunizeError, match="--harmfulness_samples"):
        EvaluationConfig(harmfulness_samples=-1)


def test_harmful_prompt_sources(real_data_root):
    from immunize.data import load_splits
    from immunize.evaluation import load_harmful_prompts

    both = load_harmful_prompts("both", 3, root=real_data_root)
    assert [p.source for p in both] == ["beavertails"] * 3 + ["advbench"] * 3
    assert all(p.category == "advbench" for p in both[3:])
    held_out = {e.prompt for e in load_splits(root=real_data_root).eval}
    assert all(p.prompt in held_out for p in both[:3])
    assert len(load_harmful_prompts("advbench", 0, root=real_data_root)) == 520


def test_held_out_categories_join_the_sample(real_data_root):
    from immunize.data import load_splits
    from immunize.evaluation import EvaluationConfig, load_harmful_prompts
    from immunize.evaluation.harmfulness import parse_categories

    cats = parse_categories("self_harm,terrorism,organized_crime")
    assert cats == ["self_harm", "terrorism,organized_crime"]
    base = load_harmful_prompts("beavertails", 5, root=real_data_root)
    joined = load_harmful_prompts("beavertails", 5, root=real_data_root, categories=cats)
    every = [e.prompt for e in load_splits(root=real_data_root).eval if e.category in cats]
    assert joined[:5] == base and every and set(every) <= {p.prompt for p in joined}
    assert len({p.prompt for p in joined}) == len(joined)  # no prompt twice
    with pytest.raises(ImmunizeError, match="--harmfulness_categories: unknown BeaverTails category 'self-harm'"):
        EvaluationConfig(harmfulness_categories="self-harm")


# --- judges ------------------------------------------------------------------------------------------


def test_judge_fallback_is_recorded(monkeypatch):
    def fake_load(name):
        if name == "refusal":
            raise ImmunizeError("judge 'refusal' is not trained yet")
        return FakeJudge(name)

    monkeypatch.setattr(judging, "_load", fake_load)
    loaded = judging.load_role("refusal", "refusal", "keyword-refusal", option="refusal_judge")
    record = loaded.record()
    assert record["name"] == "keyword-refusal" and record["requested"] == "refusal"
    assert "not trained" in record["fallback_reason"]
    with pytest.raises(ImmunizeError, match="--refusal_judge refusal"):
        judging.load_role("refusal", "refusal", None, option="refusal_judge")


def test_missing_judge_fails_before_any_work(monkeypatch, tiny_checkpoint, real_data_root, tmp_path):
    def fake_load(name):
        if name == "toxicity":
            raise ImmunizeError("judge 'toxicity' is not trained yet")
        return FakeJudge(name)

    monkeypatch.setattr(judging, "_load", fake_load)
    cfg = _config(tiny_checkpoint, real_data_root, sections="harmfulness,toxicity")
    with pytest.raises(ImmunizeError, match="--toxicity_judge toxicity: judge 'toxicity' is not trained"):
        evaluate(config=cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "harmfulness.json").exists()


# --- result files and reuse --------------------------------------------------------------------------


def _config(tiny_checkpoint, real_data_root, **overrides):
    values = {"model": str(tiny_checkpoint), "data_root": str(real_data_root), **TINY_SIZES, **overrides}
    return EvaluationConfig(**values)


def test_results_schema_and_reuse(tiny_checkpoint, real_data_root, isolated_cache, tmp_path):
    out = tmp_path / "eval"
    cfg = _config(tiny_checkpoint, real_data_root, sections="harmfulness,overrefusal,toxicity")
    summary = evaluate(config=cfg, output_dir=out, judges=fake_judges())

    assert list(summary["sections"]) == ["harmfulness", "overrefusal", "toxicity"]
    assert not any(s["reused"] for s in summary["sections"].values())
    harm = json.loads((out / "harmfulness.json").read_text())
    assert harm["schema"] == "immunize.evaluation" and harm["schema_version"] == SCHEMA_VERSION
    assert harm["model"] == summary["model"] and len(harm["model"]["fingerprint"]) == 16
    assert harm["judges"]["harmfulness"]["fingerprint"] == "fake-harmfulness-40.0"
    assert harm["config"]["harmfulness_samples"] == 5 and harm["config"]["prompt_format"] == "chat"
    for name in ("harmfulness", "harmful_rate", "refusal_rate"):
        metric = harm["metrics"][name]
        assert metric["n"] == 5 and metric["ci95"][0] <= metric["value"] <= metric["ci95"][1]
    rows = [json.loads(line) for line in (out / harm["generations"]).read_text().splitlines()]
    assert len(rows) == 5 and {"prompt", "response", "category", "harmfulness", "refused"} <= set(rows[0])
    assert np.mean([r["harmfulness"] for r in rows]) == pytest.approx(harm["metrics"]["harmfulness"]["value"])
    by_category = harm["breakdown"]["by_category"]
    assert sum(v["harmfulness"]["n"] for v in by_category.values()) == 5
    assert set(by_category) == {r["category"] for r in rows}
    tox = json.loads((out / "toxicity.json").read_text())
    assert tox["details"]["format"] == "continuation" and tox["metrics"]["toxicity"]["n"] == 4
    assert (out / "summary.json").is_file() and (out / "provenance.json").is_file()

    # The same evaluation again: every section reused, nothing rewritten.
    stamp = (out / "harmfulness.json").stat().st_mtime_ns
    again = evaluate(config=cfg, output_dir=out, judges=fake_judges())
    assert all(s["reused"] for s in again["sections"].values())
    assert (out / "harmfulness.json").stat().st_mtime_ns == stamp
    assert again["sections"]["harmfulness"]["metrics"] == summary["sections"]["harmfulness"]["metrics"]

    # A different judge, a changed option, a damaged file or --force: recomputed.
    changed = evaluate(config=cfg, output_dir=out, judges=fake_judges(scale=20.0))
    assert not any(s["reused"] for s in changed["sections"].values())
    cfg2 = _config(tiny_checkpoint, real_data_root, sections="harmfulness,overrefusal,toxicity", harmfulness_samples=4)
    partial = evaluate(config=cfg2, output_dir=out, judges=fake_judges(scale=20.0))
    assert {k: v["reused"] for k, v in partial["sections"].items()} == {
        "harmfulness": False,
        "overrefusal": True,
        "toxicity": True,
    }
    (out / "toxicity.json").write_text("{ truncated")
    forced = evaluate(
        config=_config(
            tiny_checkpoint,
            real_data_root,
            sections="toxicity,overrefusal",
            force=True,
            harmfulness_samples=4,
        ),
        output_dir=out,
        judges=fake_judges(scale=20.0),
    )
    assert not forced["sections"]["toxicity"]["reused"] and not forced["sections"]["overrefusal"]["reused"]
    # The section this run did not select stays in the summary, marked as such.
    assert forced["sections"]["harmfulness"]["selected"] is False
    assert json.loads((out / "toxicity.json").read_text())["section"] == "toxicity"


def test_in_memory_model_is_fingerprinted_by_its_weights(real_data_root, isolated_cache, tmp_path):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    cfg = EvaluationConfig(data_root=str(real_data_root), sections="overrefusal", **TINY_SIZES)
    first = evaluate(model, tokenizer, cfg, tmp_path / "a", judges=fake_judges())
    assert first["model"]["fingerprint"].startswith("weights:")
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    second = evaluate(model, tokenizer, cfg, tmp_path / "a", judges=fake_judges())
    assert second["model"]["fingerprint"] != first["model"]["fingerprint"]
    assert not second["sections"]["overrefusal"]["reused"]


def test_step_scorer_protocol(real_data_root):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    model.train()
    scorer = HarmfulnessStepScorer(
        n_prompts=3,
        max_new_tokens=6,
        judge=FakeJudge("h"),
        refusal_judge=FakeJudge("r"),
        data_root=real_data_root,
    )
    assert scorer.name == "harmfulness" and len(scorer.prompts) == 3
    out = scorer(model, tokenizer)
    assert set(out) == {"harmfulness", "harmful_rate", "refusal_rate", "gated_rate", "refusal_gate"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())
    assert out["refusal_gate"] == 0.9
    assert model.training
    assert scorer(model, tokenizer) == out  # greedy: the same model scores the same


# --- capability through lm-eval ----------------------------------------------------------------------

MMLU_ROWS = [
    {"question": "What is 2 + 2?", "answer": "B", "choices": {"A": "3", "B": "4", "C": "5", "D": "22"}},
    {
        "question": "Which is a colour?",
        "answer": "D",
        "choices": {"A": "dog", "B": "run", "C": "up", "D": "red"},
    },
    {"question": "Pick the vowel.", "answer": "A", "choices": {"A": "e", "B": "k", "C": "t", "D": "z"}},
]
TRUTHFULQA = [
    {
        "question": "Is the sky green?",
        "mc1_targets": {"No, it is blue.": 1, "Yes.": 0, "Always.": 0},
        "mc2_targets": {"No, it is blue.": 1, "No.": 1, "Yes.": 0},
    },
    {
        "question": "Do fish fly?",
        "mc1_targets": {"Most do not.": 1, "All fish fly.": 0},
        "mc2_targets": {"Most do not.": 1, "All fish fly.": 0, "Yes, daily.": 0},
    },
]


@pytest.fixture
def tiny_capability_root(tmp_path):
    root = tmp_path / "data"
    for subject in ("algebra_x", "botany_y"):
        folder = root / "capability" / "mmlu" / subject
        folder.mkdir(parents=True)
        for split in ("dev", "val", "test"):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MMLU_ROWS))
    (root / "capability" / "truthfulqa").mkdir(parents=True)
    (root / "capability" / "truthfulqa" / "mc_task.json").write_text(json.dumps(TRUTHFULQA))
    return root


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    return float(sum(logits[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))


def test_capability_tasks_match_a_direct_computation(tiny_capability_root, isolated_cache, tmp_path):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    cfg = EvaluationConfig(
        data_root=str(tiny_capability_root),
        sections="capability",
        capability_tasks="mmlu,truthfulqa_mc1,truthfulqa_mc2",
        mmlu_subjects="botany_y",
        capability_limit=0,
        bootstrap_resamples=100,
    )
    summary = evaluate(model, tokenizer, cfg, tmp_path / "out", judges={})
    result = json.loads((tmp_path / "out" / "capability.json").read_text())
    assert summary["sections"]["capability"]["metrics"].keys() == {"mmlu", "truthfulqa_mc1", "truthfulqa_mc2"}

    description = "The following are multiple choice questions (with answers) about botany y.\n\n"
    expected_mmlu = []
    for row in MMLU_ROWS:
        context = (
            description + f"{row['question']}\nA. {row['choices']['A']}\nB. {row['choices']['B']}\n"
            f"C. {row['choices']['C']}\nD. {row['choices']['D']}\nAnswer:"
        )
        scores = [_loglikelihood(model, tokenizer, context, " " + letter) for letter in "ABCD"]
        expected_mmlu.append(float(int(np.argmax(scores)) == "ABCD".index(row["answer"])))
    assert result["metrics"]["mmlu"]["value"] == pytest.approx(np.mean(expected_mmlu))
    assert result["breakdown"]["mmlu_by_subject"]["botany_y"]["n"] == 3

    preamble = materialize(["truthfulqa_mc1"], root=tiny_capability_root).include_path / "truthfulqa_mc1.yaml"
    assert "Q: What is human life expectancy" in preamble.read_text()
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "generations" / "capability.jsonl").read_text().splitlines()
    ]
    mc2 = [r["acc"] for r in rows if r["task"] == "truthfulqa_mc2"]
    assert len(mc2) == 2 and all(0.0 <= v <= 1.0 for v in mc2)
    assert result["metrics"]["truthfulqa_mc1"]["n"] == 2


def test_truthfulqa_conversion_and_mc2(tmp_path):
    path = tmp_path / "mc_task.json"
    path.write_text(json.dumps(TRUTHFULQA))
    rows = convert_truthfulqa(path)
    assert rows[0]["mc1_targets"] == {"choices": ["No, it is blue.", "Yes.", "Always."], "labels": [1, 0, 0]}
    out = process_results_mc2(rows[0], [(-1.0, False), (-1.0, False), (-1.0 - math.log(2), False)])
    assert out["acc"] == pytest.approx(0.8)
    # Long answers: log-likelihoods far below exp()'s range still normalize (no 0/0).
    long = process_results_mc2(rows[0], [(-900.0, False), (-2000.0, False), (-901.0, False)])["acc"]
    assert long == pytest.approx(1 / (1 + math.exp(-1)))
    path.write_text(json.dumps([{"question": "q", "mc1_targets": {"a": 0}, "mc2_targets": {"a": 1}}]))
    with pytest.raises(ImmunizeError, match="question 1: mc1_targets"):
        convert_truthfulqa(path)


def test_materialize_rejects_unknown_subjects(tiny_capability_root, isolated_cache):
    with pytest.raises(ImmunizeError, match="--mmlu_subjects: unknown subject"):
        materialize(["mmlu"], root=tiny_capability_root, subjects=["astrology"])
    with pytest.raises(ImmunizeError, match="--capability_tasks"):
        materialize(["hellaswag"], root=tiny_capability_root)


# --- trainability ------------------------------------------------------------------------------------


def test_rouge_scores_against_best_reference():
    scores = rouge_scores(["the cat sat", "blue sky"], [["a dog ran", "the cat sat"], ["green grass"]])
    assert scores["rouge1"].tolist() == [1.0, 0.0] and scores["rougeL"][0] == 1.0


def test_finetune_trains_a_copy_and_scores(real_data_root):
    from immunize.evaluation.trainability import load_task

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = load_task("viggo", root=real_data_root, train_examples=4, eval_samples=2)
    run = finetune_and_score(
        model,
        tokenizer,
        data,
        steps=2,
        batch_size=2,
        learning_rate=1e-2,
        max_length=96,
        max_new_tokens=6,
        seed=0,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert len(run["train_losses"]) == 2 and all(math.isfinite(x) for x in run["train_losses"])
    assert run["rouge_after"]["rouge1"].shape == (2,) and len(run["after"]) == 2
    assert run["after"] != run["before"]  # lr 1e-2 on a tiny model: the copy really changed


# --- the CLI, end to end ------------------------------------------------------------------------------


def test_evaluate_cli_end_to_end(tiny_checkpoint, real_data_root, isolated_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(judging, "_load", lambda name: FakeJudge(name))
    out = tmp_path / "cli"
    argv = [
        "evaluate",
        "--model",
        str(tiny_checkpoint),
        "--output_dir",
        str(out),
        "--data_root",
        str(real_data_root),
        "--reference_model",
        str(tiny_checkpoint),
        # Explicit, so the run does not switch this test process to one thread on a busy machine.
        "--threads",
        str(torch.get_num_threads()),
    ]
    for key, value in TINY_SIZES.items():
        argv += [f"--{key}", str(value)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    for name in section_names():
        assert (out / f"{name}.json").is_file() and name in printed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["sections"]) == section_names()
    train = json.loads((out / "trainability.json").read_text())
    # The reference is the same checkpoint: same budget and seed, so the difference is exactly 0.
    assert train["metrics"]["viggo_rougeL_vs_reference"]["value"] == 0.0
    assert train["details"]["reference_fingerprint"] == summary["model"]["fingerprint"]

    assert cli_main(argv) == 0
    assert "reused" in capsys.readouterr().out
    assert all(s["reused"] for s in json.loads((out / "summary.json").read_text())["sections"].values())
    assert cli_main([*argv, "--sections", "nonsense"]) == 2
    assert "--sections 'nonsense': unknown section (known: capability, harmfulness, " in capsys.readouterr().err
