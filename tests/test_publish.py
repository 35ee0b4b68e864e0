"""Publishing a run for a write-up: results fit for a public repo, markdown tables, doc blocks, the CLI."""

from __future__ import annotations

import copy
import json

import pytest

from immunize.cli import main as cli
from immunize.errors import ImmunizeError
from immunize.report import load_results, validate_results
from immunize.report.example import example_results, with_attack_seeds, with_search, write_example_run
from immunize.report.publish import (
    BLOCKS,
    DOC_FIGURES,
    fill_blocks,
    markdown_blocks,
    publishable,
    stale_blocks,
)

DOC = ("# Reproduction\n\nIntro | with a pipe.\n\n<!-- BEGIN main-table -->\nold table\n<!-- END main-table -->\n\n"
       "Between.\n<!-- BEGIN run-table -->\n<!-- END run-table -->\nEnd.\n")


@pytest.fixture(scope="module")
def results() -> dict:
    return example_results()


def _keys_and_texts(value, keys: set, texts: list) -> None:
    if isinstance(value, dict):
        keys.update(value)
        for item in value.values():
            _keys_and_texts(item, keys, texts)
    elif isinstance(value, list):
        for item in value:
            _keys_and_texts(item, keys, texts)
    elif isinstance(value, str):
        texts.append(value)


def _without_examples(value):
    if isinstance(value, dict):
        return {k: _without_examples(v) for k, v in value.items() if k != "examples"}
    return [_without_examples(v) for v in value] if isinstance(value, list) else value


def test_publishable_drops_generations_examples_and_paths_and_keeps_the_numbers(results):
    original = copy.deepcopy(results)
    published = publishable(results)
    assert results == original  # a copy: the argument is left as it was
    assert publishable(results) == published and publishable(published) == published
    validate_results(published)
    keys: set = set()
    texts: list = []
    _keys_and_texts(published, keys, texts)
    assert "samples" not in published and not {"examples", "path", "cache"} & keys
    assert not [t for t in texts if t.startswith(("runs/example", "~", "/"))]
    assert "tension wrench" not in json.dumps(published)
    for section in ("harmfulness", "generalization", "stability", "trainability", "toxicity"):
        assert published[section] == _without_examples(results[section]), section
    for section in ("verdict", "comparisons", "curves", "settings", "budgets", "defences", "analysis", "run"):
        assert published[section] == results[section], section
    assert published["models"]["repnoise"] == {"role": "defended", "defence": "repnoise", "budget": None,
                                               "fingerprint": "9a0b77c1d2e3f405"}
    refusals = published["training"]["repnoise"]["paired_refusals"]
    assert "model" not in refusals["generation"] and "cache" not in refusals["generation"]["own"]
    assert refusals["on_topic"] == results["training"]["repnoise"]["paired_refusals"]["on_topic"]
    assert published["training"]["repnoise"]["first_log"] == results["training"]["repnoise"]["first_log"]


def test_publishable_drops_the_paths_a_real_recipe_records(results):
    run = copy.deepcopy(results)
    run["run"]["recipe"].update(output_dir="runs/real", data_root="../shared/data",
                                eval_harmfulness_prompts="/home/me/prompts.jsonl")
    run["training"]["repnoise"]["paired_refusals"]["generation"]["model"] = "runs/real/stages/align/model"
    recipe = publishable(run)["run"]["recipe"]
    assert not {"output_dir", "data_root", "eval_harmfulness_prompts"} & set(recipe)
    assert recipe["model"] == "smollm2-135m-instruct" and recipe["repnoise"] == run["run"]["recipe"]["repnoise"]
    assert "model" not in publishable(run)["training"]["repnoise"]["paired_refusals"]["generation"]


def test_blocks_hold_the_numbers_and_the_stored_paired_differences(results):
    blocks = markdown_blocks(publishable(results))
    assert list(blocks) == list(BLOCKS)
    assert blocks == markdown_blocks(results)  # the examples it dropped are not needed
    main = blocks["main-table"]
    header = main.splitlines()[0]
    columns = ["Pre-attack", *(b["id"] for b in results["budgets"])]
    assert [header.index(c) for c in columns] == sorted(header.index(c) for c in columns)
    assert "SFT · lr 3e-5 · 1,000 samples · 1 epoch · 125 steps" in header
    for defence in results["defences"]:
        for cell in results["harmfulness"][defence].values():
            assert f"{cell['mean']:.3f} [{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]" in main
    resistance = results["verdict"][1]["resistance"]
    stored = [resistance["pre_attack"], *(resistance["per_budget"][b["id"]]["paired"] for b in results["budgets"])]
    row = next(line for line in main.splitlines() if line.startswith("| repnoise |"))
    for paired in stored:
        low, high = paired["ci"]
        assert f"Δ {paired['difference']:+.3f} [{low:.3f}, {high:.3f}], n = {paired['n']}, lower" in row
    assert "Δ" not in next(line for line in main.splitlines() if line.startswith("| none (undefended) |"))

    # Read from the stored verdict, never recomputed: an edited verdict shows in the table.
    edited = copy.deepcopy(results)
    edited["verdict"][1]["resistance"]["per_budget"]["sft-lr8e-5-1k"]["paired"]["difference"] = -0.4321
    assert "Δ -0.432 " in markdown_blocks(publishable(edited))["main-table"]

    verdict = blocks["verdict-table"]
    assert "| repnoise | strong<br>sft-lr3e-5-1k: strong<br>sft-lr8e-5-1k: strong<br>lora-lr1e-4-1k: strong | " \
           "pass | pass | pass | yes | meets all four conditions |" in verdict
    assert "φ = 0.5 and ε = 0.05" in verdict
    stability = blocks["stability-table"]
    mmlu = results["verdict"][1]["stability"]["per_metric"]["mmlu_acc"]
    assert f"Δ {mmlu['paired']['difference']:+.3f}" in stability and f"n = {mmlu['paired']['n']}<br>pass" in stability
    assert "| Over-refusal |" in stability.splitlines()[0]
    held = blocks["held-out-table"]
    assert "n = 60" in held and "<code>child_abuse</code>" in held
    held_paired = results["verdict"][1]["generalization"]["per_budget"]["sft-lr3e-5-1k"]["paired"]
    assert f"Δ {held_paired['difference']:+.3f}" in held
    assert "| repnoise vs none | Harmfulness after sft-lr3e-5-1k |" in blocks["comparisons-table"]
    assert "no difference within ±0.05" in blocks["comparisons-table"]
    run = blocks["run-table"]
    for fact in ("<code>immunize run --config recipes/smollm2-repnoise.yaml</code>",
                 "<code>61fdf9c0e4b7a3d2f1e0c9b8a7d6e5f4c3b2a190</code>", "| **Wall time** | 2:42:17 |",
                 "| **torch** | 2.13.0 |", "| **transformers** | 5.23.0 |", "| **peft** | 0.21.2 |"):
        assert fact in run, fact
    assert "lm-eval" not in run  # not in the run's versions


def test_tables_show_each_group_under_its_attack_with_its_worst_seed_and_the_spread(results):
    seeded = with_attack_seeds(results, "sft-lr8e-5-1k", {1: 0.0, 2: 0.3, 3: 0.05})
    blocks = markdown_blocks(publishable(seeded))
    assert blocks == markdown_blocks(seeded)
    main = blocks["main-table"]
    header = main.splitlines()[0]
    assert header.count("**sft**<br>") == 2 and header.count("**lora**<br>") == 1
    assert "**sft**<br>sft-lr8e-5-1k<br>SFT · lr 8e-5 · 1,000 samples · 1 epoch · 125 steps · seeds 1, 2, 3" in header
    assert "sft-lr8e-5-1k-s" not in header
    harm = seeded["harmfulness"]["repnoise"]
    worst = harm["sft-lr8e-5-1k-s2"]
    paired = seeded["verdict"][1]["resistance"]["per_budget"]["sft-lr8e-5-1k-s2"]["paired"]
    means = sorted(harm[f"sft-lr8e-5-1k-s{seed}"]["mean"] for seed in (1, 2, 3))
    row = next(line for line in main.splitlines() if line.startswith("| repnoise |"))
    assert (f"| {worst['mean']:.3f} [{worst['ci'][0]:.3f}, {worst['ci'][1]:.3f}]<br>Δ {paired['difference']:+.3f} "
            f"[{paired['ci'][0]:.3f}, {paired['ci'][1]:.3f}], n = {paired['n']}, lower<br>min / median / max over "
            f"3 seeds: {means[0]:.3f} / {means[1]:.3f} / {means[2]:.3f} |") in row
    assert "shows its most harmful seed" in main
    assert "sft-lr8e-5-1k (worst: seed 2): none" in blocks["verdict-table"]
    assert "the worst seed's" in blocks["verdict-table"]
    held = seeded["generalization"]["cells"]["repnoise"]
    spread = sorted(held[f"sft-lr8e-5-1k-s{seed}"]["mean"] for seed in (1, 2, 3))
    assert f"min / median / max over 3 seeds: {spread[0]:.3f} / {spread[1]:.3f} / {spread[2]:.3f}" in \
        blocks["held-out-table"]
    # One seed per group and one attack: the header names budgets as before groups, with no attack line.
    single = {**results, "budgets": [b for b in results["budgets"] if b["attack"] == "sft"]}
    assert "**" not in markdown_blocks(single)["main-table"].splitlines()[0]
    assert "over 1 seeds" not in markdown_blocks(single)["main-table"]


def test_text_cells_are_escaped_and_missing_sections_say_so(results):
    edited = copy.deepcopy(results)
    edited["verdict"][1]["immunized_reason"] = "a | b\nc <img src=x> *d*"
    verdict = markdown_blocks(edited)["verdict-table"]
    row = next(line for line in verdict.splitlines() if line.startswith("| repnoise |"))
    assert row.endswith("| a \\| b<br>c &lt;img src=x&gt; \\*d\\* |")
    table = [line for line in verdict.splitlines() if line.startswith("|")]
    assert len({line.replace("\\|", "").count("|") for line in table}) == 1  # every row as many cells

    minimal = {key: results[key] for key in ("schema", "run", "defences", "budgets", "harmfulness")}
    blocks = markdown_blocks(minimal)
    assert blocks["comparisons-table"] == "_No comparison recorded in this run._"
    assert blocks["held-out-table"].startswith("_No held-out") and blocks["stability-table"].startswith("_No")
    assert "| repnoise |" in blocks["main-table"]


def test_fill_blocks_round_trip_and_stale_blocks(results):
    blocks = markdown_blocks(publishable(results))
    filled = fill_blocks(DOC, blocks)
    assert filled.startswith("# Reproduction\n\nIntro | with a pipe.\n\n<!-- BEGIN main-table -->\n\n| Defence |")
    assert filled.endswith("\n\n<!-- END run-table -->\nEnd.\n")
    assert "\n<!-- END main-table -->\n\nBetween.\n<!-- BEGIN run-table -->\n\n| Field |" in filled
    assert blocks["main-table"] in filled and blocks["run-table"] in filled and "old table" not in filled
    assert fill_blocks(filled, blocks) == filled
    assert stale_blocks(filled, blocks) == [] and stale_blocks(DOC, blocks) == ["main-table", "run-table"]
    assert fill_blocks("no markers | here\n", blocks) == "no markers | here\n"

    mean = f"{results['harmfulness']['repnoise']['sft-lr3e-5-1k']['mean']:.3f}"
    assert filled.count(mean) == 1
    edited = filled.replace(mean, f"{float(mean) + 0.001:.3f}")
    assert stale_blocks(edited, blocks) == ["main-table"]
    assert stale_blocks(edited, markdown_blocks(publishable(results))) == ["main-table"]


@pytest.mark.parametrize(("doc", "message"), [
    ("<!-- BEGIN nope -->\n<!-- END nope -->\n", "line 1: no block 'nope' to fill (blocks: main-table"),
    ("a\n<!-- BEGIN run-table -->\nb\n", "line 2: <!-- BEGIN run-table --> has no <!-- END run-table -->"),
    ("<!-- END run-table -->\n", "line 1: <!-- END run-table --> but no block is open"),
    ("<!-- BEGIN run-table -->\n<!-- END main-table -->\n",
     "line 2: <!-- END main-table --> but block 'run-table' (line 1) is open"),
    ("<!-- BEGIN run-table -->\n<!-- BEGIN main-table -->\n",
     "line 2: <!-- BEGIN main-table --> inside block 'run-table' (line 1): blocks do not nest"),
    ("<!-- BEGIN -->\n", "line 1: a block marker is a line of its own"),
    ("text <!-- BEGIN run-table -->\n<!-- END run-table -->\n", "line 1: a block marker is a line of its own"),
])
def test_bad_markers_raise_one_line_naming_them(doc, message):
    blocks = {name: "x" for name in BLOCKS}
    for check in (fill_blocks, stale_blocks):
        with pytest.raises(ImmunizeError) as err:
            check(doc, blocks)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cli_publishes_results_figures_and_fills_the_doc(tmp_path, capsys):
    run_dir, out, doc = tmp_path / "run", tmp_path / "docs" / "runs", tmp_path / "docs" / "reproduction.md"
    write_example_run(run_dir)
    doc.parent.mkdir()
    doc.write_text(DOC.replace("run-table", "nope"), encoding="utf-8")
    assert cli(["report", str(run_dir), "--publish", str(out), "--markdown", str(doc)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"immunize report: error: --markdown {doc}: line 10: no block 'nope' to fill "
                   f"(blocks: {', '.join(BLOCKS)})")
    assert not out.exists() and not (run_dir / "report").exists()  # nothing written
    assert cli(["report", str(run_dir), "--publish", str(out), "--phi", "0.1"]) == 2
    assert "drop --phi/--epsilon" in capsys.readouterr().err

    doc.write_text(DOC, encoding="utf-8")
    assert cli(["report", str(run_dir), "--publish", str(out), "--markdown", str(doc)]) == 0
    published = out / "example_smollm2_repnoise_results.json"
    assert str(published) in capsys.readouterr().out
    assert load_results(published) == publishable(example_results())
    assert sorted(p.name for p in (out / "example_smollm2_repnoise").iterdir()) == sorted(
        f"{name}.png" for name in DOC_FIGURES)
    assert sorted(p.name for p in out.iterdir()) == ["example_smollm2_repnoise", published.name]  # no staging
    text = doc.read_text(encoding="utf-8")
    assert stale_blocks(text, markdown_blocks(load_results(published))) == []
    assert text.startswith("# Reproduction\n") and text.endswith("<!-- END run-table -->\nEnd.\n")

    assert cli(["report", str(run_dir), "--publish", str(out), "--publish_name", "smollm2-v1"]) == 0
    assert (out / "smollm2-v1_results.json").is_file() and (out / "smollm2-v1" / "pca.png").is_file()


def test_a_search_is_published_without_its_local_paths_and_its_worst_cases_fill_a_block(results):
    searched = with_search(results, no_feasible=("repnoise",))
    searched["search"]["none"]["model"] = "/home/me/runs/x/stages/defend-none-0a1b/model"
    published = publishable(searched)
    validate_results(published)
    search = published["search"]["none"]
    assert "model" not in search and all("path" not in t for t in search["trials"])
    assert search["best"]["harmfulness"] == searched["search"]["none"]["best"]["harmfulness"]
    assert search["budgets"] == searched["search"]["none"]["budgets"] and search["space"]
    texts: list = []
    _keys_and_texts(published["search"], set(), texts)
    assert not [t for t in texts if t.startswith(("runs/example", "/"))]

    blocks = markdown_blocks(published)
    assert blocks == markdown_blocks(searched)
    table = blocks["worst-case-table"]
    harm = searched["harmfulness"]["none"]
    worst = max((harm[f"search-worst-s{seed}"] for seed in (1, 2, 3)), key=lambda c: c["mean"])
    row = next(line for line in table.splitlines() if line.startswith("| none |"))
    assert f"| worst case found | {worst['mean']:.3f} [{worst['ci'][0]:.3f}, {worst['ci'][1]:.3f}] n = 200<br>" in row
    assert f"learning_rate {searched['search']['none']['best']['params']['learning_rate']:.3g}" in row
    assert "| repnoise | no trial within the bound | — | — | — | 0 of 6 |" in table
    assert "| Worst-case resistance |" in blocks["verdict-table"].splitlines()[0]
    # The worst-case column of the main table carries the paired difference the verdict stored for it.
    both = with_search(results)
    paired = both["verdict"][1]["worst_case_resistance"]["per_budget"]["search-worst-s3"]["paired"]
    row = next(line for line in markdown_blocks(both)["main-table"].splitlines() if line.startswith("| repnoise |"))
    assert row.split(" | ")[-1].split("<br>")[1].startswith(f"Δ {paired['difference']:+.3f} ")
    assert markdown_blocks(results)["worst-case-table"] == "_No worst-case search in this run._"
    assert "Worst-case" not in markdown_blocks(results)["verdict-table"]
