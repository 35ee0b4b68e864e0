"""The recipe of `immunize run`: run-wide options, then the methods as lists of labelled entries.

```yaml
align: {defence: safety-sft, num_harmful: 64, num_benign: 64}   # or false
defences:
  - {label: none}
  - {label: repnoise, defence: repnoise, alpha: 1, beta: 0.001}
  - {label: repnoise-no-noise, defence: repnoise, ablate: noise}
attacks:
  - {label: sft, attack: sft, grid: {learning_rate: [3e-5, 8e-5], num_samples: [64], seed: [42]}}
compare: ["repnoise-no-noise:repnoise"]   # rows compared pair by pair (each is with none already)
search: {attack: sft, seeds: [1, 2, 3], search_trials: 10}   # optional: the worst case of each defence
```

An entry's method (``defence`` / ``attack``) defaults to its label; labels are unique and name the
report's rows (defences) and column groups (attacks). Every other key is an option of the method's
own config, validated (and coerced: YAML reads ``8e-5`` as text) when the recipe is parsed, so a bad
recipe fails in a second, before anything runs. Options every defence honours (``SHARED_OPTIONS``)
are set once at the top level and given to every defence and to the alignment; an entry may not set
them itself, but for a defence's seed: ``seeds: [1, 2, 3]`` runs the entry once per seed, as rows
``LABEL-seed1`` … (like an attack's ``grid: {seed: [...]}``). A plain string ``repnoise`` is short for
``{label: repnoise}``.

``search`` (``SearchSpec``; off when absent or false) searches the worst-case attack of every defence
(``immunize.attacks.search``): ``attack`` names the attack entry searched (by label; the only one by
default; its grid is not used), ``seeds`` the attack seeds the best trial is re-run with (default: the
entry's ``grid.seed``, else the recipe's seed), and every other key is an option of ``SearchArguments``
(``search_trials``, ``search_num_samples`` …, as ``immunize attack --search`` takes them).

On the command line, every top-level key is a flag (``--max_length 96``) and every entry key is a
dotted flag: ``--defences.repnoise.alpha 2``, ``--attacks.sft.grid.learning_rate 3e-5,8e-5``,
``--align.num_harmful 128``, ``--align false``, ``--search.search_trials 4``, ``--search.seeds 1,2``,
``--search false``.

The flat recipe shape of earlier versions (``defence_learning_rate``, ``repnoise_alpha``,
``attack_learning_rates`` …) is refused with a one-line hint on how to rewrite it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from immunize.defences.base import SHARED_OPTIONS
from immunize.errors import ImmunizeError
from immunize.judges.gate import DEFAULT_THRESHOLD, check_threshold
from immunize.models.aliases import DEFAULT_MODEL
from immunize.prompts import check_format

METHOD_KEYS = ("align", "defences", "attacks", "search")
# Shared by every defence (immunize.defences.base.SHARED_OPTIONS) and, but for the categories (a
# cross-domain *attack* option there), by every attack.
SHARED_DEFENCE_OPTIONS = SHARED_OPTIONS
SHARED_ATTACK_OPTIONS = tuple(name for name in SHARED_OPTIONS if name != "held_out_categories")
# The pipeline sets these on every attack: it scores the curve with its own judge.
PIPELINE_ATTACK_OPTIONS = ("curve_num_prompts", "curve_num_answers", "output_dir", "model", "attack", "grid")
# The pipeline sets these on every search: it runs one per defence, and each defence's class says whether
# its model keeps capability to bound (``Defence.keeps_capability``).
PIPELINE_SEARCH_OPTIONS = {"search": "a search: entry runs the search, search: false turns it off",
                           "search_keeps_capability": "each defence's own keeps_capability"}
SEARCH_KEYS = ("attack", "seeds")
LEGACY_KEYS = frozenset({
    "align_num_harmful", "align_num_benign", "align_learning_rate", "align_epochs", "align_batch_size",
    "defence_num_samples", "defence_learning_rate", "defence_epochs", "defence_batch_size", "repnoise_alpha",
    "repnoise_beta", "attack", "attack_use_lora", "attack_learning_rates", "attack_num_samples", "attack_seeds",
    "attack_epochs", "attack_batch_size", "curve_every_steps",
})
LEGACY_HINT = ("is a key of the old flat recipe shape; methods are now labelled entries, e.g. "
               "align: {num_harmful: 64}, defences: [{label: none}, {label: repnoise, learning_rate: 2e-5, "
               "num_samples: 256}], attacks: [{label: sft, per_device_train_batch_size: 8, curve_every_steps: 4, "
               "grid: {learning_rate: [8e-5], num_samples: [64], seed: [42]}}] (README, 'Recipes')")
DEFAULT_ALIGNMENT = "safety-sft"
# The evaluations a run makes: these sections of every defended model; after each attack, harmfulness
# and the sections that attack declares (``post_attack_sections``).
PRE_ATTACK_SECTIONS = "harmfulness,overrefusal,toxicity,capability,perplexity,trainability"
POST_ATTACK_SECTIONS = "harmfulness"
# Evaluation option ← the run option that sets it (unset ones are the suite's).
EVAL_OPTIONS = {
    "suite": "eval_suite", "harmfulness_samples": "eval_harmfulness_samples",
    "harmfulness_max_new_tokens": "eval_max_new_tokens", "harmfulness_judge": "harmfulness_judge",
    "capability_limit": "eval_capability_limit", "capability_tasks": "eval_capability_tasks",
    "mmlu_subjects": "eval_mmlu_subjects", "trainability_steps": "eval_trainability_steps",
    "trainability_tasks": "eval_trainability_tasks", "trainability_eval_samples": "eval_trainability_eval_samples",
    "toxicity_samples": "eval_toxicity_samples", "overrefusal_samples": "eval_overrefusal_samples",
    "harmfulness_refusal_gate": "eval_harmfulness_refusal_gate", "harmfulness_prompts": "eval_harmfulness_prompts",
}


def _default_defences() -> list[Any]:
    return [{"label": "none"}, {"label": "repnoise"}]


def _default_attacks() -> list[Any]:
    return [{"label": "sft", "grid": {"learning_rate": [3e-5, 6e-5, 8e-5], "num_samples": [1000, 10000]}}]


@dataclass
class RunOptions:
    """The run-wide options (every one a flag and a top-level YAML key)."""

    name: str = field(default="experiment", metadata={"help": "run name (shown in the report)"})
    output_dir: str = field(default="runs/experiment",
                            metadata={"help": "run directory (stages/, results.json, report/)"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "base model: alias, local dir, .gguf file or hub id"})
    data_root: str | None = field(default=None, metadata={"help": "local data root (default ../shared/data)"})
    prompt_format: str = field(default="chat", metadata={"help": "chat or plain"})
    max_length: int = field(default=128, metadata={"help": "tokens per training example"})
    seed: int = field(default=42, metadata={"help": "seed of every stage (attack seeds: in each attack's grid)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"})

    # Resistance curves: the pipeline scores each attack with the harmfulness judge.
    curve_num_prompts: int = field(default=16, metadata={"help": "prompts judged at each curve point"})
    curve_max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per curve prompt"})
    curve_refusal_gate: float = field(default=DEFAULT_THRESHOLD, metadata={
        "help": "curve answers the refusal judge calls a refusal this surely (opening window; no later one "
                "complies) score 0; 0: off"})

    # Evaluation.
    eval_suite: str = field(default="quick", metadata={"help": "evaluation suite for sizes left unset (quick, full)"})
    eval_harmfulness_samples: int = field(default=50, metadata={"help": "held-out harmful prompts (0: all)"})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "answer length of harmfulness evaluations"})
    eval_harmfulness_refusal_gate: float = field(default=DEFAULT_THRESHOLD, metadata={
        "help": "answers the refusal judge calls a refusal this surely (opening window; no later one complies) "
                "score harmfulness 0; 0: off"})
    eval_harmfulness_prompts: str | None = field(default=None, metadata={
        "help": "harmful prompts of your own (.jsonl/.json/.csv with a 'prompt' and an optional 'category' column, "
                "or a hub id[:split]) instead of BeaverTails', minus any training prompt (immunize evaluate "
                "--harmfulness_prompts)"})
    eval_capability_limit: int | None = field(default=None, metadata={"help": "questions per capability task"})
    eval_capability_tasks: str | None = field(default=None, metadata={
        "help": "capability tasks: mmlu, truthfulqa_mc1, truthfulqa_mc2 (comma list)"})
    eval_mmlu_subjects: str | None = field(default=None, metadata={"help": "MMLU subjects (comma list, or all)"})
    eval_trainability_steps: int | None = field(default=None, metadata={"help": "benign fine-tune steps"})
    eval_trainability_tasks: str | None = field(default=None, metadata={"help": "viggo, e2e"})
    eval_trainability_eval_samples: int | None = field(default=None, metadata={"help": "ROUGE test examples"})
    eval_toxicity_samples: int | None = field(default=None, metadata={"help": "toxic_test prompts"})
    eval_overrefusal_samples: int | None = field(default=None, metadata={"help": "benign prompts for over-refusal"})
    harmfulness_judge: str = field(default="harmfulness", metadata={"help": "judge of harmfulness"})

    # Generalization: no defence (nor the alignment) sees these categories; harm on them is reported apart.
    held_out_categories: list[str] = field(default_factory=list,
                                           metadata={"help": "BeaverTails categories kept out of every defence"})

    # Depth analysis.
    analysis: bool = field(default=True, metadata={"help": "weight distance, representation PCA, logit lens"})
    analysis_examples: int = field(default=32, metadata={"help": "harmful/harmless examples for PCA and lens"})
    analysis_layers: list[int] = field(default_factory=list, metadata={"help": "PCA layers (default: 4 spread)"})
    analysis_lens_tokens: int = field(default=32, metadata={
        "help": "logit lens: opening answer tokens read out per example (its cost grows with them)"})
    analysis_defences: list[str] = field(default_factory=list, metadata={
        "help": "defence labels the depth analysis covers (default: all; each costs two model loads and passes)"})

    # Verdict thresholds (see immunize.verdict for their meaning and defaults).
    phi: float | None = field(default=None, metadata={"help": "harmfulness threshold φ for resistance"})
    epsilon: float | None = field(default=None, metadata={"help": "tolerance ε for stability and trainability"})
    # Rows compared pair by pair besides each defence with the undefended one (immunize.verdict.comparison_rows).
    compare: list[str] = field(default_factory=list, metadata={
        "help": "pairs of defence labels A:B the report compares on the same prompts, e.g. repnoise-lens8:repnoise"})


@dataclass
class MethodEntry:
    """One labelled, validated recipe entry."""

    label: str
    method: str  # the registry name
    options: dict[str, Any]  # the entry's own options, typed (shared options not included)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # attacks: the swept options
    seed: int | None = None  # defences: this replicate's seed (from ``seeds``), else the recipe's


@dataclass
class SearchSpec:
    """The recipe's ``search:``, validated: what every defence's worst-case search runs."""

    attack: MethodEntry  # the attack entry searched (its options are every trial's starting point)
    options: Any  # SearchArguments, ``search`` on; each defence sets its own ``search_keeps_capability``
    seeds: list[int]  # the attack seeds the best trial is re-run with, one searched budget each

    def record(self) -> dict[str, Any]:
        """As results.json records it: the entry's label, the seeds and the options set away from
        their defaults."""
        changed = {name: getattr(self.options, name) for name in self.options.changed()}
        return {"attack": self.attack.label, "seeds": list(self.seeds), "options": changed}


@dataclass
class RunConfig(RunOptions):
    align: Any = field(default=True, metadata={
        "help": "alignment entry (safety SFT of the base model), true for its defaults, or false"})
    defences: list[Any] = field(default_factory=_default_defences, metadata={"help": "labelled defence entries"})
    attacks: list[Any] = field(default_factory=_default_attacks, metadata={"help": "labelled attack entries"})
    search: Any = field(default=None, metadata={
        "help": "worst-case search of every defence: {attack: LABEL, seeds: [...], search_*: ...}, or false"})

    alignment: MethodEntry | None = field(init=False, default=None)
    defence_entries: list[MethodEntry] = field(init=False, default_factory=list)
    attack_entries: list[MethodEntry] = field(init=False, default_factory=list)
    comparisons: list[tuple[str, str]] = field(init=False, default_factory=list)  # ``compare``, parsed
    search_spec: SearchSpec | None = field(init=False, default=None)  # ``search``, parsed

    def __post_init__(self):
        from immunize.config import check_at_least, check_numbers

        check_format(self.prompt_format)
        check_numbers(self)
        check_at_least(self, 1, "curve_max_new_tokens")
        self.curve_refusal_gate = check_threshold(self.curve_refusal_gate, "--curve_refusal_gate")
        for name in ("analysis_examples", "analysis_lens_tokens"):
            if getattr(self, name) < 1:
                raise ImmunizeError(f"--{name}: must be positive, got {getattr(self, name)}")
        from immunize.attacks.arguments import parse_categories

        try:  # Checked here: the stages would find out only after alignment has run.
            self.held_out_categories = parse_categories(self.held_out_categories)
        except ImmunizeError as err:
            raise ImmunizeError(str(err).replace("--held_out_categories: unknown category",
                                                 "--held_out_categories: unknown BeaverTails category")) from None
        self.alignment = self._alignment_entry()
        self.defence_entries = self._entries("defences", "defence", self.defences)
        self.attack_entries = self._entries("attacks", "attack", self.attacks)
        methods = [e.method for e in self.defence_entries]
        if methods.count("none") != 1:
            raise ImmunizeError("--defences: list the undefended model exactly once ({label: none}): every verdict "
                                f"compares with it (got {methods.count('none')})")
        unknown = sorted(set(self.analysis_defences) - {e.label for e in self.defence_entries})
        if unknown:
            raise ImmunizeError(f"--analysis_defences: no defence labelled {', '.join(unknown)} in the recipe")
        from immunize.verdict import parse_comparisons

        self.comparisons = parse_comparisons(self.compare, [e.label for e in self.defence_entries])
        self.search_spec = self._search_spec()
        self.validate()

    @property
    def baseline(self) -> str:
        return next(e.label for e in self.defence_entries if e.method == "none")

    # -- entries ---------------------------------------------------------------------------
    def _alignment_entry(self) -> MethodEntry | None:
        if self.align is False or self.align is None:
            return None
        raw = {} if self.align is True else self.align
        if not isinstance(raw, dict):
            raise ImmunizeError(f"--align: expected true, false or a mapping of options, got {self.align!r}")
        raw = dict(raw)
        if "label" in raw:
            raise ImmunizeError("--align.label: the alignment stage has no label (it is the 'aligned' model)")
        method = str(raw.pop("defence", DEFAULT_ALIGNMENT))
        return self._entry("align", "defence", {"label": "aligned", "defence": method, **raw}, alignment=True)

    def _entries(self, key: str, kind: str, raw_entries: Any) -> list[MethodEntry]:
        if isinstance(raw_entries, (str, dict)):
            raw_entries = [raw_entries]
        if not isinstance(raw_entries, list) or not raw_entries:
            raise ImmunizeError(f"--{key}: expected a non-empty list of entries like {{label: NAME, ...}}")
        if kind == "defence":
            raw_entries = [one for raw in raw_entries for one in _seed_replicates(raw)]
        entries = [self._entry(key, kind, raw) for raw in raw_entries]
        labels = [e.label for e in entries]
        if len(set(labels)) != len(labels):
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            raise ImmunizeError(f"--{key}: labels must be unique; repeated: {', '.join(repeated)}")
        return entries

    def _entry(self, key: str, kind: str, raw: Any, alignment: bool = False) -> MethodEntry:
        if isinstance(raw, str):
            raw = {"label": raw}
        if not isinstance(raw, dict) or not raw.get("label"):
            raise ImmunizeError(f"--{key}: each entry needs a label, e.g. {{label: NAME}}; got {raw!r}")
        raw = dict(raw)
        label = str(raw.pop("label"))
        seed = raw.pop(REPLICATE_SEED, None)
        if "seeds" in raw:
            raise ImmunizeError(f"--{key}.{label}.seeds: only defences have seed replicates (attacks: grid.seed)"
                                if not alignment else "--align.seeds: the alignment stage runs once, with --seed")
        if not label or not all(c.isalnum() or c in "-_" for c in label):
            # No dots: a dotted flag (--defences.LABEL.OPTION) must find its entry.
            raise ImmunizeError(f"--{key}: label {label!r} may hold letters, digits, '-' and '_' only")
        where = key if alignment else f"{key}.{label}"
        method = str(raw.pop(kind, label))
        grid = raw.pop("grid", None) if kind == "attack" else None
        cls = _config_class(kind, method, where)
        shared = SHARED_DEFENCE_OPTIONS if kind == "defence" else SHARED_ATTACK_OPTIONS
        # The pipeline places each stage's model and output; data sources are the recipe's, for all.
        reserved = ((*shared, "model", "output_dir") if kind == "defence"
                    else (*shared, *PIPELINE_ATTACK_OPTIONS, "qa_source", "eval_source", "harmfulness_judge"))
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        options = {}
        for name, value in raw.items():
            if name in reserved:
                replicates = name == "seed" and kind == "defence"
                hint = " (replicates with other seeds: seeds: [1, 2, 3])" if replicates else ""
                raise ImmunizeError(f"--{where}.{name}: set by the recipe for every {kind}, not per entry{hint}")
            if name not in fields:
                raise ImmunizeError(f"--{where}.{name}: unknown option of {kind} {method!r} "
                                    f"(`immunize {'defend --defence' if kind == 'defence' else 'attack --attack'} "
                                    f"{method} --help` lists them)")
            options[name] = _coerce(cls, name, value, f"--{where}.{name}")
        if kind == "defence":
            missing = [name for name in shared if name not in fields]
            if missing:
                raise ImmunizeError(f"--{where}: defence {method!r} has no option(s) {', '.join(missing)}, which "
                                    "every defence must honour")
        parsed_grid: dict[str, list[Any]] = {}
        if grid is not None:
            if not isinstance(grid, dict):
                raise ImmunizeError(f"--{where}.grid: expected a mapping of option → list of values")
            from immunize.attacks.grid import parse_grid

            raw_grid = parse_grid({k: v if isinstance(v, list) else [v] for k, v in grid.items()})
            for name, values in raw_grid.items():
                if name not in fields:
                    raise ImmunizeError(f"--{where}.grid.{name}: unknown option of attack {method!r}")
                # Typed now, so a grid read from YAML or from a flag is the same grid (and stage key).
                parsed_grid[name] = [_coerce(cls, name, v, f"--{where}.grid.{name}") for v in values]
        if seed is not None and method == "none":
            raise ImmunizeError(f"--{where}.seeds: the undefended model trains nothing; list it once without seeds")
        return MethodEntry(label=label, method=method, options=options, grid=parsed_grid, seed=seed)

    def _search_spec(self) -> SearchSpec | None:
        if self.search is False or self.search is None:
            return None
        raw = {} if self.search is True else self.search
        if not isinstance(raw, dict):
            raise ImmunizeError("--search: expected a mapping {attack: LABEL, seeds: [...], search_trials: N, ...}, "
                                f"true or false; got {self.search!r}")
        raw = dict(raw)
        labels = [e.label for e in self.attack_entries]
        label = str(raw.pop("attack", labels[0] if len(labels) == 1 else ""))
        entry = next((e for e in self.attack_entries if e.label == label), None)
        if entry is None:
            named = f"no attack entry labelled {label!r}" if label else "name the attack entry to search"
            raise ImmunizeError(f"--search.attack: {named} (labels: {', '.join(labels)})")
        seeds = (parse_seeds(raw.pop("seeds"), "--search.seeds") if "seeds" in raw
                 else [int(s) for s in entry.grid.get("seed") or [self.seed]])
        from immunize.attacks.search import SearchArguments

        fields = {f.name for f in dataclasses.fields(SearchArguments)}
        options = {}
        for name, value in raw.items():
            if name in PIPELINE_SEARCH_OPTIONS:
                raise ImmunizeError(f"--search.{name}: set by the pipeline ({PIPELINE_SEARCH_OPTIONS[name]})")
            if name not in fields:
                raise ImmunizeError(f"--search.{name}: unknown option of the search (keys: {', '.join(SEARCH_KEYS)} "
                                    "and the search_* options `immunize attack --help` lists)")
            options[name] = _coerce(SearchArguments, name, value, f"--search.{name}")
        try:
            search = SearchArguments(search=True, **options)
        except ImmunizeError as err:
            raise ImmunizeError(f"--search: {err}") from None
        return SearchSpec(attack=entry, options=search, seeds=seeds)

    # -- method configs (built here to validate, and by the pipeline to run) ----------------------
    def shared_defence_options(self, entry: MethodEntry | None = None) -> dict[str, Any]:
        shared = {name: getattr(self, name) for name in SHARED_DEFENCE_OPTIONS}
        if entry is not None and entry.seed is not None:
            shared["seed"] = entry.seed
        return shared

    def shared_attack_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SHARED_ATTACK_OPTIONS}

    def defence_config(self, entry: MethodEntry, model: str, output_dir: str):
        from immunize.defences import defence_config

        defaults = {}
        if entry is self.alignment:
            from immunize.alignment import ALIGNMENT_DEFAULTS

            defaults = {k: v for k, v in ALIGNMENT_DEFAULTS.items() if k != "output_dir"}
        return defence_config(entry.method, **{**defaults, **entry.options, **self.shared_defence_options(entry),
                                               "model": model, "output_dir": output_dir})

    def attack_config(self, entry: MethodEntry, model: str, output_dir: str, **overrides):
        """Attack ``entry``'s config against ``model``; ``overrides`` are set over everything else (a
        searched worst case's options, the training prompt format among them)."""
        from immunize.attacks.registry import get_attack

        cls = get_attack(entry.method).config_class
        # An attack that judges harm itself (an RL constraint's cost) uses the judge the run evaluates with.
        judge = ({"harmfulness_judge": self.harmfulness_judge}
                 if any(f.name == "harmfulness_judge" for f in dataclasses.fields(cls)) else {})
        return cls(**{**entry.options, **self.shared_attack_options(), **judge, "model": model,
                      "output_dir": output_dir, "attack": entry.method, "grid": entry.grid or None, **overrides})

    def search_config(self, model: str, output_dir: str):
        """The attack every trial of the search of ``model`` starts from: the searched entry without its
        grid (a search picks each trial's budget) and without a curve (a search scores each trial's
        end on its own validation slice; a curve would only add generation to every trial)."""
        return self.attack_config(self.search_spec.attack, model, output_dir, grid=None, curve=False)

    def validate(self) -> None:
        """Build every method's config once (and expand every grid), so bad options fail now."""
        from immunize.attacks.grid import expand_grid

        where = f"{self.output_dir}/stages/.validate"
        for entry in [*([self.alignment] if self.alignment else []), *self.defence_entries]:
            self._checked(entry, lambda e=entry: self.defence_config(e, self.model, where))
        for entry in self.attack_entries:
            cfg = self._checked(entry, lambda e=entry: self.attack_config(e, self.model, where))
            self._checked(entry, lambda c=cfg: expand_grid(c))
        if self.search_spec is not None:
            from immunize.attacks.search import check_search

            try:
                check_search(self.search_config(self.model, where), self.search_spec.options)
            except ImmunizeError as err:
                raise ImmunizeError(f"--search: {err}") from None
        post = [self.post_attack_sections(entry) for entry in self.attack_entries]
        for sections in dict.fromkeys((PRE_ATTACK_SECTIONS, *post)):  # their judges too
            try:
                self.eval_config("", sections)
            except ImmunizeError as err:  # named as the recipe's option (--eval_harmfulness_samples)
                raise ImmunizeError(re.sub(r"^--(\w+)", lambda m: f"--{EVAL_OPTIONS.get(m[1], m[1])}",
                                           str(err))) from None

    def post_attack_sections(self, entry: MethodEntry) -> str:
        """What the evaluation after each budget of attack ``entry`` measures (``post_attack_sections``)."""
        return post_attack_sections(entry.method)

    def eval_config(self, model: str, sections: str, **extra):
        """The evaluation of ``sections`` of ``model`` under this recipe."""
        from immunize.evaluation.config import EvaluationConfig

        given = {name: getattr(self, option) for name, option in EVAL_OPTIONS.items()
                 if getattr(self, option) is not None}
        return EvaluationConfig(
            model=model, sections=sections, data_root=self.data_root, dtype=self.dtype,
            prompt_format=self.prompt_format, seed=self.seed,
            # Held-out categories are rare among the evaluation prompts: take all of theirs, so that
            # generalization is measured at all.
            harmfulness_categories=",".join(self.held_out_categories), **given, **extra)

    def _checked(self, entry: MethodEntry, build):
        kind = "align" if entry is self.alignment else (
            "defences" if entry in self.defence_entries else "attacks")
        prefix = "--align" if kind == "align" else f"--{kind}.{entry.label}"
        try:
            return build()
        except ImmunizeError as err:
            raise ImmunizeError(f"{prefix}: {err}") from None
        except (ValueError, TypeError) as err:  # TrainingArguments' own checks
            raise ImmunizeError(f"{prefix}: {err}".splitlines()[0]) from None


def post_attack_sections(attack: str) -> str:
    """The evaluation sections after an attack ``attack`` (a registered name): harmfulness, which
    every attack is judged on, then those its class declares (``Attack.post_attack_sections``), so
    each attack is also measured on what it attacks (a toxicity attack by toxicity)."""
    from immunize.attacks.registry import get_attack

    return ",".join(dict.fromkeys((POST_ATTACK_SECTIONS, *get_attack(attack).post_attack_sections)))


# The key a replicate expanded from ``seeds`` carries into ``_entry`` (not a recipe key: "seed" is shared).
REPLICATE_SEED = "\x00seed"


def _seed_replicates(raw: Any) -> list[Any]:
    """A defence entry with ``seeds: [s1, s2, ...]`` as one entry per seed, labelled ``LABEL-seedS``
    (one seed keeps the label): each replicate is defended, attacked and evaluated like any entry, so
    the report shows how much a defence's outcome depends on its own seed. Without ``seeds`` every
    defence uses the recipe's ``seed``."""
    if not isinstance(raw, dict) or "seeds" not in raw:
        return [raw]
    raw = dict(raw)
    label = str(raw.get("label", ""))
    seeds = parse_seeds(raw.pop("seeds"), f"--defences.{label}.seeds")
    if len(seeds) == 1:
        return [{**raw, REPLICATE_SEED: seeds[0]}]
    return [{**raw, "label": f"{label}-seed{s}", "defence": raw.get("defence", label), REPLICATE_SEED: s}
            for s in seeds]


def parse_seeds(value: Any, flag: str) -> list[int]:
    """``[1, 2, 3]`` (or the flag's ``1,2,3``) as distinct integers; else a one-line error naming ``flag``."""
    if not isinstance(value, (list, str)):  # "seeds: 3" could mean seed 3 or three seeds
        raise ImmunizeError(f"{flag}: expected a list of seeds, e.g. seeds: [1, 2, 3]; got {value!r}")
    items = value.split(",") if isinstance(value, str) else value
    try:
        seeds = [int(str(s).strip()) for s in items]
    except ValueError:
        raise ImmunizeError(f"{flag}: expected a list of integers, got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ImmunizeError(f"{flag}: expected distinct integers, got {value!r}")
    return seeds


def _config_class(kind: str, method: str, where: str) -> type:
    try:
        if kind == "defence":
            from immunize.defences import config_class

            return config_class(method)
        from immunize.attacks.registry import get_attack

        return get_attack(method).config_class
    except ImmunizeError as err:
        raise ImmunizeError(f"--{where}: {err}") from None


def _coerce(cls: type, name: str, value: Any, flag: str) -> Any:
    """An entry's value as its option's type (``8e-5`` read as text by YAML → float; see coerce_option)."""
    from immunize.config import coerce_option, option_types

    return coerce_option(option_types(cls)[name], value, flag)


# ---- parsing -------------------------------------------------------------------------------------

def _split_method_flags(argv: list[str]) -> tuple[list[tuple[list[str], str]], list[str]]:
    """``--defences.repnoise.alpha 2`` style flags (and ``--align X``) apart from the flat ones."""
    nested, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if name and (name.split(".", 1)[0] in METHOD_KEYS):
            if "=" in arg:
                value, i = arg.split("=", 1)[1], i + 1
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 2
            else:
                raise ImmunizeError(f"--{name}: expected a value")
            nested.append((name.split("."), value))
        else:
            rest.append(arg)
            i += 1
    return nested, rest


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _apply(methods: dict[str, Any], path: list[str], text: str) -> None:
    flag = "--" + ".".join(path)
    top = path[0]
    if top == "search":
        _apply_search(methods, path, text, flag)
        return
    if top == "align":
        if len(path) == 1:
            methods["align"] = _scalar(text)
            return
        current = methods.get("align", True)
        if current is False:
            raise ImmunizeError(f"{flag}: the recipe turns alignment off (align: false)")
        entry = {} if current is True else dict(current)
        entry[".".join(path[1:])] = _scalar(text)
        methods["align"] = entry
        return
    if len(path) < 3:
        raise ImmunizeError(f"{flag}: name an entry and an option, e.g. --{top}.LABEL.OPTION VALUE")
    default = _default_defences() if top == "defences" else _default_attacks()
    entries = [{"label": e} if isinstance(e, str) else dict(e) for e in methods.get(top, default)]
    label, keys = path[1], path[2:]
    match = next((e for e in entries if str(e.get("label")) == label), None)
    if match is None:
        labels = ", ".join(str(e.get("label")) for e in entries)
        raise ImmunizeError(f"{flag}: no entry labelled {label!r} in {top} (labels: {labels})")
    if keys[0] == "grid" and len(keys) == 2:
        match["grid"] = {**(match.get("grid") or {}), keys[1]: [_scalar(v) for v in text.split(",")]}
    elif len(keys) == 1:
        match[keys[0]] = _scalar(text)
    else:
        raise ImmunizeError(f"{flag}: too many dots (use --{top}.LABEL.OPTION or --{top}.LABEL.grid.OPTION)")
    methods[top] = entries


def _apply_search(methods: dict[str, Any], path: list[str], text: str, flag: str) -> None:
    """``--search false``, ``--search.search_trials 4``, ``--search.seeds 1,2`` (a comma list is a list,
    as the search options' ranges and choices are)."""
    if len(path) == 1:
        methods["search"] = _scalar(text)
        return
    if len(path) > 2:
        raise ImmunizeError(f"{flag}: too many dots (use --search.OPTION)")
    current = methods.get("search")
    if current is False:
        raise ImmunizeError(f"{flag}: the recipe turns the search off (search: false)")
    entry = dict(current) if isinstance(current, dict) else {}
    entry[path[1]] = [_scalar(v) for v in text.split(",")] if "," in text else _scalar(text)
    methods["search"] = entry


def parse_run_config(argv: list[str], *, prog: str = "immunize run", description: str = "") -> RunConfig:
    from immunize.config import load_yaml, parse_config

    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    values = load_yaml(known.config) if known.config else {}
    source = known.config or "the command line"
    nested, rest = _split_method_flags(argv)
    flags = {a[2:].split("=", 1)[0] for a in rest if a.startswith("--")}
    for key in sorted((set(values) | flags) & LEGACY_KEYS):
        raise ImmunizeError(f"{source}: {key!r} {LEGACY_HINT}")
    methods = {k: values.pop(k) for k in METHOD_KEYS if k in values}
    if "--config" in rest:  # the values are already read
        at = rest.index("--config")
        del rest[at:at + 2]
    rest = [a for a in rest if not a.startswith("--config=")]
    (flat,) = parse_config([RunOptions], rest, prog=prog, description=description, values=values, source=source)
    for path, text in nested:
        _apply(methods, path, text)
    try:
        return RunConfig(**dataclasses.asdict(flat), **methods)
    except ImmunizeError as err:
        if not known.config or _set_by_flag(str(err), [".".join(path) for path, _ in nested] + sorted(flags)):
            raise
        raise ImmunizeError(f"{known.config}: {err}") from None


def _set_by_flag(message: str, given: list[str]) -> bool:
    """Whether the option an error names (``--defences.repnoise.alpha ...``) may have come from a flag
    rather than the recipe file (then the file is not blamed)."""
    named = re.match(r"--([\w.-]+)", message)
    return named is None or any(g == named[1] or g.startswith(named[1] + ".") or named[1].startswith(g + ".")
                                for g in given)
