"""The report's figures, drawn with matplotlib's object API (no pyplot: no global backend or state).

Each function takes the parsed results and returns a ``Figure``, or ``None`` when its data is
absent. Every defence keeps one colour across all figures; the undefended model is grey.
"""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from immunize.verdict import baseline, resistance_curve

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#d62728")
_GREY = "#6b7280"
_HARMFUL, _HARMLESS = "#d62728", "#1f77b4"
_RC = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
       "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
       "svg.hashsalt": "immunize", "svg.fonttype": "none"}


def colour_map(results: dict):
    """``name -> colour``, stable across figures: by defence (``"repnoise@budget"`` counts as
    ``repnoise``), grey for the undefended model, dark grey for the trainability reference."""
    defended = [d for d in results.get("defences") or [] if d != baseline(results)]

    def colour(name: str) -> str:
        defence = name.split("@", 1)[0]
        if defence in (baseline(results), "aligned"):
            return _GREY
        if defence == "reference":
            return "#1f2937"
        if defence not in defended:
            defended.append(defence)
        return _PALETTE[defended.index(defence) % len(_PALETTE)]

    return colour


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def render(fig: Figure, fmt: str) -> bytes:
    """PNG (for embedding) or SVG (for papers) bytes of ``fig``."""
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buffer, format=fmt, dpi=120 if fmt == "png" else None,
                    metadata={"Date": None} if fmt == "svg" else None)
    return buffer.getvalue()


def sci(value: float) -> str:
    """``3e-5`` rather than Python's ``3e-05``; plain notation between 0.001 and 1000."""
    if value == 0 or 1e-3 <= abs(value) < 1e3:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _budget_title(budget: dict) -> str:
    bits = [budget.get("attack", "").upper()]
    if budget.get("learning_rate") is not None:
        bits.append(f"lr {sci(budget['learning_rate'])}")
    if budget.get("num_samples") is not None:
        bits.append(f"{budget['num_samples']:,} samples")
    return f"{budget['id']}\n" + ", ".join(b for b in bits if b)


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _panels(n: int, panel_width: float, panel_height: float, *, max_cols: int = 3, extra_width: float = 0.0,
            extra_height: float = 0.0, sharey: bool = False):
    """A figure with ``n`` panels in a grid (rows × at most ``max_cols``), the grid's unused cells hidden:
    (figure, axes as a 2-D array); draw on ``zip(axes.flat, items)``."""
    rows, cols = _grid(n, max_cols)
    fig = _figure(panel_width * cols + extra_width, panel_height * rows + extra_height)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, axes


def _styled(fn):
    """Run a figure builder under the report's rc settings (they apply when artists are created)."""
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@_styled
def resistance_curves(results: dict, phi: float) -> Figure | None:
    """Harmfulness vs attack steps: one panel per budget, one line per defence, φ dashed."""
    curves = results.get("curves") or {}
    budgets = [b for b in results["budgets"]
               if any(b["id"] in (curves.get(d) or {}) for d in results["defences"])]
    if not budgets:
        return None
    fig, axes = _panels(len(budgets), 4.2, 3.3, extra_height=0.4, sharey=True)
    colour = colour_map(results)
    for ax, budget in zip(axes.flat, budgets, strict=False):
        for defence in results["defences"]:
            if budget["id"] not in (curves.get(defence) or {}):
                continue
            points = resistance_curve(results, defence, budget)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3.5, linewidth=1.8,
                    color=colour(defence), label=defence)
        ax.axhline(phi, color="#b91c1c", linestyle="--", linewidth=1.2)
        ax.text(ax.get_xlim()[0], phi, f" φ = {phi:g}", va="bottom", ha="left", color="#b91c1c", fontsize=8)
        ax.set_title(_budget_title(budget))
        ax.set_xlabel("attack steps (optimizer updates)")
        ax.set_ylim(0, 1)
    for ax in axes[:, 0]:
        ax.set_ylabel("mean harmfulness (0–1)")
    handles = [Line2D([], [], color=colour(d), marker="o", label=d) for d in results["defences"]]
    handles.append(Line2D([], [], color="#b91c1c", linestyle="--", label="threshold φ"))
    # Several rows of legend rather than one wider than the figure.
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles) if len(handles) <= 4 else 2,
               frameon=False)
    return fig


def _plotted(trial: dict | None) -> bool:
    """Whether a search trial has a point: a finite harmfulness and utility ratio."""
    trial = trial or {}
    values = ((trial.get("harmfulness") or {}).get("mean"), (trial.get("utility") or {}).get("ratio"))
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@_styled
def search_scatter(results: dict) -> Figure | None:
    """Every search trial's validation harmfulness against its utility (a multiple of the defended
    model's): one panel per searched defence, the bound dashed, the worst case starred."""
    searches = results.get("search") or {}
    panels = [(d, s) for d, s in searches.items() if any(_plotted(t) for t in s.get("trials") or [])]
    if not panels:
        return None
    fig, axes = _panels(len(panels), 4.2, 3.3, extra_height=0.4, sharey=True)
    colour = colour_map(results)
    for ax, (defence, search) in zip(axes.flat, panels, strict=False):
        trials = [t for t in search["trials"] if _plotted(t)]
        for feasible, marker in ((True, "o"), (False, "x")):
            chosen = [t for t in trials if bool(t.get("feasible")) == feasible]
            ax.scatter([t["utility"]["ratio"] for t in chosen], [t["harmfulness"]["mean"] for t in chosen],
                       marker=marker, s=30, color=colour(defence), linewidths=1.5 if not feasible else 0)
        if _plotted(best := search.get("best")):
            ax.scatter([best["utility"]["ratio"]], [best["harmfulness"]["mean"]], marker="*", s=220,
                       facecolors="none", edgecolors="#111827", linewidths=1.2)
        bound = search.get("bound") or {}
        if isinstance(bound.get("limit"), (int, float)):
            ax.axvline(bound["limit"], color="#b91c1c", linestyle="--", linewidth=1.2)
        ratios = [t["utility"]["ratio"] for t in trials]
        if min(ratios) > 0 and max(ratios) / min(ratios) > 50:
            ax.set_xscale("log")  # a trial that broke the model far past the bound
        ax.set_title(f"{defence}: {len(trials)} trials")
        ax.set_xlabel(f"{bound.get('metric', 'utility')} / the defended model's")
        ax.set_ylim(0, 1)
    for ax in axes[:, 0]:
        ax.set_ylabel("harmfulness (validation slice)")
    handles = [Line2D([], [], color=_GREY, marker="o", linestyle="", label="kept the bound"),
               Line2D([], [], color=_GREY, marker="x", linestyle="", label="broke the bound"),
               Line2D([], [], color="#111827", marker="*", markerfacecolor="none", markersize=12, linestyle="",
                      label="worst case"),
               Line2D([], [], color="#b91c1c", linestyle="--", label="utility bound")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return fig


def _bars(ax, names: list[str], entries: list[dict | None], colour, fmt: str = "{:.3g}"):
    xs = list(range(len(names)))
    values = [e["value"] if e else math.nan for e in entries]
    bars = ax.bar(xs, values, color=[colour(n) for n in names])
    upper = _whiskers(ax, xs, values, entries, capsize=4)
    crowded = len(names) > 4  # value labels of many bars overlap: the report's tables carry the numbers
    for bar, value, up in zip(bars, values, upper, strict=True):
        if not math.isnan(value) and not crowded:
            ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, value + up),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    if crowded:
        ax.set_xticks(list(xs), names, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(list(xs), names, rotation=20 if len(names) > 3 else 0)
    finite = [v for v in values if not math.isnan(v) and v > 0]
    if finite and len(finite) == len(values) and max(finite) / min(finite) > 50:
        ax.set_yscale("log")  # e.g. a random-init model's perplexity next to trained ones
    ax.margins(y=0.15)


def _whiskers(ax, xs: list[float], values: list[float], entries: list[dict | None],
              capsize: float) -> list[float]:
    """95 % CI whiskers where the entry has a CI (none drawn otherwise); returns the upper lengths."""
    upper = []
    for x, value, entry in zip(xs, values, entries, strict=True):
        ci = (entry or {}).get("ci")
        if ci and ci[0] is not None and ci[1] is not None and not math.isnan(value):
            ax.errorbar([x], [value], yerr=[[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]], fmt="none",
                        ecolor="#111827", elinewidth=1.1, capsize=capsize)
            upper.append(max(ci[1] - value, 0.0))
        else:
            upper.append(0.0)
    return upper


_METRIC_LABELS = {
    "mmlu_acc": ("MMLU", "accuracy"),
    "truthfulqa_mc1": ("TruthfulQA MC1", "accuracy"),
    "truthfulqa_mc2": ("TruthfulQA MC2", "accuracy"),
    "perplexity": ("Perplexity", "perplexity"),
    "over_refusal": ("Over-refusal", "refusal rate (benign prompts)"),
}


def metric_label(metric: str) -> tuple[str, str]:
    return _METRIC_LABELS.get(metric, (metric, "value"))


@_styled
def stability_bars(results: dict) -> Figure | None:
    """One panel per capability metric, one bar per defence, 95 % CI whiskers."""
    stability = results.get("stability") or {}
    defences = [d for d in results["defences"] if d in stability] + [d for d in stability
                                                                    if d not in results["defences"]]
    metrics = list(dict.fromkeys(m for d in defences for m in stability[d]))
    if not metrics:
        return None
    fig, axes = _panels(len(metrics), 2.3, 2.9, max_cols=5, extra_width=0.6)
    colour = colour_map(results)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        entries = [stability[d].get(metric) for d in defences]
        _bars(ax, defences, entries, colour)
        higher = next((e.get("higher_is_better", True) for e in entries if e), True)
        title, unit = metric_label(metric)
        ax.set_title(f"{title} ({'↑' if higher else '↓'} better)")
        ax.set_ylabel(unit)
    return fig


@_styled
def trainability_bars(results: dict) -> Figure | None:
    """ROUGE after the benign fine-tune: grouped bars per metric, one bar per model, 95 % CI whiskers."""
    cells = (results.get("trainability") or {}).get("cells") or {}
    if not cells:
        return None
    models = (["reference"] if "reference" in cells else []) + [d for d in results["defences"] if d in cells]
    models += [m for m in cells if m not in models]
    metrics = list(dict.fromkeys(m for model in models for m in cells[model]))
    fig = _figure(max(5.0, 1.1 * len(metrics) * len(models) + 1.5), 3.4)
    ax = fig.subplots()
    colour = colour_map(results)
    width = 0.8 / len(models)
    for j, model in enumerate(models):
        entries = [cells[model].get(metric) for metric in metrics]
        values = [(entry or {}).get("value", math.nan) for entry in entries]
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, values, width=width * 0.95, color=colour(model), label=model)
        _whiskers(ax, xs, values, entries, capsize=3)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("ROUGE F1 (0–1)")
    task = (results.get("trainability") or {}).get("task", "benign task")
    ax.set_title(f"Benign fine-tune on {task}: higher is better")
    ax.legend(loc="upper right", frameon=False, ncols=min(len(models), 4))
    ax.margins(y=0.2)
    return fig


@_styled
def weight_distance_plot(results: dict) -> Figure | None:
    """L2 weight distance per layer group, one line per comparison."""
    distances = (results.get("analysis") or {}).get("weight_distance") or {}
    if not distances:
        return None
    fig = _figure(9.0, 3.4)
    ax = fig.subplots()
    palette = iter(_PALETTE)
    longest: list[str] = []
    for label, rows in distances.items():
        layers = [r["layer"] for r in rows]
        longest = layers if len(layers) > len(longest) else longest
        ax.plot(range(len(rows)), [r["l2"] for r in rows], marker="o", markersize=3, linewidth=1.6,
                color=next(palette, _GREY), label=label)
    step = max(1, len(longest) // 16)
    ticks = [i for i in range(len(longest)) if i % step == 0]
    if ticks[-1] != len(longest) - 1:  # always label the head, dropping a neighbour it would overlap
        ticks = [*(ticks[:-1] if len(longest) - 1 - ticks[-1] < step else ticks), len(longest) - 1]
    ax.set_xticks(ticks, [_layer_tick(longest[i]) for i in ticks])
    ax.set_xlabel("layer (emb = embeddings, head = final norm + LM head)")
    ax.set_ylabel("‖W_a − W_b‖₂ (L2 distance)")
    ax.set_title("Weight change per layer")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False)
    return fig


def _layer_tick(label: str) -> str:
    return {"embeddings": "emb", "head": "head"}.get(label, label)


@_styled
def pca_scatter(results: dict) -> Figure | None:
    """Rows = models, columns = layers; harmful vs harmless on the reference model's PCA axes."""
    pca = (results.get("analysis") or {}).get("pca") or {}
    if not pca.get("points"):
        return None
    models = [m for m in pca.get("models", []) if m in pca["points"]]
    layers = [str(layer) for layer in pca.get("layers", [])]
    fig = _figure(3.1 * len(layers) + 0.3, 2.9 * len(models) + 0.5)
    axes = fig.subplots(len(models), len(layers), squeeze=False, sharex="col", sharey="col")
    variance = pca.get("explained_variance") or {}
    for i, model in enumerate(models):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            groups = pca["points"][model].get(layer) or {}
            for group, colour, marker in (("harmless", _HARMLESS, "o"), ("harmful", _HARMFUL, "^")):
                points = groups.get(group) or []
                ax.scatter([p[0] for p in points], [p[1] for p in points], s=12, alpha=0.7, color=colour,
                           marker=marker, linewidths=0)
            score = ((pca.get("separability") or {}).get(model) or {}).get(layer)
            score_text = f"probe acc {score:.2f}" if isinstance(score, (int, float)) else "probe n/a"
            ax.set_title(f"{model} · layer {layer}\n{score_text}", fontsize=9)
            ratios = variance.get(layer) or [None, None]
            if i == len(models) - 1:
                ax.set_xlabel(f"PC1 ({ratios[0]:.0%} var.)" if ratios[0] is not None else "PC1")
            ax.set_ylabel(f"PC2 ({ratios[1]:.0%})" if ratios[1] is not None else "PC2", fontsize=8)
    handles = [Line2D([], [], color=_HARMFUL, marker="^", linestyle="", label="harmful answers"),
               Line2D([], [], color=_HARMLESS, marker="o", linestyle="", label="harmless answers")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    return fig


@_styled
def logit_lens_plot(results: dict) -> Figure | None:
    """Probability of the harmful answer read out from each layer, one line per model."""
    lens = (results.get("analysis") or {}).get("logit_lens") or {}
    if not lens:
        return None
    fig = _figure(9.0, 3.4)
    ax = fig.subplots()
    colour = colour_map(results)
    for model, values in lens.items():
        # An attacked model ("defence@budget") shares its defence's colour, dashed.
        ax.plot(range(len(values)), values, marker="o", markersize=3, linewidth=1.6, color=colour(model),
                linestyle="--" if "@" in model else "-", label=model)
    positive = [v for values in lens.values() for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
        ax.set_ylabel("mean P(harmful answer token), log scale")
    else:
        ax.set_ylabel("mean P(harmful answer token)")
    ax.set_xlabel("layer read out through final norm + LM head (0 = embeddings)")
    ax.set_title("Logit lens on harmful answers")
    ax.legend(frameon=False)
    return fig
