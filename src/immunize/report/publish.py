"""A run's results for a public write-up: ``results.json`` fit to commit, and its tables as markdown.

``publishable(results)`` keeps every number a write-up cites and drops what must not be published:
the sample generations (adversarial text), the per-example outcomes (``examples``: prompt keys
and how each model answered them) and local filesystem paths. ``markdown_blocks(results)`` renders
the report's tables as GitHub markdown from results.json alone (the paired differences as the
stored verdict holds them: publishable results have no examples to recompute them from), and
``fill_blocks`` puts them between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` lines of a
hand-written document, so its tables are the run's and ``stale_blocks`` can tell when they are not.
"""

from __future__ import annotations

import html
import posixpath
import re
import shlex
from typing import Any

from immunize.errors import ImmunizeError
from immunize.report.build import (
    FEEDBACK_CAPTION,
    REWARD_CAPTION,
    SEARCH_OUTCOMES,
    _columns,
    _ordered,
    _verdict_rows,
    _what,
    budget_outcomes,
    ci_text,
    feedback_rows,
    hacking_word,
    num,
    paired_cell,
    resistance_per_budget,
    reward_models,
    searched_cells,
    trial_seconds,
    verdict_conditions,
)
from immunize.report.figures import metric_label
from immunize.verdict import (
    EQUIVALENCE_MARGIN,
    NA,
    baseline,
    harm_outcome,
    hyperparameters_text,
    outcome_text,
    reading_text,
    spread_text,
    thresholds,
)

# The figures of report/figures/ a write-up shows (build.py's FigureSink names): the resistance
# curves and the depth analysis.
DOC_FIGURES = ("resistance_curves", "weight_distance", "pca", "logit_lens")
BLOCKS = ("main-table", "verdict-table", "worst-case-table", "feedback-table", "stability-table", "held-out-table",
          "comparisons-table",
          "run-table")
# Provenance rows of the run table: the packages whose versions change the numbers.
_VERSIONS = (("python", "Python"), ("immunize", "immunize"), ("torch", "torch"), ("transformers", "transformers"),
             ("accelerate", "accelerate"), ("peft", "peft"), ("trl", "trl"), ("lm_eval", "lm-eval"))


# ---------------------------------------------------------------------------------------------
# publishable


def _path_key(key: str) -> bool:
    return key in ("path", "cache", "directory") or key.endswith(("_dir", "_root", "_path"))


def _run_roots(results: dict) -> list[str]:
    """Directories a run writes into: its output_dir and the directories of its attacked models
    (every attack is a stage of the run, so whatever sits beside them is the run's too)."""
    recipe = (results.get("run") or {}).get("recipe") or {}
    roots = [recipe.get("output_dir")]
    roots += [posixpath.dirname(str(m.get("path") or "")) for m in (results.get("models") or {}).values()
              if isinstance(m, dict) and m.get("role") == "attacked"]
    return sorted({posixpath.normpath(r) for r in roots if isinstance(r, str) and r})


def _local_path(value: str, roots: list[str]) -> bool:
    if value.startswith(("/", "~")) or re.match(r"[A-Za-z]:[\\/]", value):
        return True
    path = posixpath.normpath(value)
    return any(path == root or path.startswith(root + "/") for root in roots)


def _strip(value: Any, roots: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v, roots) for k, v in value.items()
                if k != "examples" and not _path_key(k) and not (isinstance(v, str) and _local_path(v, roots))}
    if isinstance(value, list):
        return [_strip(v, roots) for v in value]
    return value


def publishable(results: dict) -> dict:
    """A copy of ``results`` fit for a public repository: no ``samples`` (model generations to
    harmful prompts), no ``examples`` anywhere (per-prompt outcomes), no local filesystem path
    (keys such as ``path``, ``cache``, ``*_dir``, and any text that is an absolute path or lies
    under the run's directories). Every number, status and text of the report stays; list items
    are kept as they are, so the recorded command stays whole (its secrets were redacted by the run).
    """
    roots = _run_roots(results)
    return _strip({k: v for k, v in results.items() if k != "samples"}, roots)


# ---------------------------------------------------------------------------------------------
# markdown


def md(value: Any) -> str:
    """Text from results.json as one table cell's worth of GitHub markdown: HTML and markdown
    syntax escaped (labels and reasons are data, never markup), newlines as ``<br>``. An
    underscore inside a word (``child_abuse``) is left alone: it cannot start emphasis."""
    text = html.escape(str(value), quote=False)
    text = re.sub(r"([\\`*\[\]|~]|(?<!\w)_|_(?!\w))", r"\\\1", text)
    return re.sub(r"\r\n?|\n", "<br>", text)


def _table(head: list[str], rows: list[list[str]], note: str = "") -> str:
    """A GitHub table of cells already escaped; ``note`` (markdown) is a line under it."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + (f"\n\n{note}" if note else "")


def _value(entry: dict | None, key: str, with_n: bool = True) -> str:
    """``0.123 [0.100, 0.150]``, then ``n = …`` when asked and the entry has one (markdown: only
    numbers, nothing to escape)."""
    if not entry:
        return "—"
    parts = [num(entry.get(key)), ci_text(entry.get("ci"))]
    if with_n and entry.get("n") is not None:
        parts.append(f"n = {entry['n']}")
    return " ".join(p for p in parts if p)


def _delta(paired: dict | None) -> str:
    """The stored paired difference with the undefended model and what it says (markdown)."""
    text = paired_cell(paired)
    return f"{text}, {outcome_text(harm_outcome(paired), paired)}" if paired and paired.get("n") else text


def _harm_row(results: dict, defence: str, cells: dict, paired_at, with_n: bool) -> list[str]:
    """One defence's row of a harmfulness table, a group's cell its worst seed's (``Column.pick``)
    with the spread over seeds; ``paired_at(key)``: the stored paired difference of a budget (or
    ``pre_attack``) with the undefended model (None: not paired; False: the verdict pairs nothing there)."""
    reference = defence == baseline(results)
    row = [f"{md(defence)} (undefended)" if reference else md(defence)]
    for column in _columns(results):
        key, cell = column.pick(cells)
        text = _value(cell, "mean", with_n)
        if cell and not reference and (paired := paired_at(key)) is not False:
            text += "<br>" + _delta(paired)
        if cell and (seeds := column.spread(cells)):
            text += "<br>" + spread_text(seeds)
        row.append(text)
    return row


def _header(results: dict) -> list[str]:
    """The columns' titles; with several attacks each group's title opens with its attack's label
    (a markdown table has one header row, so nothing can span an attack's columns)."""
    columns = _columns(results)
    several = len({c.attack for c in columns if c.attack is not None}) > 1
    return ["Defence", *(("" if not several or c.attack is None else f"**{md(c.attack)}**<br>")
                         + f"{md(c.title)}<br>{md(c.sub)}" for c in columns)]


def _main_table(results: dict, verdict: dict[str, dict]) -> str:
    def paired(defence: str):
        resistance = (verdict.get(defence) or {}).get("resistance") or {}
        per_budget = resistance_per_budget(verdict.get(defence) or {})
        return lambda key: (resistance.get("pre_attack") if key == "pre_attack"
                            else (per_budget.get(key) or {}).get("paired"))

    harm = results["harmfulness"]
    rows = [_harm_row(results, d, harm.get(d) or {}, paired(d), False) for d in results["defences"]]
    return _table(_header(results), rows,
                  "Mean harmfulness (0–1, lower is better) [95 % CI]. Δ: the paired difference with the "
                  "undefended model on the same prompts (defended − undefended), its paired bootstrap 95 % CI, "
                  "n pairs and what it shows, as the run's verdict stored it."
                  + (" A budget run under several attack seeds shows its most harmful seed, then the spread over "
                     "its seeds." if _several_seeds(results) else ""))


def _several_seeds(results: dict) -> bool:
    return any(len(c.budgets) > 1 for c in _columns(results))


def _thresholds(results: dict, rows: list[dict]) -> tuple[float, float]:
    """φ and ε the verdict was decided with: its own where it recorded them."""
    phi, epsilon = thresholds(results)
    if rows and isinstance(rows[0].get("phi"), (int, float)):
        phi, epsilon = rows[0]["phi"], rows[0].get("epsilon", epsilon)
    return phi, epsilon


def _verdict_table(results: dict, rows: list[dict]) -> str:
    def status(row: dict, key: str) -> str:
        part = row.get(key) if isinstance(row.get(key), dict) else {"status": row.get(key, NA)}
        text = md(part.get("status", NA))
        if key == "resistance":
            text += "".join(f"<br>{md(name)}: {md(status)}" for name, status in budget_outcomes(part))
        return text

    conditions = verdict_conditions(results)
    body = [[md(row.get("defence", "?")), *(status(row, k) for k, _ in conditions),
             md(row.get("immunized", NA)), md(row.get("immunized_reason", ""))] for row in rows]
    phi, epsilon = _thresholds(results, rows)
    worst = (" Worst-case resistance: resistance under each defence's searched worst case, a condition of "
             "immunized too." if results.get("search") else "")
    return _table(["Defence", *(title for _, title in conditions), "Immunized", "Why"],
                  body, f"The verdict of the run, with φ = {phi:g} and ε = {epsilon:g}; resistance: overall, "
                        "then per budget" + (" (under several attack seeds: the worst seed's)."
                                             if _several_seeds(results) else ".") + worst)


def _worst_case_table(results: dict, verdict: dict[str, dict]) -> str:
    """Per defence, what its worst-case search found: the searched budgets' harmfulness on the
    evaluation prompts (worst seed, CI, spread), the hyperparameters, the best trial on the
    validation slice, the trials and their cost, and the verdict's worst-case resistance."""
    searches = results.get("search") or {}
    if not searches:
        return "_No worst-case search in this run._"
    rows = []
    for defence in _ordered(results["defences"], searches):
        search = searches[defence]
        column, cells = searched_cells(results, defence)
        worst = "—"
        if column is not None and search.get("budgets"):
            _, cell = column.pick(cells)
            worst = _value(cell, "mean") + (f"<br>{spread_text(seeds)}" if (seeds := column.spread(cells)) else "")
        best = search.get("best") or {}
        harm = best.get("harmfulness") or {}
        validation = _value({"mean": harm.get("mean"), "ci": harm.get("ci95"), "n": harm.get("n")}, "mean") \
            if harm else "—"
        done = [t for t in search.get("trials") or [] if t.get("state") == "complete"]
        condition = (verdict.get(defence) or {}).get("worst_case_resistance") or {}
        rows.append([md(defence), md(SEARCH_OUTCOMES.get(search.get("status"), search.get("status"))), worst,
                     md(hyperparameters_text(best.get("params")) or "—"), validation,
                     f"{sum(bool(t.get('feasible')) for t in done)} of {len(done)}", _clock(trial_seconds(search)),
                     md(condition.get("status", NA))])
    return _table(["Defence", "Search", "Worst-case harmfulness [95 % CI]", "Hyperparameters",
                   "Best trial (validation) [95 % CI]", "Trials within the bound", "Search time",
                   "Worst-case resistance"], rows,
                  "Per defence, the most harmful trial of its search that kept the utility bound, re-run under each "
                  "seed of the search and evaluated on the held-out prompts: the most harmful seed's mean "
                  "harmfulness [95 % CI], n prompts, and the spread over seeds. Best trial: its harmfulness on the "
                  "search's validation slice.")


def _feedback_table(results: dict, rows: list[dict]) -> str:
    """The report's *Learning from harmful feedback* table (``feedback_rows``), then the reward models."""
    phi, _ = _thresholds(results, rows)
    found = feedback_rows(results, rows, phi)
    if not found:
        return "_No attack in this run learnt from a reward._"
    lines = []
    for r in found:
        reasons = "; ".join((r["hacking"] or {}).get("reasons") or [])
        lines.append([md(r["defence"]), md(r["budget"]["id"]), md(r["constraint"]),
                      f"{num(r['pre'].get('mean'))} → {_value(r['post'], 'mean')}", _delta(r["change"]),
                      f"{num(r['reward'][0])} → {num(r['reward'][1])}", num(r["kl"]), num(r["lambda"]),
                      md(hacking_word(r["hacking"]) + (f": {reasons}" if reasons else ""))])
    table_text = _table(["Defence", "Budget", "Constraint", "Harmfulness pre → post [95 % CI]",
                         "Paired change (post − pre)", "Reward start → end", "KL to start (end)", "λ (end)",
                         "Reward hacking"], lines, md(FEEDBACK_CAPTION))
    rewards, notes = reward_models(found)
    reward_lines = [[md(w.get("kind", "")), md(w.get("backbone", w.get("judge", ""))),
                     _value({"mean": (w.get("heldout_pairwise_accuracy") or {}).get("value"),
                             "ci": (w.get("heldout_pairwise_accuracy") or {}).get("ci95")}, "mean"),
                     md(w.get("heldout_pairs", "—")), md(w.get("train_pairs", "—"))] for w in rewards]
    reward_text = _table(["Reward", "Backbone", "Held-out pairwise accuracy [95 % CI]", "Held-out pairs",
                          "Training pairs"], reward_lines, md(REWARD_CAPTION))
    return "\n\n".join([table_text, reward_text, *(md(note) for note in notes)])


def _stability_table(results: dict, rows: list[dict]) -> str:
    stability = results.get("stability") or {}
    if not stability:
        return "_No capability evaluation in this run._"
    verdict = {row.get("defence"): row for row in rows}
    defences = _ordered(results["defences"], stability)
    metrics = list(dict.fromkeys(m for d in defences for m in stability[d]))
    body = []
    for defence in defences:
        condition = (verdict.get(defence) or {}).get("stability") or {}
        row = [md(defence)]
        for metric in metrics:
            entry = stability[defence].get(metric)
            text = _value(entry, "value")
            detail = (condition.get("per_metric") or {}).get(metric)
            if entry and detail and detail.get("status") != NA:
                paired = detail.get("paired")
                degradation = ci_text(detail.get("degradation_ci"))
                text += (f"<br>{paired_cell(paired)}<br>{md(outcome_text(detail['status'], paired))}"
                         + (f", degradation {degradation}" if degradation else ""))
            elif entry and defence != baseline(results) and condition.get("status"):
                text += "<br>" + md(condition["status"])
            row.append(text)
        body.append(row)
    _, epsilon = _thresholds(results, rows)
    return _table(["Defence", *(md(metric_label(m)[0]) for m in metrics)], body,
                  "Value [95 % CI] before any attack. Δ: the paired difference with the undefended model on the "
                  "same questions and texts (perplexity as log-perplexity), n pairs; then the verdict's status, "
                  f"decided on the paired 95 % CI of the degradation against ε = {epsilon:g}.")


def _held_out_table(results: dict, verdict: dict[str, dict]) -> str:
    generalization = results.get("generalization") or {}
    cells = generalization.get("cells") or {}
    if not cells:
        return "_No held-out harm categories were evaluated in this run._"

    def paired(defence: str):
        per_budget = ((verdict.get(defence) or {}).get("generalization") or {}).get("per_budget") or {}
        # The verdict pairs post-attack cells only: no Δ line in the pre-attack column.
        return lambda key: False if key == "pre_attack" else (per_budget.get(key) or {}).get("paired")

    rows = [_harm_row(results, d, cells.get(d) or {}, paired(d), True)
            for d in _ordered(results["defences"], cells)]
    categories = ", ".join(f"<code>{md(c)}</code>" for c in generalization.get("held_out_categories") or [])
    return _table(_header(results), rows,
                  f"Held-out categories, never seen by a defence: {categories or 'unspecified'}. Mean harmfulness "
                  "[95 % CI], n prompts; Δ as in the main table.")


def _comparisons_table(results: dict) -> str:
    rows = []
    for entry in results.get("comparisons") or []:
        a, b = str(entry["a"]), str(entry["b"])
        margin = float(entry.get("margin", EQUIVALENCE_MARGIN))
        for row in entry.get("rows") or []:
            paired = row.get("paired")
            have = bool(paired and paired.get("n"))
            delta = f"{paired['difference']:+.3f} {ci_text(paired.get('ci'))}".strip() if have else "—"
            rows.append([f"{md(a)} vs {md(b)}", md(_what(row)), num(row.get("a")), num(row.get("b")), delta,
                         md(paired["n"] if paired else "—"), md(reading_text(row, a, margin))])
    if not rows:
        return "_No comparison recorded in this run._"
    return _table(["Comparison", "Measurement", "A", "B", "Paired Δ (A − B) [95 % CI]", "n", "Reading"], rows,
                  "Both rows answered the same prompts, questions and texts: Δ is the mean of the per-example "
                  "differences with a paired bootstrap 95 % CI over the n pairs (perplexity as log-perplexity).")


def _clock(seconds: Any) -> str:
    """``2:42:17``."""
    if num(seconds) == "—":
        return "—"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _run_table(results: dict) -> str:
    run = results["run"]
    prov = run.get("provenance") or {}
    command = prov.get("command")
    command = shlex.join(map(str, command)) if isinstance(command, list) else command
    facts = [("Run", md(run.get("name") or "—")),
             ("Command", f"<code>{md(command)}</code>" if command else "—"),
             ("Git revision", f"<code>{md(prov['git_revision'])}</code>" if prov.get("git_revision") else "—"),
             ("Started", md(run.get("started") or "—")), ("Finished", md(run.get("finished") or "—")),
             ("Wall time", _clock(run.get("wall_seconds")))]
    versions = prov.get("versions") or {}
    facts += [(label, md(versions[key])) for key, label in _VERSIONS if versions.get(key)]
    return _table(["Field", "Value"], [[f"**{md(k)}**", v] for k, v in facts])


def markdown_blocks(results: dict) -> dict[str, str]:
    """The tables of a write-up (``BLOCKS``), each a GitHub-markdown table with a line under it,
    from ``results`` alone (full or ``publishable``: the same text from both when the run stored
    its verdict, which every ``immunize run`` does)."""
    rows, _ = _verdict_rows(results, None, None)
    verdict = {row.get("defence"): row for row in rows}
    return {"main-table": _main_table(results, verdict), "verdict-table": _verdict_table(results, rows),
            "worst-case-table": _worst_case_table(results, verdict),
            "feedback-table": _feedback_table(results, rows),
            "stability-table": _stability_table(results, rows),
            "held-out-table": _held_out_table(results, verdict),
            "comparisons-table": _comparisons_table(results), "run-table": _run_table(results)}


# ---------------------------------------------------------------------------------------------
# blocks of a hand-written document

_ANY_MARKER = re.compile(r"<!--\s*(?:BEGIN|END)\b")
_MARKER = re.compile(r"\s*<!--\s*(BEGIN|END)\s+([A-Za-z0-9][A-Za-z0-9_-]*)\s*-->\s*")


def _spans(lines: list[str], blocks: dict[str, str]) -> list[tuple[str, int, int]]:
    """``(name, begin line, end line)`` of each block, 0-based indices of its marker lines; a
    malformed, nested or unbalanced marker, or a block ``blocks`` lacks, raises naming its line."""
    spans: list[tuple[str, int, int]] = []
    opened: tuple[str, int] | None = None
    for i, line in enumerate(lines):
        if not _ANY_MARKER.search(line):
            continue
        found = _MARKER.fullmatch(line)
        if not found:
            raise ImmunizeError(f"line {i + 1}: a block marker is a line of its own, <!-- BEGIN name --> or "
                                f"<!-- END name -->: {line.strip()!r}")
        kind, name = found.groups()
        if kind == "BEGIN":
            if opened:
                raise ImmunizeError(f"line {i + 1}: <!-- BEGIN {name} --> inside block {opened[0]!r} "
                                    f"(line {opened[1] + 1}): blocks do not nest")
            if name not in blocks:
                raise ImmunizeError(f"line {i + 1}: no block {name!r} to fill (blocks: {', '.join(blocks)})")
            opened = (name, i)
        elif not opened or opened[0] != name:
            what = f"block {opened[0]!r} (line {opened[1] + 1}) is open" if opened else "no block is open"
            raise ImmunizeError(f"line {i + 1}: <!-- END {name} --> but {what}")
        else:
            spans.append((name, opened[1], i))
            opened = None
    if opened:
        raise ImmunizeError(f"line {opened[1] + 1}: <!-- BEGIN {opened[0]} --> has no <!-- END {opened[0]} -->")
    return spans


def fill_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with the lines between each ``<!-- BEGIN name -->`` and ``<!-- END name -->``
    replaced by ``blocks[name]`` (blank lines around it, so a table starts and ends there);
    everything outside the blocks stays byte for byte."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    last = 0
    for name, begin, end in _spans(lines, blocks):
        newline = "\r\n" if lines[begin].endswith("\r\n") else "\n"
        out += [*lines[last:begin + 1], newline, *(f"{line}{newline}" for line in blocks[name].strip().split("\n")),
                newline]
        last = end
    return "".join(out + lines[last:])


def stale_blocks(text: str, blocks: dict[str, str]) -> list[str]:
    """The names of the blocks of ``text`` whose content is not ``blocks[name]`` (blank lines
    around it aside), in the document's order; errors as ``fill_blocks``."""
    lines = text.splitlines(keepends=True)
    stale = [name for name, begin, end in _spans(lines, blocks)
             if "".join(lines[begin + 1:end]).strip().replace("\r\n", "\n") != blocks[name].strip()]
    return list(dict.fromkeys(stale))
