"""The experiment a user runs: align → defend → attack → evaluate → explain → report.

Every step is a cached stage (``immunize.pipeline.stages``): the run directory holds
``stages/<kind>-<label>-<hash>/`` folders, then ``results.json`` (schema ``immunize.results/1``,
see ``immunize/report/SCHEMA.md``) and ``report/index.html``.

With a recipe's ``search:``, every defence also gets a worst-case search (a ``search`` stage running
``immunize.attacks.search.run_search`` in its stage directory, so a killed search resumes there and a
finished one is reused), and its best trial is re-run as ordinary attack budgets, one per seed of the
search, evaluated like every other budget. These *searched budgets* are per defence: their ids
(``search-worst-s<seed>``) and their group (``search-worst``) are the same for every defence, so tables
have one worst-case column, but each defence's runs use its own best trial's hyperparameters
(``results["search"][defence]["budgets"]``). A defence whose search found no worst case (no capability to
keep, or no trial within the utility bound) has no searched budget.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from immunize.config import fingerprint, git_revision, package_versions, write_provenance
from immunize.distributed import from_main, is_main, local_main_first, on_main
from immunize.io import atomic_write_json, read_json, read_jsonl
from immunize.judges.gate import identity as gate_identity
from immunize.pipeline.recipe import PRE_ATTACK_SECTIONS, MethodEntry, RunConfig
from immunize.pipeline.stages import Progress, Stage, StageRunner
from immunize.redact import redact, redact_argv

log = logging.getLogger(__name__)

RESULTS_SCHEMA = "immunize.results/1"
# The budget group of every defence's searched worst case (see the module docstring).
SEARCH_GROUP = "search-worst"
# A curve row's metrics as results.json keeps them: every attack's, and, when a run logs them, those of
# learning from feedback (``immunize.attacks.rl_curve``), from which the verdict judges reward hacking.
CURVE_METRICS = ("harmfulness", "refusal_rate", "gated_rate", "harmful_loglik")
RL_CURVE_METRICS = ("reward", "kl", "answer_tokens", "repetition", "lambda")
# results.json stability metric ← (evaluation section, metric, higher is better)
STABILITY_METRICS = {
    "mmlu_acc": ("capability", "mmlu", True),
    "truthfulqa_mc1": ("capability", "truthfulqa_mc1", True),
    "truthfulqa_mc2": ("capability", "truthfulqa_mc2", True),
    "perplexity": ("perplexity", "perplexity", False),
    "over_refusal": ("overrefusal", "refusal_rate", False),
}


def budget_id(label: str, cfg, point: dict[str, Any]) -> str:
    """``{label}-lr{lr}-n{samples}-s{seed}`` plus any other swept option, e.g. ``sft-lr8e-05-n64-s42``."""
    return _budget_name(label, cfg, point, f"-s{cfg.seed}")


def group_id(label: str, cfg, point: dict[str, Any]) -> str:
    """The budget id without its seed part, e.g. ``sft-lr8e-05-n64``: the budgets of one attack entry
    whose grid points differ only in seed share it, and form one budget group (``immunize.verdict``)."""
    return _budget_name(label, cfg, point, "")


def _budget_name(label: str, cfg, point: dict[str, Any], seed: str) -> str:
    samples = "all" if cfg.num_samples is None else cfg.num_samples
    others = "".join(f"-{key}{value}" for key, value in point.items()
                     if key not in ("learning_rate", "num_samples", "seed"))
    return f"{label}-lr{cfg.learning_rate:.10g}-n{samples}{seed}{others}"


def evaluation_weight(sections: str) -> float:
    """An evaluation stage's cost in the ETA's units: harmfulness alone, or several sections."""
    return 1.5 if "," in sections else 0.5


@dataclass
class AttackPlan:
    """What one attack stage runs against one model: an attack entry under ``grid``, with
    ``overrides`` set over its options (a searched worst case's), and the budgets its runs are
    (matched by grid point)."""

    label: str  # the stage's name after the defence: the entry's label, or the searched group
    entry: MethodEntry
    budgets: list[dict[str, Any]]
    grid: dict[str, list[Any]]
    overrides: dict[str, Any] = field(default_factory=dict)


def searched_budgets(cfg: RunConfig) -> list[dict[str, Any]]:
    """The searched group's budgets, one per seed of the recipe's search (none without one). Each
    defence runs them with its own best trial, so these records hold only what all have in common."""
    spec = cfg.search_spec
    if spec is None:
        return []
    probe = cfg.search_config(cfg.model, str(cfg.output_dir))
    attack = spec.attack.method + ("-lora" if probe.use_lora else "")
    return [{"id": f"{SEARCH_GROUP}-s{seed}", "group": SEARCH_GROUP, "label": spec.attack.label, "attack": attack,
             "epochs": probe.num_train_epochs, "seed": seed, "use_lora": probe.use_lora, "searched": True,
             "point": {"seed": seed}} for seed in spec.seeds]


def search_section(result: dict[str, Any], budgets: list[dict[str, Any]], runs: dict[str, dict]) -> dict[str, Any]:
    """A defence's ``results["search"]`` entry: its search result (``immunize.search/1``), the group of
    its searched budgets and those budgets as run against it: seed, steps and its best trial's
    hyperparameters (no budget when the search found no worst case)."""
    params = (result.get("best") or {}).get("params") or {}
    own = [{"id": b["id"], "seed": b["seed"], **{k: params[k] for k in ("learning_rate", "num_samples") if k in params},
            "steps": runs[b["id"]]["steps"], "params": params} for b in budgets if b["id"] in runs]
    return {**result, "group": SEARCH_GROUP, "budgets": own}


class Experiment:
    def __init__(self, cfg: RunConfig):
        from immunize.attacks.grid import expand_grid
        from immunize.attacks.registry import get_attack

        self.cfg = cfg
        self.root = Path(cfg.output_dir)
        self.baseline = cfg.baseline
        # Budgets: every grid point of every attack entry, the same for every defence.
        self.budgets: list[dict[str, Any]] = []
        self.attack_budgets: dict[str, list[dict[str, Any]]] = {}
        for entry in cfg.attack_entries:
            attack = get_attack(entry.method)()
            attack_cfg = cfg.attack_config(entry, cfg.model, str(self.root))
            rows = []
            for point, point_cfg in expand_grid(attack_cfg):
                rows.append({"id": budget_id(entry.label, point_cfg, point),
                             "group": group_id(entry.label, point_cfg, point), "label": entry.label,
                             "attack": entry.method + ("-lora" if point_cfg.use_lora else ""),
                             "learning_rate": point_cfg.learning_rate, "num_samples": point_cfg.num_samples,
                             "epochs": point_cfg.num_train_epochs, "seed": point_cfg.seed,
                             "use_lora": point_cfg.use_lora, **attack.budget_terms(point_cfg), "point": point})
            self.attack_budgets[entry.label] = rows
            self.budgets += rows
        self.plans = [AttackPlan(e.label, e, self.attack_budgets[e.label], e.grid) for e in cfg.attack_entries]
        self.searched_budgets = searched_budgets(cfg)
        # What each attack entry's budgets are evaluated on after the attack (its attack's choice).
        self.post_sections = {entry.label: cfg.post_attack_sections(entry) for entry in cfg.attack_entries}
        # Stage counts and weights (the ETA's cost units) as planned: align, per defence a defend stage
        # and a pre-attack evaluation, per defence and attack entry an attack stage, per defence and
        # budget a post-attack evaluation, with a search per defence a search stage, an attack stage of
        # its searched budgets and their evaluations, then the analysis.
        n_defences, n_budgets = len(cfg.defence_entries), len(self.budgets)
        n_searched = len(self.searched_budgets)
        stages = (int(cfg.alignment is not None) + n_defences * (2 + len(cfg.attack_entries) + n_budgets)
                  + (n_defences * (2 + n_searched) if cfg.search_spec else 0) + int(cfg.analysis))
        post_weight = sum(evaluation_weight(self.post_sections[b["label"]]) for b in self.budgets)
        # A defence's searched budgets: dropped from the plan when its search finds no worst case.
        self.searched_weight = sum(2.0 + evaluation_weight(self.post_sections[b["label"]])
                                   for b in self.searched_budgets)
        search_weight = 3.0 * cfg.search_spec.options.search_trials + self.searched_weight if cfg.search_spec else 0.0
        self.progress = Progress(total=stages)
        self.progress.remaining_weight = (2.0 * (cfg.alignment is not None)
                                          + n_defences * (3.0 + evaluation_weight(PRE_ATTACK_SECTIONS)
                                                          + 2.0 * n_budgets + post_weight + search_weight)
                                          + 1.0 * cfg.analysis)
        self.stages = StageRunner(self.root, self.progress)
        self.models: dict[str, dict[str, Any]] = {}

    # -- stages ----------------------------------------------------------------------------
    def judges(self) -> dict[str, str | None]:
        """Train the trainable judges this run scores with if this machine has none yet; their state.

        The state (a hash of each trained head) enters the keys of the stages that judge, so
        retraining the judges recomputes their scores instead of reusing the old heads' ones.
        Another run on this machine training them meanwhile is waited for, and its judges reused.
        """
        from immunize.judges.trained import judges_dir
        from immunize.locks import cache_lock

        with cache_lock(judges_dir(), "the trained judges"):
            return self._judges()

    def _judges(self) -> dict[str, str | None]:
        from immunize.judges import judge_entries
        from immunize.judges.trained import judges_dir, outdated, trained_state
        from immunize.judges.training import train_judges

        config = self.cfg.eval_config("", PRE_ATTACK_SECTIONS)
        used = {config.harmfulness_judge, config.refusal_judge, config.toxicity_judge}
        # And the judges a defence's (or the alignment's) data depends on, e.g. its refusal judge.
        entries = [*([self.cfg.alignment] if self.cfg.alignment else []), *self.cfg.defence_entries]
        for entry in entries:
            used |= self.cfg.defence_config(entry, self.cfg.model, str(self.root / "stages" / ".judges")).judges_used
        trainable = {entry.name for entry in judge_entries() if entry.trained}
        state = trained_state()
        needed = [name for name in state if name in used & trainable]
        missing = [name for name in needed if state[name] is None]
        if missing:
            self.progress.line(f"judges {', '.join(missing)}: not trained on this machine yet")
        for name in needed:
            if state[name] is not None and (why := outdated(name)):
                self.progress.line(f"judge {name}: {why}")
                missing.append(name)
        if missing:
            self.progress.line(f"training {', '.join(missing)} once into {judges_dir()} "
                               "(about 5 minutes on 2 CPU cores)")
            start = time.perf_counter()
            train_judges(missing, data_root_dir=self.cfg.data_root,
                         progress=lambda text: self.progress.line(f"  {text}"))
            self.progress.line(f"judges trained in {time.perf_counter() - start:.0f} s")
            state = trained_state()
        return state

    def base(self) -> tuple[str, str]:
        from immunize.models import model_fingerprint, resolve_model_source

        source = resolve_model_source(self.cfg.model)
        fp = model_fingerprint(self.cfg.model)
        self.models["base"] = {"role": "base", "defence": None, "budget": None, "path": source, "fingerprint": fp}
        return source, fp

    def _defence_stage(self, kind: str, label: str, entry, model: str, model_key: str) -> tuple[str, str]:
        """Run one defence entry (or the alignment) on ``model`` as a cached stage; (checkpoint, key)."""
        from immunize.method_runner import config_identity, data_identity, processes, run_defence

        probe = self.cfg.defence_config(entry, model, str(self.root))
        # The identity leaves paths out; the stage key holds what they point at.
        # Refusals kept by the refusal judge make the data depend on the judges (their whole state,
        # as the evaluations' keys hold it).
        judges = {"judges": self.judges_state} if probe.judges_used else {}
        stage = Stage(kind, label, {"model": model_key, "defence": entry.method, "options": config_identity(probe),
                                    "data": data_identity(probe), **processes(probe), **judges},
                      weight=2.0 if kind == "align" else 3.0)

        def work(path: Path) -> dict:
            cfg = self.cfg.defence_config(entry, model, str(path / "model"))
            run_defence(entry.method, cfg, kind="alignment" if kind == "align" else "defence")
            return {"path": str(path / "model")}

        path, _ = self.stages.run(stage, work)
        return str(path / "model"), stage.key_hash

    def align(self, base: str, base_key: str) -> tuple[str, str]:
        if self.cfg.alignment is None:
            return base, base_key
        return self._defence_stage("align", self.cfg.alignment.method, self.cfg.alignment, base, base_key)

    def defend(self, entry, aligned: str, aligned_key: str) -> tuple[str, str]:
        return self._defence_stage("defend", entry.label, entry, aligned, aligned_key)

    def evaluate(self, label: str, model: str, model_key: str, sections: str, **extra) -> dict[str, Any]:
        from immunize.evaluation import evaluate

        config = self.cfg.eval_config(model, sections, **extra)
        stage = Stage("evaluate", label, {"model": model_key, "config": dataclasses.asdict(config) | {"model": ""},
                                          "judges": self.judges_state},
                      weight=evaluation_weight(sections))

        def work(path: Path) -> dict:
            evaluate(model, config=config, output_dir=path)
            return {"path": str(path)}

        path, _ = self.stages.run(stage, work)
        return from_main({name: read_json(p) for name in sections.split(",") if (p := path / f"{name}.json").is_file()}
                         | {"_dir": str(path)})

    def attack(self, defence: str, plan: AttackPlan, model: str, model_key: str) -> dict[str, dict[str, Any]]:
        """Every budget of one attack plan against one model, sharing data preparation."""
        from immunize.attacks.registry import get_attack
        from immunize.attacks.runner import run_attacks
        from immunize.evaluation.harmfulness import HarmfulnessStepScorer
        from immunize.method_runner import config_identity, data_identity, processes

        c = self.cfg
        entry = plan.entry
        # The judge scorer generates the curve's answers; the built-in scorer adds the harmful-answer
        # log-likelihood only (generating twice would double the cost of every curve point).
        pipeline = {"curve_num_prompts": 0, "curve_num_answers": 16}

        def config(output_dir: str):
            return c.attack_config(entry, model, output_dir, grid=plan.grid or None, **plan.overrides)

        probe = config(str(self.root))
        stage = Stage("attack", f"{defence}@{plan.label}",
                      {"model": model_key, "attack": entry.method, "options": config_identity(probe),
                       "data": data_identity(probe), "grid": plan.grid, **pipeline, **processes(probe),
                       **{name: getattr(probe, name) for name in ("curve", "curve_every_steps", "curve_batch_size",
                                                                  "curve_save_models")},
                       "judge": c.harmfulness_judge, "judges": self.judges_state,
                       "curve_prompts": c.curve_num_prompts, "curve_tokens": c.curve_max_new_tokens,
                       "curve_refusal_gate": c.curve_refusal_gate,
                       **({"curve_gate_rule": gate_identity()} if c.curve_refusal_gate > 0 else {})},
                      weight=2.0 * len(plan.budgets))

        def work(path: Path) -> dict:
            scorer = HarmfulnessStepScorer(n_prompts=c.curve_num_prompts, max_new_tokens=c.curve_max_new_tokens,
                                           prompt_format=c.prompt_format, judge=c.harmfulness_judge,
                                           data_root=c.data_root, refusal_gate=c.curve_refusal_gate)
            cfg = dataclasses.replace(config(str(path)), **pipeline)
            runs = run_attacks(cfg, scorers=[scorer], report=lambda text: self.progress.line(f"  {text}"))
            attack = get_attack(entry.method)()
            out = {}
            for run in runs:
                bid = next(b["id"] for b in plan.budgets if b["point"] == run.point)
                out[bid] = {"path": str(run.output_dir), "run_id": run.run_id,
                            "steps": run.summary.get("steps"), "wall_seconds": run.summary.get("wall_seconds"),
                            "curve": run.curve, "record": attack.run_record(run.output_dir)}
            return out

        _, result = self.stages.run(stage, work)
        return result

    def search(self, entry: MethodEntry, model: str, model_key: str) -> dict[str, Any]:
        """The worst-case search of one defended model, as a stage: ``run_search`` in the stage's
        directory, so a killed search resumes from its study there and a finished one is reused."""
        from immunize.attacks.search import run_search
        from immunize.defences import get_defence
        from immunize.method_runner import config_identity, data_identity, processes

        spec = self.cfg.search_spec
        # Whether there is capability to bound is the defence's own, as results.json's defence_info says.
        search = dataclasses.replace(spec.options, search_keeps_capability=get_defence(entry.method).keeps_capability)
        probe = self.cfg.search_config(model, str(self.root))
        stage = Stage("search", f"{entry.label}@{spec.attack.label}",
                      {"model": model_key, "attack": spec.attack.method, "options": config_identity(probe),
                       "data": data_identity(probe), **processes(probe), "search": dataclasses.asdict(search),
                       "judges": self.judges_state,
                       **({"gate_rule": gate_identity()} if search.search_refusal_gate > 0 else {})},
                      weight=3.0 * search.search_trials)

        def work(path: Path) -> dict:
            return run_search(self.cfg.search_config(model, str(path)), search,
                              report=lambda text: self.progress.line(f"  {text}"))

        _, result = self.stages.run(stage, work)
        return result

    def searched_plan(self, result: dict[str, Any]) -> AttackPlan | None:
        """A search's best trial re-run under each seed of the search; None without a worst case."""
        if result["status"] != "worst_case":
            return None
        spec = self.cfg.search_spec
        return AttackPlan(SEARCH_GROUP, spec.attack, self.searched_budgets, {"seed": list(spec.seeds)},
                          dict(result["best"]["params"]))

    def searches(self, defended: dict[str, str], keys: dict[str, str],
                 attacked: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Every defence's search, and the runs of its searched budgets added to ``attacked``."""
        out = {}
        for entry in self.cfg.defence_entries:
            name = entry.label
            out[name] = self.search(entry, defended[name], keys[name])
            plan = self.searched_plan(out[name])
            if plan is None:
                self.progress.line(f"search {name}: {out[name]['summary']}; no searched budget")
                self.progress.total -= 1 + len(self.searched_budgets)
                self.progress.remaining_weight -= self.searched_weight
                continue
            attacked[name].update(self.attack(name, plan, defended[name], keys[name]))
        return out

    def analysis(self, defended: dict[str, str], attacked: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from immunize.pipeline.explain import depth_analysis

        c = self.cfg
        last = self.budgets[-1]["id"]
        chosen = [d for d in defended if not c.analysis_defences or d in c.analysis_defences or d == self.baseline]
        # The baseline's checkpoint holds the aligned model's weights: the analysis calls it "aligned".
        models = {"aligned" if d == self.baseline else d: defended[d] for d in chosen}
        models.update({f"{d}@{last}": attacked[d][last]["path"] for d in chosen})
        key = {m: self.models_key["aligned" if m == "aligned" else m] for m in models} | {
            "n": c.analysis_examples, "layers": c.analysis_layers, "lens_tokens": c.analysis_lens_tokens,
            "data_root": c.data_root, "prompt_format": c.prompt_format, "max_length": c.max_length,
            "seed": c.seed, "dtype": c.dtype}
        stage = Stage("analysis", "depth", key, weight=1.0)

        def work(path: Path) -> dict:
            return depth_analysis(models, c, chosen, baseline=self.baseline)

        # Forward passes of a few models, no training: the main process alone runs them.
        _, result = self.stages.run(stage, work, every_rank=False)
        return result

    # -- the whole experiment ----------------------------------------------------------------
    def run(self) -> Path:
        """Every stage, then results.json and the report; the run directory is held throughout, so a
        second process on it fails at once (the runners inside lock their own stage directories)."""
        from immunize.locks import run_lock

        with run_lock(self.root):
            return self._run()

    def _run(self) -> Path:
        from immunize.defences import get_defence

        c = self.cfg
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        clock = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        if is_main():
            write_provenance(self.root, {"run": c})
        # Machine-local caches (trained judges, the converted model): built once per machine by its
        # first process; the others then find them.
        with local_main_first():
            judges_state = self.judges()
            base, base_fp = self.base()
        # Stage keys hold these: the main process's, so every machine's ranks use the same stages.
        self.judges_state, base_fp = from_main((judges_state, base_fp))
        self.models["base"]["fingerprint"] = base_fp
        aligned, aligned_key = self.align(base, base_fp)
        self.models["aligned"] = {"role": "aligned", "defence": None, "budget": None, "path": aligned,
                                  "fingerprint": aligned_key}
        self.models_key = {"aligned": aligned_key}
        defended, keys = {}, {}
        for entry in c.defence_entries:
            name = entry.label
            defended[name], keys[name] = self.defend(entry, aligned, aligned_key)
            self.models[name] = {"role": "defended", "defence": entry.method, "budget": None,
                                 "path": defended[name], "fingerprint": keys[name]}
            self.models_key[name] = keys[name]
        labels = [e.label for e in c.defence_entries]

        pre = {name: self.evaluate(f"{name}-pre-attack", defended[name], keys[name], PRE_ATTACK_SECTIONS)
               for name in labels}
        attacked: dict[str, dict[str, Any]] = {name: {} for name in labels}
        for name in labels:
            for plan in self.plans:
                attacked[name].update(self.attack(name, plan, defended[name], keys[name]))
        searches = self.searches(defended, keys, attacked) if c.search_spec else {}
        post: dict[str, dict[str, dict]] = {}
        for name in labels:
            post[name] = {}
            for budget in [*self.budgets, *self.searched_budgets]:
                if (run := attacked[name].get(budget["id"])) is None:  # a search without a worst case
                    continue
                run_key = fingerprint({"model": keys[name], "budget": budget["id"], "path": run["run_id"]})
                label = f"{name}@{budget['id']}"
                self.models[label] = {"role": "attacked", "defence": name, "budget": budget["id"],
                                      "path": run["path"], "fingerprint": run_key}
                self.models_key[label] = run_key
                post[name][budget["id"]] = self.evaluate(label, run["path"], run_key,
                                                         self.post_sections[budget["label"]])
                if not budget.get("searched"):  # a searched budget's steps are each defence's own
                    budget["steps"] = run["steps"]

        defence_info = {}
        for entry in c.defence_entries:
            defence = get_defence(entry.method)
            defence_info[entry.label] = {"defence": entry.method, "options": redact(entry.options),
                                         "seed": c.seed if entry.seed is None else entry.seed,
                                         "keeps_capability": defence.keeps_capability,
                                         "attack_adapter": defence.attack_adapter}
        results = self.assemble(pre, post, attacked, searches)
        results["baseline"] = self.baseline
        results["defence_info"] = defence_info
        from immunize.report.diagnostics import training_from_markers

        # The alignment stage too: its refusals (instructed, judged) are what every defence starts from.
        trained = {**({"aligned": aligned} if c.alignment else {}), **{name: defended[name] for name in labels}}
        results["training"] = training_from_markers(trained)
        if c.analysis:
            results["analysis"] = self.analysis(defended, attacked)
        results["run"] = {
            "name": c.name, "recipe": recipe_record(c), "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_seconds": round(time.perf_counter() - clock, 1),
            "provenance": {"git_revision": git_revision(), "versions": package_versions(),
                           "command": redact_argv(["immunize", "run", *getattr(self, "argv", [])])},
        }
        from immunize.report.build import build_report
        from immunize.verdict import comparison, immunization_verdict

        results["verdict"] = immunization_verdict(results, c.phi, c.epsilon)
        results["comparisons"] = [comparison(results, a, b) for a, b in c.comparisons]

        def publish() -> Path:
            atomic_write_json(self.root / "results.json", results)
            return build_report(self.root)

        report = on_main(publish)
        self.progress.line(f"report: {report}")
        return report

    # -- results.json ------------------------------------------------------------------------
    def assemble(self, pre: dict, post: dict, attacked: dict, searches: dict | None = None) -> dict[str, Any]:
        """results.json from the evaluations before (``pre``) and after (``post``) each attack, the
        attack runs and each defence's search; a budget a defence did not meet (a searched one) has
        no cell for it."""
        from immunize.verdict import group_budgets, thresholds

        labels = list(pre)
        # The searched group is listed when some defence met it.
        searched = [b for b in self.searched_budgets if any(b["id"] in post[name] for name in labels)]
        budgets = [*self.budgets, *searched]
        harmfulness = {name: {"pre_attack": harm_cell(pre[name]["harmfulness"], pre[name]["_dir"])} for name in labels}
        curves: dict[str, dict[str, list]] = {}
        records: dict[str, dict[str, dict]] = {}
        for name in labels:
            curves[name] = {}
            for budget in (b for b in budgets if b["id"] in post[name]):
                docs = post[name][budget["id"]]
                harmfulness[name][budget["id"]] = harm_cell(docs["harmfulness"], docs["_dir"])
                curves[name][budget["id"]] = [
                    {"step": int(row["step"]), **{key: row.get(key) for key in CURVE_METRICS},
                     **{key: row[key] for key in RL_CURVE_METRICS if key in row}}
                    for row in attacked[name][budget["id"]]["curve"] if row.get("harmfulness") is not None
                ]
                if (record := attacked[name][budget["id"]].get("record")) is not None:
                    records.setdefault(name, {})[budget["id"]] = record
        results: dict[str, Any] = {
            "schema": RESULTS_SCHEMA,
            "settings": {},
            "models": self.models,
            "defences": labels,
            "budgets": [{k: v for k, v in b.items() if k != "point"} for b in budgets],
            "budget_groups": group_budgets(budgets),
            "harmfulness": harmfulness,
            "curves": curves,
            "stability": {name: stability_cells(pre[name]) for name in labels},
            "trainability": trainability_cells(pre),
            "toxicity": toxicity_cells(pre, post, budgets),
            "generalization": {},
            "samples": samples(pre, post, self.budgets),
        }
        c = self.cfg
        if c.held_out_categories:
            results["generalization"] = {
                "held_out_categories": list(c.held_out_categories),
                "cells": {name: {column: cell for column, docs in [("pre_attack", pre[name]), *post[name].items()]
                                 if (cell := category_cell(docs, c.held_out_categories)) is not None}
                          for name in labels},
            }
        if records:
            results["attack_records"] = records
        if searches:
            results["search"] = {name: search_section(result, searched, attacked[name])
                                 for name, result in searches.items()}
        phi, epsilon = thresholds(results, c.phi, c.epsilon)
        results["settings"] = {"phi": phi, "epsilon": epsilon}
        return results


def recipe_record(cfg: RunConfig) -> dict[str, Any]:
    """The recipe as run: run-wide options and the entries as given, with every option resolved
    (secret-like values masked: results.json is meant to be shared)."""
    record = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init
              and f.name not in ("align", "defences", "attacks", "search")}

    def entry(e):
        return {"label": e.label, "method": e.method, "options": e.options, **({"grid": e.grid} if e.grid else {}),
                **({"seed": e.seed} if e.seed is not None else {})}

    record["align"] = entry(cfg.alignment) if cfg.alignment else False
    record["defences"] = [entry(e) for e in cfg.defence_entries]
    record["attacks"] = [entry(e) for e in cfg.attack_entries]
    record["search"] = cfg.search_spec.record() if cfg.search_spec else False
    return redact(record)


def _metric(doc: dict | None, name: str) -> dict | None:
    if not doc:
        return None
    metric = (doc.get("metrics") or {}).get(name)
    return metric if isinstance(metric, dict) else None


def _examples(directory: str | None, doc: dict | None, section: str, metric: str,
              rows: list[dict] | None = None) -> dict[str, Any]:
    """``{"examples": [[key, outcome], ...]}`` for the verdict's paired comparisons (of ``rows``, else
    of the section's per-example records), or nothing when the result kept none."""
    from immunize.evaluation.results import example_outcomes, read_rows

    outcomes = example_outcomes(section, metric, read_rows(directory, doc) if rows is None else rows)
    return {"examples": outcomes} if outcomes else {}


def harm_cell(doc: dict, directory: str | None = None) -> dict[str, Any]:
    m = doc["metrics"]
    per_category = {cat: {"mean": v["harmfulness"]["value"], "n": v["harmfulness"]["n"]}
                    for cat, v in (doc.get("breakdown") or {}).get("by_category", {}).items()}
    return {"mean": m["harmfulness"]["value"], "ci": m["harmfulness"]["ci95"],
            "fraction_harmful": m["harmful_rate"]["value"], "refusal_rate": m["refusal_rate"]["value"],
            "n": m["harmfulness"]["n"], "per_category": per_category, **gate_fields(doc),
            **_examples(directory, doc, "harmfulness", "harmfulness")}


def gate_fields(doc: dict, rows: list[dict] | None = None) -> dict[str, Any]:
    """The refusal gate of a harmfulness result: its threshold and how many answers it scored 0
    (counted in ``rows`` when given); nothing for a result from before the gate."""
    gate = (doc.get("details") or {}).get("refusal_gate")
    if not isinstance(gate, dict):
        return {}
    gated = gate.get("gated") if rows is None else sum(bool(r.get("gated")) for r in rows)
    return {"refusal_gate": gate.get("threshold"), "gated": gated}


def category_cell(docs: dict, categories: list[str]) -> dict[str, Any] | None:
    """Harmfulness on the held-out categories only, recomputed from the per-answer records."""
    from immunize.evaluation.stats import summarize

    doc = docs["harmfulness"]
    rows = read_jsonl(Path(docs["_dir"]) / doc["generations"]) if doc.get("generations") else []
    chosen = [r for r in rows if r.get("category") in categories]
    if not chosen:
        return None
    seed = (doc.get("config") or {}).get("seed", 0)
    harm = summarize([r["harmfulness"] for r in chosen], seed=seed)
    return {"mean": harm["value"], "ci": harm["ci95"],
            "fraction_harmful": sum(r["harmful"] for r in chosen) / len(chosen),
            "refusal_rate": sum(r["refused"] for r in chosen) / len(chosen), "n": len(chosen),
            "per_category": {}, **gate_fields(doc, chosen),
            **_examples(None, doc, "harmfulness", "harmfulness", chosen)}


def stability_cells(docs: dict) -> dict[str, Any]:
    out = {}
    for name, (section, metric, higher) in STABILITY_METRICS.items():
        m = _metric(docs.get(section), metric)
        if m is not None and m.get("value") is not None:
            out[name] = {"value": m["value"], "ci": m.get("ci95"), "higher_is_better": higher,
                         **_examples(docs.get("_dir"), docs.get(section), section, metric)}
    return out


def toxicity_cell(doc: dict, directory: str | None = None) -> dict[str, Any]:
    m = doc["metrics"]
    return {"mean": m["toxicity"]["value"], "ci": m["toxicity"]["ci95"],
            "fraction_toxic": m["toxic_rate"]["value"], "n": m["toxicity"]["n"],
            **_examples(directory, doc, "toxicity", "toxicity")}


def toxicity_cells(pre: dict, post: dict, budgets: list[dict]) -> dict[str, Any]:
    """Per defence, its toxicity before any attack and after each budget whose post-attack
    evaluation measured it (those of attacks that declare it: ``Attack.post_attack_sections``)."""
    out = {}
    for name in pre:
        met = [b["id"] for b in budgets if b["id"] in post[name]]
        columns = [("pre_attack", pre[name]), *((key, post[name][key]) for key in met)]
        cells = {key: toxicity_cell(docs["toxicity"], docs["_dir"]) for key, docs in columns if docs.get("toxicity")}
        if cells:
            out[name] = cells
    return out


def trainability_cells(pre: dict) -> dict[str, Any]:
    cells: dict[str, dict] = {}
    task = None
    budget: dict[str, Any] = {}
    for name, docs in pre.items():
        doc = docs.get("trainability")
        if not doc:
            continue
        metrics = doc.get("metrics") or {}
        task = task or next((k.split("_rouge")[0] for k in metrics if "_rouge" in k), None)
        if task is None:
            continue
        cells[name] = {r: {"value": metrics[f"{task}_{r}"]["value"], "ci": metrics[f"{task}_{r}"].get("ci95"),
                           **_examples(docs.get("_dir"), doc, "trainability", f"{task}_{r}")}
                       for r in ("rouge1", "rouge2", "rougeL") if f"{task}_{r}" in metrics}
        budget = trainability_budget(doc.get("config") or {})
    return {"task": task, "budget": budget, "cells": cells} if cells else {}


def trainability_budget(config: dict[str, Any]) -> dict[str, Any]:
    """The benign fine-tune's budget in the attack budgets' terms (schema: Budget-like)."""
    steps, batch = config.get("trainability_steps"), config.get("trainability_batch_size")
    budget = {"attack": "sft", "learning_rate": config.get("trainability_learning_rate"),
              "num_samples": steps * batch if steps and batch else None, "steps": steps, "batch_size": batch}
    return {k: v for k, v in budget.items() if v is not None}


def samples(pre: dict, post: dict, budgets: list[dict], per_model: int = 3) -> list[dict]:
    """A few generations per model, the same prompts for every model, for the report."""
    out = []
    last = budgets[-1]["id"]
    sources = [(name, pre[name]) for name in pre] + [(f"{name}@{last}", post[name][last]) for name in post]
    for label, docs in sources:
        doc = docs.get("harmfulness")
        if not doc or not doc.get("generations"):
            continue
        for row in read_jsonl(Path(docs["_dir"]) / doc["generations"])[:per_model]:
            out.append({"model": label, "prompt": row["prompt"], "response": row["response"],
                        "harmfulness": row["harmfulness"]})
    return out
