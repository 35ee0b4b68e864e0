"""Bad data input: wrongly typed fields, empty or short files, bytes that are not UTF-8, an empty
data root. Each case ends in one line naming the file and row (or option), never a cast, a silent
clamp or a traceback.

``immunize data`` is an inventory: it lists every file, prints one ``error: ...`` line on stdout
per bad file and exits 1 (its contract since it was written; see tests/test_cli.py). Every other
command, and ``immunize data`` when the root itself is unusable, fails with exit 2 and one line on
stderr (the ``fails`` fixture).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from immunize.cli import main
from immunize.errors import ImmunizeError

from .conftest import snapshot

QA = "beavertails/qa.jsonl"


def data_errors(capsys, root: Path) -> list[str]:
    """Run ``immunize data`` on ``root``: exit 1, its ``error:`` lines, and nothing written."""
    before = snapshot(root)
    capsys.readouterr()
    assert main(["data", "--data_root", str(root), "--splits", "false", "--verify_checksums", "false"]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert snapshot(root) == before
    return [line.removeprefix("error: ") for line in out.out.splitlines() if line.startswith("error: ")]


def edit_jsonl(path: Path, row: int, change) -> None:
    """Apply ``change`` to the parsed JSON object on line ``row`` (1-based) and write the file back."""
    lines = path.read_text(encoding="utf-8").splitlines()
    obj = json.loads(lines[row - 1])
    change(obj)
    lines[row - 1] = json.dumps(obj)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ---- the typed-field helper -------------------------------------------------------------------

@pytest.mark.parametrize(("value", "kind", "expected"), [
    ("false", bool, 'must be true or false, got "false"'),
    (0, bool, "must be true or false, got 0"),
    (12, str, "must be a string, got 12"),
    (["a"], str, 'must be a string, got ["a"]'),
    (True, float, "must be a number, got true"),
    ("0.5", float, 'must be a number, got "0.5"'),
    ("{}", dict, 'must be an object, got "{}"'),
    ({"a": 1}, list, 'must be a list, got {"a": 1}'),
])
def test_typed_rejects_what_a_cast_would_accept(value, kind, expected):
    from immunize.data.readers import typed

    with pytest.raises(ImmunizeError) as err:
        typed({"x": value}, "x", kind, "f.jsonl: row 3")
    assert str(err.value) == f"f.jsonl: row 3: field 'x' {expected}"


def test_typed_returns_values_of_the_right_type():
    from immunize.data.readers import typed

    row = {"s": "text", "b": False, "i": 3, "f": 0.5, "d": {}, "l": [], "n": None}
    assert [typed(row, k, kind, "w") for k, kind in
            (("s", str), ("b", bool), ("i", float), ("f", float), ("d", dict), ("l", list))] == \
        ["text", False, 3, 0.5, {}, []]
    assert typed(row, "n", float, "w", optional=True) is None
    assert typed(row, "absent", str, "w", optional=True) is None
    for name in ("n", "absent"):
        with pytest.raises(ImmunizeError, match=rf"^w: missing field\(s\) {name}$"):
            typed(row, name, str, "w")


def test_a_long_or_multiline_value_is_shown_on_one_short_line():
    from immunize.data.readers import typed

    with pytest.raises(ImmunizeError) as err:
        typed({"x": ["line one\nline two " * 30]}, "x", str, "w")
    message = str(err.value)
    assert "\n" not in message and message.endswith("...") and len(message) < 120


# ---- field types in the data files ------------------------------------------------------------

def _set(field, value):
    return lambda row: row.__setitem__(field, value)


def _set_category(name, value):
    return lambda row: row["category"].__setitem__(name, value)


@pytest.mark.parametrize(("change", "expected"), [
    (_set("is_safe", "false"), "field 'is_safe' must be true or false, got \"false\""),
    (_set("is_safe", 0), "field 'is_safe' must be true or false, got 0"),
    (_set("prompt", 12), "field 'prompt' must be a string, got 12"),
    (_set("response", ["an", "answer"]), "field 'response' must be a string, got [\"an\", \"answer\"]"),
    (_set_category("animal_abuse", "yes"), "field 'category' entry 'animal_abuse' must be true or false, "
                                           "got \"yes\""),
    (_set_category("self_harm", 1), "field 'category' entry 'self_harm' must be true or false, got 1"),
])
def test_beavertails_field_types(capsys, small_data_root, change, expected):
    path = small_data_root / QA
    edit_jsonl(path, 5, change)
    assert data_errors(capsys, small_data_root) == [f"{path}: row 5: {expected}"]


def test_the_loaders_check_types_themselves(small_data_root):
    """What `defend`, `attack` and `align` read (``load_splits``) checks too, not only `immunize data`:
    bool("false") would have dropped a harmful row from every split."""
    from immunize.data import load_splits

    edit_jsonl(small_data_root / QA, 3, _set("is_safe", "false"))
    with pytest.raises(ImmunizeError, match=r"^beavertails/qa.jsonl: row 3: field 'is_safe' must be true or false"):
        load_splits(root=small_data_root)


CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
TOXIC = {"type": "toxic_test", "prompt": {"text": "a", "toxicity": 0.9}, "continuation": {"text": "b"}}
MMLU = {"question": "q", "answer": "A", "choices": {"A": "1", "B": "2", "C": "3", "D": "4"}}
TRUTHFUL = {"question": "q", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 0}}


def _bad(row: dict, **changes) -> str:
    return json.dumps({**row, **changes}) + "\n"


@pytest.mark.parametrize(("rel", "text", "expected"), [
    ("beavertails/eval_prompts.jsonl", '{"prompt": "p", "category": 3}\n',
     "row 1: field 'category' must be a string, got 3"),
    ("benign/BenignAlpaca.jsonl", json.dumps(CHAT) + "\n" + _bad(CHAT, messages=[{"role": "user", "content": 5}]),
     "row 2: field 'messages' item 1 'content' must be a string, got 5"),
    ("benign/BenignSafeRLHF.jsonl", _bad(CHAT, messages=["Hi"]),
     "row 1: field 'messages' item 1 must be an object, got \"Hi\""),
    ("harmful_prompts/HarmfulSafeRLHF-100.jsonl", _bad(CHAT, messages={"role": "user"}),
     "row 1: field 'messages' must be a list, got {\"role\": \"user\"}"),
    ("benign/harmless_test.json", '[{"instruction": "a"}, {"instruction": 7}]',
     "row 2: field 'instruction' must be a string, got 7"),
    ("benign/alpaca_eval.json", '[{"instruction": "a", "output": false}]',
     "row 1: field 'output' must be a string, got false"),
    ("decodingtrust/training_dataset.jsonl", _bad(TOXIC, prompt={"text": 5}),
     "row 1: field 'prompt': field 'text' must be a string, got 5"),
    ("decodingtrust/toxic_prompts.jsonl", _bad(TOXIC, continuation={"text": "b", "toxicity": "high"}),
     "row 1: field 'continuation': field 'toxicity' must be a number, got \"high\""),
    ("decodingtrust/nontoxic_prompts.jsonl", _bad(TOXIC, prompt="a"),
     "row 1: field 'prompt' must be an object, got \"a\""),
    ("hh_rlhf/harmless_base_test.jsonl", '{"chosen": ["x"], "rejected": "y"}\n',
     "row 1: field 'chosen' must be a string, got [\"x\"]"),
    ("capability/mmlu/anatomy/test.jsonl", _bad(MMLU, answer="E"),
     "row 1: field 'answer' must be one of A, B, C, D, got 'E'"),
    ("capability/mmlu/anatomy/dev.jsonl", _bad(MMLU, choices={"A": "1", "B": "2", "C": "3", "D": 4}),
     "row 1: field 'choices': field 'D' must be a string, got 4"),
    ("capability/truthfulqa/mc_task.json", json.dumps([{**TRUTHFUL, "mc2_targets": {"a": "1", "b": 0}}]),
     "question 1: mc2_targets needs 0/1 labels with at least one true answer"),
])
def test_field_types_in_every_data_file(capsys, small_data_root, rel, text, expected):
    path = write(small_data_root / rel, text)
    assert data_errors(capsys, small_data_root) == [f"{path}: {expected}"]


# ---- empty and short files ---------------------------------------------------------------------

@pytest.mark.parametrize(("rel", "text"), [
    (QA, ""),
    ("benign/harmless_test.json", "[]"),
    ("benign/BenignAlpaca.jsonl", "\n\n"),
    ("tasks/viggo/valid.csv", "mr,ref\n"),
])
def test_an_empty_file_is_an_error(capsys, small_data_root, rel, text):
    path = write(small_data_root / rel, text)
    assert data_errors(capsys, small_data_root) == [f"{path}: holds no rows"]


def _harmless_root(tmp_path: Path, rows: list[str]) -> Path:
    root = tmp_path / "data"
    write(root / "benign/harmless_test.json", json.dumps([{"instruction": r} for r in rows]))
    return root


def _overrefusal(model, root, out, *extra) -> list:
    return ["evaluate", "--model", model, "--data_root", root, "--output_dir", out, "--sections", "overrefusal",
            "--refusal_judge", "keyword-refusal", "--overrefusal_max_new_tokens", "2", *extra]


def test_overrefusal_on_an_empty_file_is_an_error(fails, tiny_checkpoint, tmp_path):
    root = _harmless_root(tmp_path, [])
    fails(_overrefusal(tiny_checkpoint, root, tmp_path / "eval"), f"{root}/benign/harmless_test.json: holds no rows",
          untouched=[root])


def test_more_prompts_than_the_file_holds_is_an_error(fails, tiny_checkpoint, tmp_path):
    """Before, 2 prompts were scored and reported as the sample of 5 asked for."""
    root = _harmless_root(tmp_path, ["Name a colour.", "Add 2 and 3."])
    fails(_overrefusal(tiny_checkpoint, root, tmp_path / "eval", "--overrefusal_samples", "5"),
          "--overrefusal_samples 5: benign/harmless_test.json has only 2", untouched=[root])


def test_more_mmlu_shots_than_dev_rows_is_an_error(tmp_path):
    from immunize.tasks import materialize

    root = tmp_path / "data"
    for split, n in (("test", 2), ("dev", 3)):
        write(root / f"capability/mmlu/anatomy/{split}.jsonl", (json.dumps(MMLU) + "\n") * n)
    with pytest.raises(ImmunizeError, match=r"^--mmlu_num_fewshot 5: .*/anatomy/dev.jsonl has only 3 rows$"):
        materialize(["mmlu"], root=root, subjects=["anatomy"], mmlu_num_fewshot=5, target=tmp_path / "tasks")
    assert not (tmp_path / "tasks").exists()


def test_an_empty_judge_input_is_an_error(fails, tmp_path):
    source = write(tmp_path / "in" / "answers.jsonl", "")
    fails(["judge", "score", "--judge", "keyword-refusal", "--input", source, "--output", tmp_path / "out" / "s.jsonl"],
          f"{source}: holds no rows to score", untouched=[tmp_path])


# ---- bytes that are not UTF-8 ------------------------------------------------------------------

@pytest.mark.parametrize(("rel", "data", "offset", "reason"), [
    (QA, b'{"prompt": "caf\xe9"}\n', 15, "invalid continuation byte"),
    ("benign/harmless_test.json", b'[{"instruction": "\xff"}]', 18, "invalid start byte"),
    ("refusals/adv_training_behaviors_safe_responses.csv", b"Behavior,Safe_Response\nx,I cannot\x80\n", 33,
     "invalid start byte"),
])
def test_non_utf8_data_file(capsys, small_data_root, rel, data, offset, reason):
    path = write(small_data_root / rel, data)
    assert data_errors(capsys, small_data_root) == [f"{path}: not UTF-8 text (byte {offset}: {reason})"]


def test_non_utf8_byte_offset_counts_earlier_lines(capsys, small_data_root):
    path = small_data_root / QA
    good = path.read_bytes()
    path.write_bytes(good + b'{"prompt": "\xc3("}\n')
    assert data_errors(capsys, small_data_root) == [
        f"{path}: not UTF-8 text (byte {len(good) + 12}: invalid continuation byte)"]


def test_non_utf8_yaml_config(fails, tmp_path):
    config = write(tmp_path / "cfg" / "recipe.yaml", b'defence: repnoise\nalpha: "\xe9"\n')
    fails(["defend", "--config", config], f"{config}: not UTF-8 text (byte 26: invalid continuation byte)",
          untouched=[tmp_path])


def test_non_utf8_judge_input(fails, tmp_path):
    source = write(tmp_path / "in" / "answers.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "\xc3("}\n')
    fails(["judge", "score", "--judge", "keyword-refusal", "--input", source, "--output", tmp_path / "out" / "s.jsonl"],
          f"{source}: not UTF-8 text (byte 45: invalid continuation byte)", untouched=[tmp_path])


def test_non_utf8_results_json(fails, tmp_path):
    results = write(tmp_path / "run" / "results.json", b'{"schema": "immunize-\x80"}')
    fails(["report", "--run_dir", results.parent], f"{results}: not UTF-8 text (byte 21: invalid start byte)",
          untouched=[tmp_path])


# ---- the data root itself ----------------------------------------------------------------------

def test_an_empty_data_root(fails, tmp_path):
    empty = tmp_path / "data"
    (empty / "beavertails").mkdir(parents=True)  # folders, but no file
    fails(["data", "--data_root", empty], f"data root {empty} (--data-root): holds no MANIFEST.json and no data files",
          untouched=[tmp_path])


def test_defend_with_an_empty_data_root(fails, tiny_checkpoint, tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    fails(["defend", "--defence", "safety-sft", "--model", tiny_checkpoint, "--data_root", empty,
           "--output_dir", tmp_path / "runs" / "out"], f"data root {empty} (--data-root): holds no MANIFEST.json",
          untouched=[tmp_path])


def test_a_manifest_listing_nothing(fails, tmp_path):
    root = tmp_path / "data"
    write(root / "MANIFEST.json", "{}")
    fails(["data", "--data_root", root], f"data root {root}: holds no data files", untouched=[tmp_path])


def test_a_manifest_that_is_not_an_object(fails, small_data_root):
    manifest = write(small_data_root / "MANIFEST.json", '["beavertails/qa.jsonl"]')
    fails(["data", "--data_root", small_data_root], f"{manifest}: expected a JSON object of file path → entry object",
          untouched=[small_data_root])
