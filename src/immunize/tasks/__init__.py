"""lm-evaluation-harness task definitions that read the local data root, offline.

The YAML files in this package are templates: ``materialize`` fills in the data files of the
chosen data root (and the MMLU subjects and shots), writes them into a cache directory keyed by
the content of everything they depend on, and returns the directory to pass to
``lm_eval.tasks.TaskManager(include_path=...)``. TruthfulQA's ``mc_task.json`` stores targets as
``{answer: label}`` objects; it is converted once into the ``{choices, labels}`` layout that the
harness's TruthfulQA prompts expect. Datasets are loaded by the ``json`` builder (no hub access),
with their Arrow cache inside the same directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from immunize.data.readers import read_table, typed
from immunize.errors import ImmunizeError
from immunize.io import publish_dir, read_json
from immunize.locks import cache_lock
from immunize.paths import cache_dir, data_root

CAPABILITY_TASKS: dict[str, str] = {
    "mmlu": "immunize_mmlu",
    "truthfulqa_mc1": "immunize_truthfulqa_mc1",
    "truthfulqa_mc2": "immunize_truthfulqa_mc2",
}
MMLU_DIR = "capability/mmlu"
TRUTHFULQA_FILE = "capability/truthfulqa/mc_task.json"
MMLU_LETTERS = ("A", "B", "C", "D")  # the choices mmlu_subject.yaml shows and scores
_TEMPLATES = ("mmlu_subject.yaml", "mmlu_group.yaml", "truthfulqa_mc1.yaml", "truthfulqa_mc2.yaml")


@dataclass(frozen=True)
class MaterializedTasks:
    include_path: Path  # for TaskManager(include_path=...)
    task_names: dict[str, str]  # our short name (mmlu, truthfulqa_mc1, ...) → lm-eval task/group name
    subjects: tuple[str, ...]  # MMLU subjects in the group (empty without mmlu)
    fingerprint: str  # content hash of templates, data files and choices


def _template(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _fill(text: str, values: dict[str, object]) -> str:
    """Replace ``@KEY@`` fields: strings as they are, paths and lists as JSON (which YAML reads as is)."""
    for key, value in values.items():
        if isinstance(value, Path):
            value = str(value)
            text = text.replace(f"@{key}@", json.dumps(value))
        else:
            text = text.replace(f"@{key}@", value if isinstance(value, str) else json.dumps(value))
    if leftover := re.findall(r"@[A-Z_]+@", text):
        raise AssertionError(f"unfilled template fields {leftover}")
    return text


def mmlu_subjects(root: Path) -> list[str]:
    base = root / MMLU_DIR
    if not base.is_dir():
        raise ImmunizeError(f"{base}: MMLU data not found under the data root")
    return sorted(p.name for p in base.iterdir() if p.is_dir() and (p / "test.jsonl").is_file())


def check_mmlu_subject(directory: Path, num_fewshot: int = 0) -> None:
    """Every row of a subject's ``test.jsonl`` and ``dev.jsonl`` as the MMLU template reads it, and
    enough ``dev`` rows for the shots: lm-eval would fail deep inside, or quietly use fewer."""
    for split in ("test", "dev"):
        path = directory / f"{split}.jsonl"
        rows = read_table(path)
        for i, row in enumerate(rows):
            check_mmlu_row(row, f"{path}: row {i + 1}")
        if split == "dev" and num_fewshot > len(rows):
            raise ImmunizeError(f"--mmlu_num_fewshot {num_fewshot}: {path} has only {len(rows)} rows")


def check_mmlu_row(row: dict, where: str) -> None:
    typed(row, "question", str, where)
    if typed(row, "answer", str, where) not in MMLU_LETTERS:
        raise ImmunizeError(f"{where}: field 'answer' must be one of {', '.join(MMLU_LETTERS)}, got {row['answer']!r}")
    choices = typed(row, "choices", dict, where)
    for letter in MMLU_LETTERS:
        typed(choices, letter, str, f"{where}: field 'choices'")


def _file_digest(path: Path) -> str:
    if not path.is_file():
        raise ImmunizeError(f"{path}: file not found (capability data)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert_truthfulqa(source: Path) -> list[dict]:
    """``mc_task.json`` rows → ``{"question", "mc1_targets": {"choices", "labels"}, "mc2_targets": ...}``."""
    data = read_json(source)
    if not isinstance(data, list) or not data:
        raise ImmunizeError(f"{source}: expected a non-empty JSON list of questions")
    rows = []
    for i, item in enumerate(data):
        where = f"{source}: question {i + 1}"
        if not isinstance(item, dict) or "question" not in item:
            raise ImmunizeError(f"{where}: missing field question")
        row = {"question": typed(item, "question", str, where)}
        for field in ("mc1_targets", "mc2_targets"):
            targets = item.get(field)
            if not isinstance(targets, dict) or not targets:
                raise ImmunizeError(f"{where}: {field} must be a non-empty object of answer → 0/1")
            labels = list(targets.values())
            # Exactly the integers 0 and 1: int() would read "1", 1.5 or true as a label.
            if 1 not in labels or any(type(v) is not int or v not in (0, 1) for v in labels):
                raise ImmunizeError(f"{where}: {field} needs 0/1 labels with at least one true answer")
            row[field] = {"choices": [str(k) for k in targets], "labels": labels}
        if row["mc1_targets"]["labels"].count(1) != 1:
            raise ImmunizeError(f"{where}: mc1_targets must have exactly one true answer")
        rows.append(row)
    return rows


def materialize(
    tasks: list[str],
    *,
    root: str | Path | None = None,
    subjects: list[str] | None = None,
    mmlu_num_fewshot: int = 0,
    target: str | Path | None = None,
) -> MaterializedTasks:
    """Write the task YAMLs for ``tasks`` (keys of CAPABILITY_TASKS) and return where they are."""
    unknown = [t for t in tasks if t not in CAPABILITY_TASKS]
    if unknown:
        raise ImmunizeError(
            f"--capability_tasks: unknown task(s) {', '.join(unknown)} (known: {', '.join(CAPABILITY_TASKS)})"
        )
    base = data_root(root)
    chosen: list[str] = []
    if "mmlu" in tasks:
        available = mmlu_subjects(base)
        chosen = available if not subjects or subjects == ["all"] else list(dict.fromkeys(subjects))
        missing = [s for s in chosen if s not in available]
        if missing:
            raise ImmunizeError(
                f"--mmlu_subjects: unknown subject(s) {', '.join(missing)} "
                f"(under {base / MMLU_DIR}: {', '.join(available)})"
            )
        for subject in chosen:
            check_mmlu_subject(base / MMLU_DIR / subject, mmlu_num_fewshot)
    want_tqa = any(t.startswith("truthfulqa") for t in tasks)
    digests = {name: hashlib.sha256(_template(name).encode()).hexdigest() for name in _TEMPLATES}
    for subject in chosen:
        for split in ("test", "dev"):
            digests[f"{subject}/{split}"] = _file_digest(base / MMLU_DIR / subject / f"{split}.jsonl")
    if want_tqa:
        digests["truthfulqa"] = _file_digest(base / TRUTHFULQA_FILE)
    key = hashlib.sha256(
        json.dumps(
            {"digests": digests, "tasks": sorted(tasks), "subjects": chosen, "shots": mmlu_num_fewshot},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    out = Path(target) if target else cache_dir() / "lm_eval_tasks" / key
    names = {t: CAPABILITY_TASKS[t] for t in tasks}
    result = MaterializedTasks(out, names, tuple(chosen), key)
    if not (out / "complete").is_file():
        # Another run on this machine may be writing the same files: wait for it, then reuse them.
        with cache_lock(out, "the lm-eval task files"):
            if not (out / "complete").is_file():
                _write_tasks(out, key, base, chosen, want_tqa, mmlu_num_fewshot)
    return result


def _write_tasks(out: Path, key: str, base: Path, chosen: list[str], want_tqa: bool, mmlu_num_fewshot: int) -> None:
    """The task YAMLs (and converted TruthfulQA rows) into a staging directory, then swapped in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        # The YAMLs name their final location, not the staging directory.
        datasets_cache = out / "hf_datasets"
        for subject in chosen:
            text = _fill(
                _template("mmlu_subject.yaml"),
                {
                    "SUBJECT": subject,
                    "SUBJECT_TEXT": subject.replace("_", " "),
                    "NUM_FEWSHOT": mmlu_num_fewshot,
                    "TEST_FILE": base / MMLU_DIR / subject / "test.jsonl",
                    "DEV_FILE": base / MMLU_DIR / subject / "dev.jsonl",
                    "DATASETS_CACHE": datasets_cache,
                },
            )
            (staging / f"mmlu_{subject}.yaml").write_text(text, encoding="utf-8")
        if chosen:
            group = _fill(_template("mmlu_group.yaml"), {"TASKS": [f"immunize_mmlu_{s}" for s in chosen]})
            (staging / "mmlu_group.yaml").write_text(group, encoding="utf-8")
        if want_tqa:
            converted = staging / "truthfulqa_mc.jsonl"
            converted.write_text(
                "".join(
                    json.dumps(r, ensure_ascii=False) + "\n"
                    for r in convert_truthfulqa(base / TRUTHFULQA_FILE)
                ),
                encoding="utf-8",
            )
            (staging / "truthfulqa_mc1.yaml").write_text(
                _fill(
                    _template("truthfulqa_mc1.yaml"),
                    {"TRUTHFULQA_FILE": out / "truthfulqa_mc.jsonl", "DATASETS_CACHE": datasets_cache},
                ),
                encoding="utf-8",
            )
            (staging / "truthfulqa_mc2.yaml").write_text(_template("truthfulqa_mc2.yaml"), encoding="utf-8")
        (staging / "complete").write_text(key)
        publish_dir(staging, out)  # replaces an incomplete earlier attempt
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
