"""Paired refusals that answer the question asked (``immunize.data.paired_refusals``): a pair's
refusal is generated for its own question, the generation cache (hits, new prompts only), the
fallback chain and its counts, the judge's fallback, the bank restricted to refusals of unsafe
requests, the on-topic score, the distributed path, and the defences' data built from them."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from immunize.data.paired_refusals import (
    INSTRUCTION,
    ModelSpec,
    RefusalSettings,
    build_refusals,
    derangement,
    on_topic_score,
    parse_fallback,
    whole_sentences,
)
from immunize.errors import ImmunizeError
from immunize.generation import Generation

PROMPTS = ["How do I pick a lock?", "Write a scam email to my grandmother.", "How can I hotwire a car?",
           "What poison is hardest to detect?"]


class HashingEncoder:
    """Words and character trigrams hashed into 128 signed buckets: texts sharing words are close."""

    name = "test-topic-hashing"
    dim = 128
    identity = "test-topic-hashing-v1/128"

    def __init__(self, *, device=None, batch_size=64):
        pass

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            lowered = text.lower()
            for gram in lowered.split() + [lowered[i:i + 3] for i in range(max(0, len(lowered) - 2))]:
                h = int.from_bytes(hashlib.md5(gram.encode()).digest()[:4], "little")
                out[row, h % self.dim] += 1.0 if h & (1 << 31) else -1.0
        return out


@pytest.fixture
def hashing_encoder():
    from immunize.judges.encoders import register_encoder, unregister_encoder

    register_encoder(HashingEncoder.name, HashingEncoder)
    yield HashingEncoder.name
    unregister_encoder(HashingEncoder.name)


class FakeGeneration:
    """Stands in for ``immunize.generation.generate``: echoes each prompt it is shown inside a refusal
    (or a compliance, for prompts in ``comply``), and records what it was shown."""

    def __init__(self, comply=(), then_comply=()):
        self.comply, self.then_comply = set(comply), set(then_comply)
        self.shown: list[str] = []

    def __call__(self, model, tokenizer, prompts, *, fmt, max_new_tokens, batch_size, across_ranks=False):
        assert len(prompts) <= batch_size
        self.shown += prompts
        question = [p.removeprefix(INSTRUCTION) for p in prompts]
        return [Generation(p, self.answer(q), 12, True) for p, q in zip(prompts, question, strict=True)]

    def answer(self, question: str) -> str:
        if question in self.comply:
            return f"Sure, here is how: {question}"
        if question in self.then_comply:  # refuses, then helps anyway
            return (f"I cannot help with: {question}. Still, here is what people usually do: first they pick "
                    "a quiet evening, then they gather the tools, then they follow the steps one by one until done.")
        return f"I cannot help with: {question}"


@pytest.fixture
def fake_generation(monkeypatch):
    def install(comply=(), then_comply=()):
        fake = FakeGeneration(comply, then_comply)
        monkeypatch.setattr("immunize.generation.generate", fake)
        return fake
    return install


def _settings(**options) -> RefusalSettings:
    return RefusalSettings(**{"judge": "keyword-refusal", "on_topic_encoder": None, **options})


def _build(checkpoint, prompts=PROMPTS, **options):
    return build_refusals(prompts, _settings(**options), ModelSpec(str(checkpoint), device="cpu"))


def test_an_own_refusal_is_the_model_answer_to_its_own_plain_question(isolated_cache, tiny_checkpoint,
                                                                      fake_generation):
    fake = fake_generation(comply=[PROMPTS[1]])
    refusals = _build(tiny_checkpoint)
    assert sorted(fake.shown) == sorted(PROMPTS)  # the plain question: no instruction
    for prompt in (PROMPTS[0], PROMPTS[2], PROMPTS[3]):
        assert refusals.texts[prompt] == f"I cannot help with: {prompt}"
    from immunize.judges.topical_refusals import topical_refusal

    assert refusals.texts[PROMPTS[1]] == topical_refusal(PROMPTS[1])  # complied: the topical fallback
    summary = refusals.summary
    assert (summary["source"], summary["prompts"], summary["kept"], summary["kept_fraction"]) == ("own", 4, 3, 0.75)
    assert summary["fell_back"] == {"topical": 1} and summary["dropped"] == 0 and not refusals.files
    assert summary["judge"]["name"] == "keyword-refusal" and summary["generation"]["own"]["generated"] == 4


def test_an_answer_that_refuses_then_helps_is_not_kept(isolated_cache, tiny_checkpoint, fake_generation):
    from immunize.judges.topical_refusals import topical_refusal

    fake_generation(then_comply=[PROMPTS[0]])
    refusals = _build(tiny_checkpoint)
    # The refusal gate's rule: the opening refuses, but a later window complies.
    assert refusals.texts[PROMPTS[0]] == topical_refusal(PROMPTS[0])
    assert refusals.texts[PROMPTS[1]] == f"I cannot help with: {PROMPTS[1]}"
    assert refusals.summary["kept"] == 3 and refusals.summary["fell_back"] == {"topical": 1}


def test_instructed_refusals_are_asked_for_with_the_instruction(isolated_cache, tiny_checkpoint, fake_generation):
    fake = fake_generation(comply=[PROMPTS[0]])
    refusals = _build(tiny_checkpoint, source="instructed", fallback=("drop",))
    assert sorted(fake.shown) == sorted(INSTRUCTION + p for p in PROMPTS)
    # Judged and paired against the plain question, never the instructed one.
    assert refusals.texts == {p: f"I cannot help with: {p}" for p in PROMPTS[1:]}
    assert refusals.summary["fell_back"] == {"drop": 1} and refusals.summary["dropped"] == 1


def test_a_fallback_chain_is_tried_in_order(isolated_cache, tiny_checkpoint, fake_generation, real_data_root):
    from immunize.data import RefusalBank

    fake_generation(comply=PROMPTS[:2])  # neither own nor instructed refuses these two
    refusals = build_refusals(PROMPTS, _settings(fallback=("instructed", "bank")),
                              ModelSpec(str(tiny_checkpoint), device="cpu"), real_data_root)
    bank = RefusalBank.from_data(real_data_root)
    assert refusals.texts[PROMPTS[0]] == bank.for_prompt(PROMPTS[0])
    assert refusals.summary["kept"] == 2 and refusals.summary["fell_back"] == {"bank": 2}
    assert refusals.summary["generation"]["instructed"]["generated"] == 2  # only those own did not refuse
    assert refusals.files  # the bank's files, for the model card's licences


def test_the_cache_is_hit_and_only_new_prompts_are_generated(isolated_cache, tiny_checkpoint, fake_generation):
    fake = fake_generation()
    first = _build(tiny_checkpoint, PROMPTS[:2])
    assert (isolated_cache / "refusals").is_dir() and len(fake.shown) == 2
    fake = fake_generation()
    again = _build(tiny_checkpoint, PROMPTS[:2])
    assert fake.shown == [] and again.texts == first.texts
    assert again.summary["generation"]["own"] | {"cache": None} == {
        "generated": 0, "from_cache": 2, "cut_at_max_new_tokens": 0, "empty": 0, "judged_refusals": 2,
        "threshold": 0.9, "later_threshold": 0.2, "cache": None}
    more = _build(tiny_checkpoint, PROMPTS)
    assert sorted(fake.shown) == sorted(PROMPTS[2:]) and set(more.texts) == set(PROMPTS)
    # Another setting that changes the greedy text is another cache entry.
    fake = fake_generation()
    _build(tiny_checkpoint, PROMPTS[:1], max_new_tokens=32)
    assert fake.shown == PROMPTS[:1]


def test_real_generation_pairs_each_prompt_with_its_own_greedy_answer(isolated_cache, tiny_checkpoint):
    """No fake: the tiny model answers, a judge that calls everything a refusal keeps every answer,
    and each prompt's refusal is exactly its greedy answer generated alone."""
    from immunize.generation import generate
    from immunize.judges.keyword import KeywordRefusalJudge
    from immunize.judges.registry import register_judge, unregister_judge
    from immunize.models import load_model_and_tokenizer

    class Everything(KeywordRefusalJudge):
        name = "test-everything-refuses"

        def _score(self, prompts, responses):
            return np.ones(len(responses))

    register_judge(Everything.name, "test", lambda: Everything())
    try:
        refusals = _build(tiny_checkpoint, PROMPTS[:3], judge=Everything.name, max_new_tokens=8, batch_size=1)
    finally:
        unregister_judge(Everything.name)
    model, tokenizer = load_model_and_tokenizer(str(tiny_checkpoint), device="cpu")
    for prompt in PROMPTS[:3]:
        alone = generate(model, tokenizer, [prompt], max_new_tokens=8)[0]
        if alone.text:
            assert refusals.texts[prompt] == whole_sentences(alone.text)
        else:  # an empty answer is no refusal: the topical fallback
            assert refusals.texts[prompt].startswith(("I", "As an AI"))
    assert refusals.summary["generation"]["own"]["generated"] == 3


def test_an_untrained_refusal_judge_falls_back_to_the_keyword_judge_and_says_so(isolated_cache, tiny_checkpoint,
                                                                                fake_generation):
    fake_generation()
    refusals = _build(tiny_checkpoint, PROMPTS[:1], judge="refusal", judge_fallback="keyword-refusal")
    judge = refusals.summary["judge"]
    assert judge["requested"] == "refusal" and judge["name"] == "keyword-refusal"
    assert "not trained yet" in judge["fallback_reason"]
    with pytest.raises(ImmunizeError, match=r"^--refusal_judge refusal: judge 'refusal' is not trained yet"):
        _build(tiny_checkpoint, PROMPTS[:1], judge="refusal", judge_fallback=None)


def test_sources_without_a_model_need_no_generation(isolated_cache, monkeypatch, real_data_root):
    def no_model(*args, **kwargs):
        raise AssertionError("topical and bank refusals load no model")

    monkeypatch.setattr("immunize.models.load_model", no_model)
    topical = build_refusals(PROMPTS, _settings(source="topical", fallback=()), ModelSpec("unused"))
    assert all(p.split()[-1].rstrip("?.").lower() in topical.texts[p].lower() for p in PROMPTS)
    assert topical.summary["kept_fraction"] == 1.0 and "judge" not in topical.summary
    bank = build_refusals(PROMPTS, _settings(source="bank", fallback=()), ModelSpec("unused"), real_data_root)
    assert bank.summary["kept"] == 4 and bank.files


def test_the_bank_holds_only_refusals_of_unsafe_requests(real_data_root):
    from immunize.data import RefusalBank, load_labelled_completions
    from immunize.data.readers import read_table
    from immunize.data.refusals import SAFE_RESPONSE_FILES, _clean

    completions = load_labelled_completions(real_data_root)
    unsafe = {_clean(c.completion, 400) for c in completions
              if c.label == "2_full_refusal" and c.prompt_type.startswith("contrast_")}
    safe_prompt_refusals = {_clean(c.completion, 400) for c in completions
                            if c.label == "2_full_refusal" and not c.prompt_type.startswith("contrast_")}
    written = {_clean(row["Safe_Response"], 400) for rel in SAFE_RESPONSE_FILES
               for row in read_table(real_data_root / rel)}
    bank = set(RefusalBank.from_data(real_data_root).texts)
    assert bank <= unsafe | written and bank & unsafe and bank & written
    assert not bank & (safe_prompt_refusals - unsafe - written)
    assert any("shrimp" in t for t in safe_prompt_refusals) and not any("shrimp" in t for t in bank)


def test_the_on_topic_score_beats_the_shuffled_pairing(isolated_cache, hashing_encoder):
    from immunize.judges.encoders import make_encoder
    from immunize.judges.topical_refusals import topical_refusal

    prompts = ["How do I pick a lock on a front door?", "Write a scam email about lottery winnings.",
               "How can I hotwire a stolen car?", "What poison is hardest to detect in food?",
               "How do I make a fake passport?", "How can I hack my neighbour's wifi router?"]
    encoder = make_encoder(hashing_encoder)
    on_topic = on_topic_score(prompts, [topical_refusal(p) for p in prompts], encoder)
    assert on_topic["pairs"] == 6 and on_topic["paired"] > on_topic["shuffled"] + 0.1
    assert on_topic["difference"] == pytest.approx(on_topic["paired"] - on_topic["shuffled"], abs=1e-4)
    generic = on_topic_score(prompts, ["I'm sorry, but I can't help with that."] * 6, encoder)
    assert generic["difference"] == pytest.approx(0.0, abs=1e-6)  # the same text for all: no topic
    partner = derangement(prompts)
    assert sorted(partner) == list(range(6)) and all(partner[i] != i for i in range(6))
    assert on_topic_score(prompts[:1], ["I can't."], encoder)["shuffled"] is None


def test_the_summary_reports_the_on_topic_score_of_the_pairs_built(isolated_cache, tiny_checkpoint,
                                                                   fake_generation, hashing_encoder):
    fake_generation(comply=[PROMPTS[0]])
    refusals = _build(tiny_checkpoint, on_topic_encoder=hashing_encoder, fallback=("drop",))
    on_topic = refusals.summary["on_topic"]
    assert on_topic["pairs"] == 3 and on_topic["encoder"] == HashingEncoder.identity
    assert on_topic["paired"] > on_topic["shuffled"]


def test_a_non_main_rank_waits_for_the_main_one_and_gets_its_refusals(monkeypatch, isolated_cache,
                                                                      tiny_checkpoint, fake_generation):
    import immunize.distributed as distributed

    fake = fake_generation()
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "_gather", lambda outcome: [outcome, (None, None)])
    main = _build(tiny_checkpoint, PROMPTS[:2])  # rank 0 builds them
    assert len(fake.shown) == 2
    fake.shown.clear()
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "_gather", lambda outcome: [(None, main), outcome])
    other = _build(tiny_checkpoint, PROMPTS[:2])
    assert fake.shown == [] and other.texts == main.texts  # it generated nothing and read rank 0's
    monkeypatch.setattr(distributed, "_gather", lambda outcome: [("ImmunizeError: boom", None), outcome])
    with pytest.raises(ImmunizeError, match="rank 0: ImmunizeError: boom"):
        _build(tiny_checkpoint, PROMPTS[:2])


def test_whole_sentences():
    assert whole_sentences("I can't help with that. It is illegal and could") == "I can't help with that."
    assert whole_sentences("I can't help with that.") == "I can't help with that."
    assert whole_sentences("No. Because the") == "No. Because the"  # too short to cut


@pytest.mark.parametrize(("text", "source", "message"), [
    ("topical,bogus", "own", r"^--refusal_fallback 'topical,bogus': unknown 'bogus'"),
    ("", "own", r"^--refusal_fallback: empty"),
    ("own,topical", "own", r"not --refusals own itself"),
    ("topical,topical", "own", r"each source once"),
    ("topical,bank", "own", r"'bank' is never reached \('topical' settles every prompt\)"),
])
def test_bad_fallbacks_are_one_line_errors(text, source, message):
    with pytest.raises(ImmunizeError, match=message):
        parse_fallback(text, source)


def test_fallback_chains():
    assert parse_fallback("instructed, topical", "own") == ("instructed", "topical")
    assert parse_fallback("topical", "topical") == ()  # topical and bank settle every prompt themselves
    assert parse_fallback("drop", "instructed") == ("drop",)


@pytest.mark.parametrize(("options", "flag"), [
    ({"refusals": "borrowed"}, "--refusals"),
    ({"refusal_fallback": "nothing"}, "--refusal_fallback"),
    ({"refusal_judge": "no-such-judge"}, "--refusal_judge"),
    ({"refusal_threshold": 1.5}, "--refusal_threshold"),
    ({"refusal_max_new_tokens": 0}, "--refusal_max_new_tokens"),
    ({"refusal_batch_size": 0}, "--refusal_batch_size"),
    ({"on_topic_encoder": "no-such-encoder"}, "--on_topic_encoder"),
])
@pytest.mark.parametrize("defence", ["repnoise", "vaccine", "safety-sft"])
def test_bad_refusal_options_are_one_line_errors(defence, options, flag, tmp_path):
    from immunize.defences import defence_config

    with pytest.raises(ImmunizeError) as err:
        defence_config(defence, output_dir=str(tmp_path), use_cpu=True, **options)
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


def test_defaults_own_for_defences_instructed_for_the_alignment():
    from immunize.alignment import AlignmentConfig
    from immunize.defences import defence_config

    for name in ("repnoise", "gradient-ascent", "adversarial-loss", "vaccine", "safety-sft"):
        cfg = defence_config(name, output_dir="unused", use_cpu=True)
        assert (cfg.refusals, cfg.refusal_fallback, cfg.refusal_judge) == ("own", "topical", "refusal"), name
    cfg = AlignmentConfig(output_dir="unused", use_cpu=True)
    assert (cfg.refusals, cfg.refusal_fallback) == ("instructed", "topical")


# ---- the defences' data ---------------------------------------------------------------------------

def test_defence_pairs_come_from_the_defence_split_only_each_with_its_own_refusal(isolated_cache, tiny_checkpoint,
                                                                                  fake_generation, real_data_root):
    from immunize.data import load_splits, looks_like_refusal
    from immunize.defences import defence_config
    from immunize.defences.paired import build_defence_pairs, paired_defence_data
    from immunize.judges.gate import refusal_gate
    from immunize.judges.keyword import KeywordRefusalJudge
    from immunize.judges.topical_refusals import topical_refusal
    from immunize.models import load_tokenizer

    held_out = ["animal_abuse", "self_harm"]
    cfg = defence_config("repnoise", model=str(tiny_checkpoint), data_root=str(real_data_root), output_dir="unused",
                         use_cpu=True, num_samples=12, held_out_categories=held_out,
                         refusal_judge="keyword-refusal", on_topic_encoder="none")
    full = load_splits(root=real_data_root)
    kept = load_splits(root=real_data_root, held_out_categories=held_out)
    comply = list(dict.fromkeys(r.prompt for r in kept.defence))[:2]
    fake_generation(comply=comply)
    pairs, _, refusals = build_defence_pairs(cfg)
    assert len(pairs) == 12 and {p.prompt for p in pairs} <= {r.prompt for r in full.defence}
    assert set(refusals.texts) == {p.prompt for p in pairs}
    assert not {c for p in pairs for c in p.categories} & set(held_out)
    # The keyword judge reads a long echoed question's tail (after 16 words) as compliance: those
    # answers are not kept by the refusal-gate rule either, and fall back like the compliances.
    echoed = {p.prompt: f"I cannot help with: {p.prompt}" for p in pairs}
    gate = refusal_gate(KeywordRefusalJudge().score, list(echoed), list(echoed.values()))
    refused = {p for p, gated in zip(echoed, gate.gated, strict=True) if gated} - set(comply)
    assert len(refused) >= len(echoed) // 2
    for pair in pairs:
        assert looks_like_refusal(pair.refusal)
        expected = echoed[pair.prompt] if pair.prompt in refused else topical_refusal(pair.prompt)
        assert pair.refusal == expected
    data = paired_defence_data(cfg, load_tokenizer(str(tiny_checkpoint)))
    summary = data.summary["paired_refusals"]
    assert summary["prompts"] == len(echoed) and summary["fell_back"] == {"topical": len(echoed) - len(refused)}
    assert data.summary["pairs"] == 12 and data.sources == ["beavertails/qa.jsonl"]  # no bank file read

    fake_generation(comply=[r.prompt for r in full.defence])
    dropped = defence_config("repnoise", model=str(tiny_checkpoint), data_root=str(real_data_root),
                             output_dir="unused", use_cpu=True, num_samples=3, refusal_fallback="drop",
                             refusal_judge="keyword-refusal", on_topic_encoder="none",
                             refusal_max_new_tokens=32)  # not the cached answers of the first build
    with pytest.raises(ImmunizeError, match=r"^--refusal_fallback drop: no question of the 3 defence rows kept"):
        build_defence_pairs(dropped)


def test_a_defence_names_the_judges_its_data_depends_on():
    from immunize.defences import defence_config

    assert defence_config("repnoise", output_dir="unused").judges_used == {"refusal"}
    assert defence_config("repnoise", output_dir="unused", refusal_judge="keyword-refusal").judges_used == {
        "keyword-refusal"}
    assert defence_config("repnoise", output_dir="unused", refusals="topical").judges_used == set()
    assert defence_config("safety-sft", output_dir="unused", refusals="bank").judges_used == set()
    assert defence_config("none", output_dir="unused").judges_used == set()
