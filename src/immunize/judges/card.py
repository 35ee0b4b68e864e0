"""A trained judge's model card as Markdown (the JSON card is the source of truth)."""

from __future__ import annotations

from typing import Any

_SHOWN = ("n", "positives", "auroc", "accuracy", "balanced_accuracy", "f1", "spearman", "pearson", "mae",
          "auroc@0.5", "accuracy@0.5")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def metrics_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    columns = [c for c in _SHOWN if any(c in m for m in rows.values())]
    lines = ["| subset | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(values.get(c)) for c in columns) + " |")
    return lines


def render_readme(card: dict[str, Any]) -> str:
    heldout = card["heldout"]
    summary = {k: v for k, v in heldout.items() if k not in ("by_source", "components")}
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
