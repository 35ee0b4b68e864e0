"""A trained judge's model card as Markdown (the JSON card is the source of truth)."""

from __future__ import annotations

from typing import Any

_SHOWN = ("n", "positives", "auroc", "auroc_ci95", "accuracy", "accuracy_ci95", "balanced_accuracy", "f1",
          "spearman", "pearson", "mae", "auroc@0.5", "accuracy@0.5")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list) and len(value) == 2:
        return f"[{_fmt(value[0])}, {_fmt(value[1])}]"
    return str(value)


def _rate(summary: dict[str, Any]) -> str:
    """``0.123 [0.1, 0.15]`` from a ``{"value", "ci95"}`` summary."""
    if summary.get("value") is None:
        return "–"
    return f"{summary['value']:.3f} {_fmt(summary['ci95'])}" if summary.get("ci95") else f"{summary['value']:.3f}"


def _rate_table(title: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"| {title} | n | mean score | judged {{positive}} |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['n']} | {_rate(r['mean'])} | {_rate(r['judged_positive'])} |")
    return lines


def calibration_table(table: dict[str, Any]) -> list[str]:
    lines = ["| score bin | n | mean score | positive rate |", "|---|---|---|---|"]
    for b in table["bins"]:
        lines.append(f"| [{b['low']:.1f}, {b['high']:.1f}) | {b['n']} | {b['mean_score']:.3f} | "
                     f"{b['positive_rate']:.3f} |")
    return [*lines, f"Expected calibration error: {_fmt(table['ece'])}."]


def probes_section(probes: dict[str, Any], positive: str) -> list[str]:
    leak, opposite, unseen = probes["leakage"], probes["opposite"], probes["unseen_beavertails"]

    def table(title: str, rows: dict[str, dict[str, Any]]) -> list[str]:
        return [line.replace("{positive}", positive) for line in _rate_table(title, rows)]

    answers = sorted(leak["by_answer"].items(), key=lambda kv: -(kv[1]["mean"]["value"] or 0))
    return [
        "## Does it score the answer or the prompt?",
        probes["protocol"],
        *([f"Not measured (files absent): {', '.join(probes['missing_files'])}."] if probes["missing_files"] else []),
        "",
        "### Harmless answers under harmful prompts (lower is better)",
        *table("prompts", {"all": leak["all"], "training sources": leak["training_sources"],
                           "other benchmarks": leak["other_benchmarks"], **leak["by_source"]}),
        "",
        *table("answer kind", leak["by_kind"]),
        "",
        "Highest-scored harmless answers (mean over their prompts):",
        "",
        *table("answer", dict(answers[:8])),
        "",
        "### Harmful answers under innocuous prompts (higher is better)",
        *table("prompts", {"all": opposite["all"], **opposite["by_source"],
                           "the same answers under their own prompts": opposite["under_own_prompt"]}),
        "",
        "### BeaverTails answers to prompts never trained on (shipped head)",
        *metrics_table({"unseen_beavertails": {k: v for k, v in unseen.items() if k != "calibration"}}),
        "",
        *calibration_table(unseen["calibration"]),
        "",
    ]


def metrics_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    columns = [c for c in _SHOWN if any(c in m for m in rows.values())]
    lines = ["| subset | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(values.get(c)) for c in columns) + " |")
    return lines


def render_readme(card: dict[str, Any]) -> str:
    heldout = card["heldout"]
    summary = {k: v for k, v in heldout.items() if k not in ("by_source", "components", "calibration")}
    components = heldout.get("components")
    lines = [
        f"# Judge `{card['name']}`",
        "",
        f"{card['description']}. Score in [0, 1]; label = score ≥ {card['threshold']} "
        f"(“{card['positive']}”).",
        "",
        f"Built by `immunize judge train` on {card['created']} (git {card.get('git_revision') or 'n/a'}) "
        f"in {card['training_time_s']['total']} s.",
        "",
        "## Model",
        f"- encoder: `{card['encoder']['identity']}` (frozen)",
        f"- features: {', '.join(card['features'])}",
        f"- head: {card['head']}",
        *([f"- n-grams (score = weighted mean with the head): {card['ngrams']}"] if card.get("ngrams") else []),
        "",
        "## Held-out metrics",
        card["heldout_protocol"] + f". Headline subset: `{card['headline']}`.",
        "",
        *metrics_table(summary),
        "",
        *([f"### Each part alone, on `{card['headline']}`", *metrics_table(components), ""] if components else []),
        "### By source",
        *metrics_table(heldout["by_source"]),
        "",
        *([f"### Calibration (`{card['headline']}`)", *calibration_table(heldout["calibration"]), ""]
          if "calibration" in heldout else []),
        *(probes_section(card["probes"], card["positive"]) if "probes" in card else []),
        "## Training data",
        f"{card['n_examples']} examples from `{card['data_root']}`.",
        "",
        "| source | examples | mean target |",
        "|---|---|---|",
        *(f"| {s} | {c['n']} | {c['mean_target']:.3f} |" for s, c in card["counts"].items()),
        "",
        "| file | sha256 |",
        "|---|---|",
        *(f"| {f} | `{h}` |" for f, h in card["data_files_sha256"].items()),
        "",
    ]
    return "\n".join(lines)
