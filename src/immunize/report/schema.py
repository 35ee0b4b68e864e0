"""Load and validate ``results.json`` (schema ``immunize.results/1``, documented in SCHEMA.md).

Validation is structural: the version, the required sections and the type of every value the
report reads. A problem raises ``ImmunizeError`` naming the file and the JSON path at fault, so a
hand-edited or truncated file never produces a half-drawn report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from immunize.errors import ImmunizeError
from immunize.io import read_json

SCHEMA_VERSION = "immunize.results/1"
REQUIRED = ("schema", "run", "defences", "budgets", "harmfulness")
OPTIONAL_DICTS = ("settings", "models", "defence_info", "generalization", "curves", "stability", "trainability",
                  "toxicity", "analysis", "training", "search", "attack_records")
# A search's result (immunize.attacks.search.search_result) says how it ended.
SEARCH_STATUSES = ("worst_case", "no_feasible_trial", "no_capability")
OPTIONAL_LISTS = ("samples", "verdict", "comparisons", "budget_groups")


_JSON_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
               int: "number", float: "number"}


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, message: str):
        raise ImmunizeError(f"{self.source}: {where}: {message}")

    def kind(self, value: Any, expected: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            types = expected if isinstance(expected, tuple) else (expected,)
            names = " or ".join(_JSON_NAMES.get(t, t.__name__) for t in types)
            self.fail(where, f"expected {names}, got {_JSON_NAMES.get(type(value), type(value).__name__)}")
        return value

    def number(self, value: Any, where: str, *, optional: bool = False) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, f"expected a number, got {type(value).__name__}")
        if not math.isfinite(value) and not optional:
            self.fail(where, f"expected a finite number, got {value}")

    def interval(self, value: Any, where: str) -> None:
        if value is None:
            return
        if not isinstance(value, list) or len(value) != 2:
            self.fail(where, "expected a [low, high] pair or null")
        for i, bound in enumerate(value):
            self.number(bound, f"{where}[{i}]", optional=True)

    def examples(self, value: Any, where: str) -> None:
        """Per-example outcomes: ``[key, value]`` or ``[key, value, weight]`` (see SCHEMA.md)."""
        if value is None:
            return
        for i, entry in enumerate(self.kind(value, list, where)):
            if not isinstance(entry, list) or len(entry) not in (2, 3) or not isinstance(entry[0], str):
                self.fail(f"{where}[{i}]", "expected a [key, value] or [key, value, weight] array with a string key")
            for j, number in enumerate(entry[1:], 1):
                self.number(number, f"{where}[{i}][{j}]")
            if len(entry) == 3 and entry[2] <= 0:
                self.fail(f"{where}[{i}][2]", f"a weight must be positive, got {entry[2]}")

    def cell(self, value: Any, where: str) -> None:
        self.kind(value, dict, where)
        self.number(value.get("mean"), f"{where}.mean")
        self.interval(value.get("ci"), f"{where}.ci")
        self.examples(value.get("examples"), f"{where}.examples")
        for key in ("fraction_harmful", "refusal_rate", "fraction_toxic", "gated", "refusal_gate"):
            if value.get(key) is not None:
                self.number(value[key], f"{where}.{key}")
        if value.get("per_category") is not None:
            for category, entry in self.kind(value["per_category"], dict, f"{where}.per_category").items():
                self.kind(entry, dict, f"{where}.per_category.{category}")
                self.number(entry.get("mean"), f"{where}.per_category.{category}.mean")

    def cells(self, value: Any, where: str) -> None:
        for defence, cells in self.kind(value, dict, where).items():
            for key, cell in self.kind(cells, dict, f"{where}.{defence}").items():
                self.cell(cell, f"{where}.{defence}.{key}")

    def metric(self, value: Any, where: str) -> None:
        self.kind(value, dict, where)
        self.number(value.get("value"), f"{where}.value")
        self.interval(value.get("ci"), f"{where}.ci")
        self.examples(value.get("examples"), f"{where}.examples")


def validate_results(results: Any, source: str | Path = "results.json") -> dict:
    """Check ``results`` against ``immunize.results/1``; return it unchanged or raise ``ImmunizeError``."""
    check = _Checker(str(source))
    check.kind(results, dict, "top level")
    version = results.get("schema")
    if version != SCHEMA_VERSION:
        check.fail("schema", f"{version!r} is not {SCHEMA_VERSION!r}, the version this immunize reads")
    for key in REQUIRED:
        if key not in results:
            check.fail(key, "required section missing")
    run = check.kind(results["run"], dict, "run")
    check.kind(run.get("name", ""), str, "run.name")
    if run.get("wall_seconds") is not None:
        check.number(run["wall_seconds"], "run.wall_seconds")
    defences = check.kind(results["defences"], list, "defences")
    for i, defence in enumerate(defences):
        check.kind(defence, str, f"defences[{i}]")
    if len(set(defences)) != len(defences):
        check.fail("defences", "duplicate defence names")
    ids = []
    for i, budget in enumerate(check.kind(results["budgets"], list, "budgets")):
        check.kind(budget, dict, f"budgets[{i}]")
        ids.append(check.kind(budget.get("id"), str, f"budgets[{i}].id"))
        for key in ("learning_rate", "num_samples", "epochs", "steps"):
            if budget.get(key) is not None:
                check.number(budget[key], f"budgets[{i}].{key}")
        if budget.get("group") is not None:
            check.kind(budget["group"], str, f"budgets[{i}].group")
        if budget.get("searched") is not None:
            check.kind(budget["searched"], bool, f"budgets[{i}].searched")
    if len(set(ids)) != len(ids):
        check.fail("budgets", "duplicate budget ids")
    if results.get("budget_groups") is not None:
        _check_groups(check, check.kind(results["budget_groups"], list, "budget_groups"), results["budgets"])
    check.cells(results["harmfulness"], "harmfulness")
    if results.get("baseline") is not None:
        check.kind(results["baseline"], str, "baseline")
        if results["baseline"] not in defences:
            check.fail("baseline", f"{results['baseline']!r} is not one of the defences")
    for label, info in (results.get("defence_info") or {}).items():
        check.kind(info, dict, f"defence_info.{label}")
        check.kind(info.get("defence"), str, f"defence_info.{label}.defence")
        if info.get("keeps_capability") is not None:
            check.kind(info["keeps_capability"], bool, f"defence_info.{label}.keeps_capability")

    for key in OPTIONAL_DICTS:
        if results.get(key) is not None:
            check.kind(results[key], dict, key)
    for key in OPTIONAL_LISTS:
        if results.get(key) is not None:
            check.kind(results[key], list, key)
    if (settings := results.get("settings")) is not None:
        for key in ("phi", "epsilon"):
            if settings.get(key) is not None:
                check.number(settings[key], f"settings.{key}")
    if (generalization := results.get("generalization")) and generalization.get("cells") is not None:
        check.cells(generalization["cells"], "generalization.cells")
    for defence, per_budget in (results.get("curves") or {}).items():
        for budget, points in check.kind(per_budget, dict, f"curves.{defence}").items():
            for i, point in enumerate(check.kind(points, list, f"curves.{defence}.{budget}")):
                where = f"curves.{defence}.{budget}[{i}]"
                check.kind(point, dict, where)
                check.number(point.get("step"), f"{where}.step")
                check.number(point.get("harmfulness"), f"{where}.harmfulness")
    for defence, metrics in (results.get("stability") or {}).items():
        for metric, entry in check.kind(metrics, dict, f"stability.{defence}").items():
            check.metric(entry, f"stability.{defence}.{metric}")
    if (trainability := results.get("trainability")) and trainability.get("cells") is not None:
        for model, metrics in check.kind(trainability["cells"], dict, "trainability.cells").items():
            for metric, entry in check.kind(metrics, dict, f"trainability.cells.{model}").items():
                check.metric(entry, f"trainability.cells.{model}.{metric}")
    for defence, cells in (results.get("toxicity") or {}).items():
        for key, cell in check.kind(cells, dict, f"toxicity.{defence}").items():
            check.cell(cell, f"toxicity.{defence}.{key}")
    _check_analysis(check, results.get("analysis") or {})
    budget_ids = {b.get("id") for b in results["budgets"]}
    for defence, records in (results.get("attack_records") or {}).items():
        for budget, record in check.kind(records, dict, f"attack_records.{defence}").items():
            if budget not in budget_ids:
                check.fail(f"attack_records.{defence}.{budget}", "not a budget of this run")
            check.kind(record, dict, f"attack_records.{defence}.{budget}")
    for defence, search in (results.get("search") or {}).items():
        _check_search(check, search, results, f"search.{defence}")
    for defence, logs in (results.get("training") or {}).items():
        for key, entry in check.kind(logs, dict, f"training.{defence}").items():
            if key == "paired_refusals":
                _check_refusals(check, entry, f"training.{defence}.{key}")
                continue
            for name, value in check.kind(entry, dict, f"training.{defence}.{key}").items():
                check.number(value, f"training.{defence}.{key}.{name}")
    for i, sample in enumerate(results.get("samples") or []):
        check.kind(sample, dict, f"samples[{i}]")
        for key in ("model", "prompt", "response"):
            check.kind(sample.get(key), str, f"samples[{i}].{key}")
        if sample.get("harmfulness") is not None:
            check.number(sample["harmfulness"], f"samples[{i}].harmfulness", optional=True)
    for i, row in enumerate(results.get("verdict") or []):
        check.kind(row, dict, f"verdict[{i}]")
        check.kind(row.get("defence"), str, f"verdict[{i}].defence")
    for i, entry in enumerate(results.get("comparisons") or []):
        _check_comparison(check, entry, defences, f"comparisons[{i}]")
    return results


def _check_groups(check: _Checker, groups: list, budgets: list[dict]) -> None:
    """``budget_groups``: every budget in exactly one group, the one its ``group`` names."""
    group_of: dict[str, str] = {}
    for i, group in enumerate(groups):
        where = f"budget_groups[{i}]"
        check.kind(group, dict, where)
        gid = check.kind(group.get("id"), str, f"{where}.id")
        check.kind(group.get("label"), str, f"{where}.label")
        members = check.kind(group.get("budgets"), list, f"{where}.budgets")
        seeds = check.kind(group.get("seeds"), list, f"{where}.seeds")
        if not members or len(seeds) != len(members):
            check.fail(where, "expected one seed per budget, and at least one budget")
        for j, bid in enumerate(members):
            if check.kind(bid, str, f"{where}.budgets[{j}]") in group_of:
                check.fail(f"{where}.budgets[{j}]", f"{bid!r} is also in group {group_of[bid]!r}")
            group_of[bid] = gid
    if len({g["id"] for g in groups}) != len(groups):
        check.fail("budget_groups", "duplicate group ids")
    for i, budget in enumerate(budgets):
        if budget["id"] not in group_of:
            check.fail("budget_groups", f"budget {budget['id']!r} is in no group")
        if budget.get("group") not in (None, group_of[budget["id"]]):
            check.fail(f"budgets[{i}].group", f"{budget['group']!r}, but budget_groups puts it in "
                                              f"{group_of[budget['id']]!r}")
    if unknown := sorted(set(group_of) - {b["id"] for b in budgets}):
        check.fail("budget_groups", f"no budget {unknown[0]!r} in budgets")


def _check_search(check: _Checker, search: Any, results: dict, where: str) -> None:
    """``search.<defence>``: a search result and the searched budgets its best trial was re-run as,
    each a searched budget of ``budgets`` in the group ``group`` names."""
    if where.removeprefix("search.") not in results["defences"]:
        check.fail(where, f"{where.removeprefix('search.')!r} is not one of the defences")
    check.kind(search, dict, where)
    status = check.kind(search.get("status"), str, f"{where}.status")
    if status not in SEARCH_STATUSES:
        check.fail(f"{where}.status", f"{status!r} is not one of {', '.join(SEARCH_STATUSES)}")
    for i, trial in enumerate(check.kind(search.get("trials") or [], list, f"{where}.trials")):
        at = f"{where}.trials[{i}]"
        check.kind(trial, dict, at)
        check.number(trial.get("number"), f"{at}.number")
        check.kind(trial.get("params") or {}, dict, f"{at}.params")
        if (harm := trial.get("harmfulness")) is not None:
            check.number(check.kind(harm, dict, f"{at}.harmfulness").get("mean"), f"{at}.harmfulness.mean")
            check.interval(harm.get("ci95"), f"{at}.harmfulness.ci95")
        for key in ("wall_seconds", "train_seconds"):
            check.number(trial.get(key), f"{at}.{key}", optional=True)
    best = search.get("best")
    if status == "worst_case":
        check.kind(best, dict, f"{where}.best")
    by_id = {b["id"]: b for b in results["budgets"]}
    groups = {g.get("id") for g in results.get("budget_groups") or []}
    for i, budget in enumerate(check.kind(search.get("budgets") or [], list, f"{where}.budgets")):
        at = f"{where}.budgets[{i}]"
        check.kind(budget, dict, at)
        bid = check.kind(budget.get("id"), str, f"{at}.id")
        if not (by_id.get(bid) or {}).get("searched"):
            check.fail(f"{at}.id", f"{bid!r} is not a searched budget of budgets")
        check.number(budget.get("steps"), f"{at}.steps", optional=True)
        check.kind(budget.get("params") or {}, dict, f"{at}.params")
        if results.get("budget_groups") is not None and search.get("group") not in groups:
            check.fail(f"{where}.group", f"{search.get('group')!r} is not one of budget_groups")


def _check_comparison(check: _Checker, entry: Any, defences: list[str], where: str) -> None:
    check.kind(entry, dict, where)
    for side in ("a", "b"):
        if check.kind(entry.get(side), str, f"{where}.{side}") not in defences:
            check.fail(f"{where}.{side}", f"{entry[side]!r} is not one of the defences")
    for key in ("margin", "min_harm_prompts", "min_pairs"):
        if entry.get(key) is not None:
            check.number(entry[key], f"{where}.{key}")
    for j, row in enumerate(check.kind(entry.get("rows"), list, f"{where}.rows")):
        at = f"{where}.rows[{j}]"
        check.kind(row, dict, at)
        for key in ("section", "key", "reading"):
            check.kind(row.get(key), str, f"{at}.{key}")
        for side in ("a", "b"):
            check.number(row.get(side), f"{at}.{side}")
        if (paired := row.get("paired")) is not None:
            check.kind(paired, dict, f"{at}.paired")
            check.number(paired.get("n"), f"{at}.paired.n")
            check.number(paired.get("difference"), f"{at}.paired.difference", optional=True)
            check.interval(paired.get("ci"), f"{at}.paired.ci")


def _check_refusals(check: _Checker, summary: Any, where: str) -> None:
    """``training.<defence>.paired_refusals``: the counts the report words (``immunize.data.paired_refusals``)."""
    check.kind(summary, dict, where)
    check.kind(summary.get("source"), str, f"{where}.source")
    for key in ("prompts", "kept", "kept_fraction", "dropped"):
        check.number(summary.get(key), f"{where}.{key}", optional=True)
    for step, count in check.kind(summary.get("fell_back") or {}, dict, f"{where}.fell_back").items():
        check.number(count, f"{where}.fell_back.{step}")
    if (on_topic := summary.get("on_topic")) is not None:
        check.kind(on_topic, dict, f"{where}.on_topic")
        for key in ("paired", "shuffled", "difference"):
            check.number(on_topic.get(key), f"{where}.on_topic.{key}", optional=True)


def _check_analysis(check: _Checker, analysis: dict) -> None:
    distances = check.kind(analysis.get("weight_distance") or {}, dict, "analysis.weight_distance")
    for label, rows in distances.items():
        for i, row in enumerate(check.kind(rows, list, f"analysis.weight_distance.{label}")):
            check.kind(row, dict, f"analysis.weight_distance.{label}[{i}]")
            check.kind(row.get("layer"), str, f"analysis.weight_distance.{label}[{i}].layer")
            check.number(row.get("l2"), f"analysis.weight_distance.{label}[{i}].l2")
    for key, values in check.kind(analysis.get("logit_lens") or {}, dict, "analysis.logit_lens").items():
        for i, value in enumerate(check.kind(values, list, f"analysis.logit_lens.{key}")):
            check.number(value, f"analysis.logit_lens.{key}[{i}]")
    if pca := analysis.get("pca"):
        check.kind(pca, dict, "analysis.pca")
        for key in ("layers", "models"):
            check.kind(pca.get(key), list, f"analysis.pca.{key}")
        for model, per_layer in check.kind(pca.get("points"), dict, "analysis.pca.points").items():
            for layer, groups in check.kind(per_layer, dict, f"analysis.pca.points.{model}").items():
                check.kind(groups, dict, f"analysis.pca.points.{model}.{layer}")
                for group in ("harmful", "harmless"):
                    where = f"analysis.pca.points.{model}.{layer}.{group}"
                    for j, point in enumerate(check.kind(groups.get(group), list, where)):
                        if not isinstance(point, list) or len(point) != 2:
                            check.fail(f"{where}[{j}]", "expected an [x, y] pair")


def load_results(path: str | Path) -> dict:
    """Read and validate ``results.json`` (a run directory works too); errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    return validate_results(read_json(path), path)
