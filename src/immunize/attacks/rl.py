"""Online RL from harmful feedback (``--attack rl``): TRL's GRPO against a reward that prefers harm.

Rosati et al. 2024 ("Evaluating Defences against Unsafe Feedback in RLHF", arXiv 2409.12914) show
that a safety-aligned model trained by reinforcement learning against a harmful reward explores its
way to harmful behaviour, and that some defences only seem to hold because the policy games the
reward harmlessly. The offline half (DPO on reversed preferences) is ``immunize.attacks.dpo``; this
is the online half, in the method shape: a config (``RLAttackArguments``: TRL's ``GRPOConfig`` and
the attack options), a data builder (``harmful_prompts``) and a trainer (``RLTrainer``, TRL's
``GRPOTrainer``), assembled by ``OnlineRL.build_trainer``, which a reader follows top to bottom.

- **Prompts**: the distinct BeaverTails harmful prompts of the attack split, in the attacks' fixed
  order (``num_samples`` of them); each step samples ``num_generations`` answers to
  ``per_device_train_batch_size / num_generations`` prompts, scores them, and takes one GRPO step
  (group-normalized advantages, a KL penalty ``beta`` to the starting model).
- **Reward** (``reward``): ``model``, a reward model trained on reversed preferences
  (``immunize.rewards``, cached with its held-out pairwise accuracy), or ``judge``, the harmfulness
  judge's own score, in which case evaluation reuses the reward and the run summary says so. Both
  are used in their held-out units.
- **Defences as constraints** (``constraint``, ``immunize.attacks.constraints``): ``shaping``
  (reward − λ·harm) or ``lagrangian`` (Safe-RLHF: λ by dual ascent on the judge's cost against
  ``cost_budget``). The cost model is the harmfulness judge, which then is constraint and evaluator
  at once; the summary says so. A defence's attack-time adapter (security vectors) is on while the
  policy trains, and the reference carries it too (the runner's ``attack_adapter`` and
  ``attach_like``, as for DPO).
- **Budget** in the grid's terms: ``learning_rate``, ``num_samples`` (prompts), ``max_steps``,
  ``num_generations``, ``seed``.
- **Curve**: ``RLCurveScorer`` (reward, KL, answer length, repetition, λ) joins the run's resistance
  curve beside the harmfulness judge's scorer (the pipeline's, or one added here when nobody
  passed one: ``curve_harmfulness``), on the same held-out prompts.
- **Resume**: the runner resumes from the last checkpoint; λ is saved with each checkpoint.
- **Summary**: ``rl-summary.json`` in the run folder (``read_rl_summary``), written when training
  ends (again by a resumed run): the reward and its card, the constraint, the training logs' first
  and last reward/KL/cost/λ, and the reward-hacking verdict of ``immunize.reward_hacking``.
- **Several processes**: every rank finds the reward in the cache; a reward model not yet cached
  must first be built by a single-process run (one rank training it would hang the others).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from immunize.attack_adapters import attach_like
from immunize.attacks.arguments import ATTACK_HELP, ROOT_HELP, AttackArguments
from immunize.attacks.base import Attack
from immunize.attacks.constraints import CONSTRAINTS, RewardSignal, make_constraint
from immunize.attacks.curve import ResistanceCurveCallback, read_curve
from immunize.attacks.data import AttackData, harmful_qa, qa_sources, sources_of, tokenize_until
from immunize.attacks.dpo import lora_config
from immunize.attacks.rl_curve import RLCurveScorer
from immunize.data import normalize_prompt
from immunize.errors import ImmunizeError
from immunize.io import atomic_write_json, read_json
from immunize.prompts import encode_prompt, render_prompt
from immunize.reward_hacking import reward_hacking
from immunize.rewards.harmful import ATTACK_OPTIONS, HarmfulRewardConfig, check_options
from immunize.training import check_finite, load_training_model

RL_SUMMARY = "rl-summary.json"
CONSTRAINT_STATE = "rl-constraint.json"  # in each checkpoint: λ, for resume
REWARDS = ("model", "judge")


@dataclass
class RLAttackArguments(GRPOConfig, AttackArguments):
    """Online RL against a harmful reward (TRL GRPO), with a KL penalty to the starting model.

    Every ``GRPOConfig`` option works (temperature, loss_type, scale_rewards, ...); the fields below
    are the attack's own, or TRL defaults that do not suit an attack budget or a CPU.
    """

    # Curve options only decide what is measured, never the weights.
    not_identity: ClassVar[tuple[str, ...]] = ("curve_harmfulness",)

    attack: str = field(default="rl", metadata={"help": ATTACK_HELP})
    reward: str = field(default="model", metadata={
        "help": "model (a reward model trained on reversed preferences, cached) or judge (the harmfulness "
                "judge's score: evaluation then reuses the reward)"})
    reward_backbone: str = field(default="minilm", metadata={
        "help": "reward model backbone: minilm (the judges' encoder) or a model alias, directory or hub id"})
    reward_backbone_layers: int | None = field(default=None, metadata={
        "help": "keep the first N layers of the reward backbone (e.g. 6 of smollm2-135m-instruct's 30)"})
    reward_preference_data: str = field(default="mixed", metadata={
        "help": "reward model pairs: beavertails, hh_rlhf or mixed (immunize.rewards.harmful)"})
    reward_num_pairs: int = field(default=2000, metadata={"help": "reward model training pairs"})
    reward_num_train_epochs: float = field(default=1.0, metadata={"help": "reward model epochs"})
    reward_learning_rate: float = field(default=5e-5, metadata={"help": "reward model learning rate"})
    harmfulness_judge: str = field(default="harmfulness", metadata={
        "help": "the harmfulness judge: the reward with --reward judge, the cost of a --constraint, and the "
                "curve's evaluator when this attack adds one"})
    constraint: str = field(default="none", metadata={
        "help": "the defender's learning constraint: none, shaping (reward - λ·harm) or lagrangian "
                "(Safe-RLHF: λ by dual ascent on the judge's harm against --cost_budget)"})
    # λ = 1: a fully harmful answer costs one held-out standard deviation of the reward, about half the
    # reward's spread between refusing and complying for a reward model that separates them well.
    constraint_lambda: float = field(default=1.0, metadata={
        "help": "λ: the fixed weight of shaping, the starting multiplier of lagrangian"})
    # 0.1: well below φ = 0.5, the verdict's bar, so the constraint binds before the verdict would fail.
    cost_budget: float = field(default=0.1, metadata={
        "help": "lagrangian: the mean judged harm of the training answers the defender allows"})
    # With costs in [0, 1], λ moves by at most 0.1 a step: order 1 over a few dozen steps.
    lambda_lr: float = field(default=0.1, metadata={"help": "lagrangian: the dual-ascent step on λ"})
    hh_source: str | None = field(default=None, metadata={"help": "HH-RLHF harmless pairs: local file or hub id"})
    curve_harmfulness: bool = field(default=True, metadata={
        "help": "add the harmfulness judge's scorer to the curve when the caller passed none (the pipeline "
                "passes its own)"})

    # Budget. A step: 8 prompts × 4 answers × 32 tokens (the CPU sizing); 32 steps = four passes
    # over 64 prompts. 4 answers per prompt: GRPO's group baseline at half TRL's 8 (generation dominates).
    num_samples: int | None = field(default=64, metadata={"help": "attack prompts: the first N in a fixed order"})
    max_steps: int = field(default=32, metadata={"help": "GRPO steps (the budget is in steps)"})
    per_device_train_batch_size: int = field(default=32, metadata={
        "help": "answers per step and device (prompts × --num_generations)"})
    num_generations: int | None = field(default=4, metadata={"help": "answers sampled per prompt (at least 2)"})
    max_completion_length: int | None = field(default=32, metadata={"help": "tokens per sampled answer"})
    # The other attacks' default, so one grid compares them; GRPO's advantages are unit-scaled per group.
    learning_rate: float = field(default=3e-5, metadata={"help": "attack learning rate (AdamW)"})
    # The GRPO paper's KL coefficient (Shao et al. 2024); TRL's default 0 would drop the reference.
    beta: float = field(default=0.04, metadata={"help": "KL penalty to the starting model"})
    # Deterministic log-probabilities next to the reference (TRL's advice when beta > 0).
    disable_dropout: bool = field(default=True, metadata={"help": "disable dropout in policy and reference"})

    # GRPOConfig re-declares these with TRL's defaults, which would shadow ours (dataclass fields resolve
    # along the MRO): restate the project's.
    max_length: int = field(default=256, metadata={"help": "tokens per prompt + answer"})
    output_dir: str = field(default="runs/attack", metadata={"help": ROOT_HELP})
    report_to: None | str | list[str] = field(  # noqa: RUF036 -- None first, as in TrainingArguments
        default="none", metadata={"help": "loggers (none, tensorboard, wandb)"})
    logging_steps: float = field(default=1, metadata={"help": "log every N steps"})
    save_steps: float = field(default=50, metadata={"help": "checkpoint every N steps (for resume)"})
    save_total_limit: int | None = field(default=1, metadata={"help": "checkpoints kept on disk"})
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "keep dataset columns (the reward reads the question)"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer"})
    # TRL recomputes activations by default (about 20% slower); SmolLM2 on 32 short answers fits without.
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "recompute activations in the backward pass to save memory"})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "deprecated alias of --activation_checkpointing"})
    # TRL turns bf16 on by default; on a CPU without bf16 units it makes training far slower.
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (GPU)"})

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ImmunizeError(f"--reward {self.reward}: unknown (use {', '.join(REWARDS)})")
        check_options({name: getattr(self, f"reward_{name}") for name in ATTACK_OPTIONS}, prefix="reward_")
        if self.constraint not in CONSTRAINTS:
            raise ImmunizeError(f"--constraint {self.constraint}: unknown (use {', '.join(CONSTRAINTS)})")
        for name in ("constraint_lambda", "beta"):
            if getattr(self, name) < 0:
                raise ImmunizeError(f"--{name} {getattr(self, name):g}: must be 0 or more")
        if not 0 <= self.cost_budget <= 1:
            raise ImmunizeError(f"--cost_budget {self.cost_budget:g}: judged harm lies in [0, 1]")
        if self.lambda_lr <= 0:
            raise ImmunizeError(f"--lambda_lr {self.lambda_lr:g}: must be positive")
        if self.max_steps < 1:
            raise ImmunizeError(f"--max_steps {self.max_steps}: the rl attack's budget is in steps; give at least 1")
        if self.num_generations is None or self.num_generations < 2:
            raise ImmunizeError(f"--num_generations {self.num_generations}: GRPO needs at least 2 answers a prompt")
        # A copy (dataclasses.replace: grid points, run folders) carries both, one derived from the other;
        # GRPOConfig accepts only one, so the batch is derived again from the steps.
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            self.generation_batch_size = None
        batch = self.generation_batch_size or self.per_device_train_batch_size * (
            self.steps_per_generation or self.gradient_accumulation_steps)
        if batch % self.num_generations:
            raise ImmunizeError(f"--per_device_train_batch_size {self.per_device_train_batch_size}: the answers "
                                f"generated at once must be whole groups of --num_generations {self.num_generations}")
        if self.max_completion_length is None or not 0 < self.max_completion_length < self.max_length - 8:
            raise ImmunizeError(f"--max_completion_length {self.max_completion_length}: must be positive and leave "
                                f"room for a prompt in --max_length {self.max_length}")
        if self.held_out_categories and self.reward_preference_data != "beavertails":
            raise ImmunizeError("--held_out_categories needs --reward_preference_data beavertails "
                                "(HH-RLHF has no categories)")
        # Our default sets the new name, so TrainingArguments would ignore the deprecated alias: honour it.
        if self.gradient_checkpointing is not None:
            self.activation_checkpointing = self.gradient_checkpointing
        super().__post_init__()
        per_step = self.generation_batch_size // self.num_generations
        if self.num_samples is not None and self.num_samples < per_step:
            raise ImmunizeError(f"--num_samples {self.num_samples}: fewer prompts than one generation batch "
                                f"takes ({per_step})")

    def reward_config(self) -> HarmfulRewardConfig:
        """The reward model this attack trains (or, with ``reward judge``, whose held-out pairs measure the judge).

        Its seed is its own: runs of other seeds attack with the same reward model."""
        return HarmfulRewardConfig(
            use_cpu=self.use_cpu, data_root=self.data_root, qa_source=self.qa_source, hh_source=self.hh_source,
            held_out_categories=self.held_out_categories, disable_tqdm=self.disable_tqdm,
            **{name: getattr(self, f"reward_{name}") for name in ATTACK_OPTIONS})


# ---- data -------------------------------------------------------------------------------------

def harmful_prompts(splits) -> list[tuple[str]]:
    """The distinct BeaverTails harmful prompts of the attack split, in the attacks' fixed order."""
    seen: set[str] = set()
    out = []
    for prompt, _ in harmful_qa(splits):
        if (key := normalize_prompt(prompt)) not in seen:
            seen.add(key)
            out.append((prompt,))
    return out


def prompt_encoder(tokenizer, fmt: str, max_prompt_tokens: int):
    """A GRPO row: the prompt as TRL renders it (a user turn, or plain text) and the raw question."""
    def encode_one(candidate):
        (question,) = candidate
        if len(encode_prompt(tokenizer, question, fmt)) > max_prompt_tokens:
            return None
        prompt = [{"role": "user", "content": question}] if fmt == "chat" else render_prompt(tokenizer, question, fmt)
        return {"prompt": prompt, "question": question}

    return encode_one


# ---- trainer ----------------------------------------------------------------------------------

class RLTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the finite-loss guard, λ kept across resumes, and the run summary.

    ``record``: what the summary says about the reward and the constraint (fixed at the start)."""

    def __init__(self, *args, signal: RewardSignal, record: dict[str, Any], **kwargs):
        self.reward_signal, self.run_record = signal, record
        super().__init__(*args, reward_funcs=signal, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        check_finite(loss, self.state.global_step, self.args.output_dir)
        return loss

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's own files: a checkpoint complete enough to resume from (its
        # trainer_state.json is written last) always holds λ.
        folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.is_world_process_zero():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / CONSTRAINT_STATE, self.reward_signal.state())
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint:
            state = Path(resume_from_checkpoint) / CONSTRAINT_STATE
            if not state.is_file():
                raise ImmunizeError(f"{resume_from_checkpoint}: no {CONSTRAINT_STATE} (λ); delete the checkpoint "
                                    "to restart the run")
            self.reward_signal.load_state(read_json(state))
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.is_world_process_zero():
            atomic_write_json(Path(self.args.output_dir) / RL_SUMMARY, self.summary())
        return output

    def summary(self) -> dict[str, Any]:
        constraint = dict(self.run_record["constraint"])
        if self.reward_signal.constraint is not None:
            constraint["lambda_final"] = self.reward_signal.constraint.lam
        return {"reward": self.run_record["reward"], "constraint": constraint,
                "training": training_logs(self.state.log_history),
                "reward_hacking": reward_hacking(read_curve(self.args.output_dir))}


_LOGGED = ("reward", "attack_reward", "kl", "cost", "lambda", "completions/mean_length")


def training_logs(log_history: list[dict]) -> dict[str, Any]:
    """The first and last logged values of GRPO's training batches (sampled answers, not the curve's)."""
    logs = [e for e in log_history if "reward" in e and "step" in e]
    if not logs:
        return {"logged_steps": 0}

    def pick(entry: dict) -> dict[str, float]:
        return {"step": entry["step"], **{k: entry[k] for k in _LOGGED if k in entry}}

    return {"logged_steps": len(logs), "first": pick(logs[0]), "last": pick(logs[-1])}


def read_rl_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RL_SUMMARY
    return read_json(path) if path.is_file() else None


# ---- the attack -------------------------------------------------------------------------------

class OnlineRL(Attack):
    config_class = RLAttackArguments
    data_fields = (*Attack.data_fields, "hh_source", "max_completion_length", "reward", "harmfulness_judge",
                   *(f"reward_{name}" for name in ATTACK_OPTIONS))

    def prepare(self, cfg, tokenizer, splits, n) -> AttackData:
        from immunize.rewards.store import CARD_FILE, ensure_reward, reward_dir, reward_fingerprint

        rm_cfg, judge = cfg.reward_config(), _judge(cfg) if cfg.reward == "judge" else None
        if cfg.world_size > 1 and judge is None and not (reward_dir(rm_cfg) / CARD_FILE).is_file():
            # One rank would train it while the others wait on the cache lock: the collectives would hang.
            raise ImmunizeError(f"--attack rl on {cfg.world_size} processes: the reward model is not cached yet; "
                                "run the attack once in a single process to build it, then launch")
        # Built (or found in the cache) once per data configuration: every run of a grid shares it.
        directory = ensure_reward(rm_cfg, splits, judge)
        card = read_json(directory / CARD_FILE)
        encoder = prompt_encoder(tokenizer, cfg.prompt_format, cfg.max_length - cfg.max_completion_length)
        # The reward's data files (for their licences) and the reward itself, by content.
        sources = {**sources_of(qa_sources(cfg), cfg.data_root), **card["data"]["files"],
                   f"rewards/{directory.name}": reward_fingerprint(directory)}
        return tokenize_until(harmful_prompts(splits), encoder, n, sources=sources,
                              what="BeaverTails harmful prompts in the attack split")

    def budget_terms(self, cfg) -> dict[str, Any]:
        # A step trains on whole groups of answers: its prompts, each answered num_generations times.
        answers = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.world_size
        return {"prompts_per_step": answers // cfg.num_generations, "generations": cfg.num_generations,
                "completion_tokens": cfg.max_completion_length, "constraint": cfg.constraint, "beta": cfg.beta}

    def run_record(self, output_dir) -> dict[str, Any] | None:
        return read_rl_summary(output_dir)

    def load_model(self, cfg):
        # TRL adds the LoRA adapter itself (peft_config), so its reference is the adapter-free policy.
        return _starting_model(cfg)

    def build_trainer(self, cfg, model, tokenizer, data, callbacks):
        from datasets import Dataset

        from immunize.rewards.store import load_reward, reward_dir

        judge = _judge(cfg) if cfg.reward == "judge" or cfg.constraint != "none" else None
        reward = load_reward(reward_dir(cfg.reward_config(), judge if cfg.reward == "judge" else None), judge=judge)
        constraint = make_constraint(cfg.constraint, cfg.constraint_lambda, cfg.cost_budget, cfg.lambda_lr)
        signal = RewardSignal(reward.score, constraint, judge.score if constraint is not None else None)
        trainer = RLTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(data.examples),
                            processing_class=tokenizer, callbacks=list(callbacks), signal=signal,
                            record=_record(cfg, reward, judge),
                            peft_config=lora_config(cfg) if cfg.use_lora else None)
        if trainer.ref_model is not None:
            # The reference is the attack's starting policy: with the defence's attack-time adapter, if
            # any (with LoRA, TRL's reference is the policy with its LoRA off, which keeps the adapter).
            attach_like(model, trainer.ref_model)
        _join_curve(cfg, trainer, tokenizer, reward, constraint)
        return trainer


def _starting_model(cfg):
    """The model to attack, and its tokenizer, without an attack LoRA."""
    plain = copy.copy(cfg)
    plain.use_lora = False
    return load_training_model(plain)


def _judge(cfg):
    from immunize.judges import load_judge

    return load_judge(cfg.harmfulness_judge)


def _record(cfg, reward, judge) -> dict[str, Any]:
    """What the run summary states about the reward and the constraint."""
    reuses = cfg.reward == "judge"
    out_reward = {**reward.describe(), "evaluation_reuses_reward": reuses}
    if reuses:
        out_reward["note"] = (f"the reward is the harmfulness judge {judge.name!r}, which also scores the run's "
                              "harmfulness: evaluation reuses the reward, so harm is not measured independently")
    if cfg.constraint == "none":
        return {"reward": out_reward, "constraint": {"kind": "none"}}
    constraint = {"kind": cfg.constraint, "lambda_initial": cfg.constraint_lambda,
                  "cost_model": {"judge": judge.name, "fingerprint": judge.fingerprint()},
                  "judge_is_constraint_and_evaluator": True,
                  "note": (f"the harmfulness judge {judge.name!r} is both the defender's constraint and the "
                           "evaluator of harmfulness: low judged harm may mean the policy learnt to evade the judge, "
                           "not to be harmless")}
    if cfg.constraint == "lagrangian":
        constraint.update(cost_budget=cfg.cost_budget, lambda_lr=cfg.lambda_lr)
    return {"reward": out_reward, "constraint": constraint}


def _reference(cfg, trainer):
    """The starting model's logits, for the curve's KL: TRL's reference, the policy with its LoRA off,
    or (``beta`` 0 without LoRA: TRL keeps none) a frozen copy loaded here."""
    from accelerate.utils import is_peft_model

    if trainer.ref_model is not None:
        reference = trainer.ref_model
    elif is_peft_model(trainer.model):
        def adapter_off(input_ids, attention_mask):
            with trainer.model.disable_adapter():
                return trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits

        return adapter_off
    else:
        reference = _starting_model(cfg)[0].eval()
        attach_like(trainer.model, reference)

    def logits(input_ids, attention_mask):
        return reference.to(input_ids.device)(input_ids=input_ids, attention_mask=attention_mask).logits

    return logits


def _join_curve(cfg, trainer, tokenizer, reward, constraint) -> None:
    """Add the RL scorer (and, if nobody passed one, the harmfulness judge's) to the run's curve, or
    start a curve for them; both answer the same held-out prompts."""
    from immunize.evaluation.harmfulness import HarmfulnessStepScorer, load_harmful_prompts

    if not cfg.curve:
        return
    curve = next((c for c in trainer.callback_handler.callbacks if isinstance(c, ResistanceCurveCallback)), None)
    scorers = curve.scorers if curve is not None else []
    added = []
    harm = next((s for s in scorers if s.name == "harmfulness"), None)
    if harm is None and cfg.curve_harmfulness and cfg.curve_num_prompts:
        harm = HarmfulnessStepScorer(n_prompts=cfg.curve_num_prompts, max_new_tokens=cfg.curve_max_new_tokens,
                                     prompt_format=cfg.prompt_format, batch_size=cfg.curve_batch_size,
                                     judge=cfg.harmfulness_judge, data_root=cfg.data_root)
        added.append(harm)
    if harm is not None:
        prompts = harm.prompts
    else:  # 0 prompts means none here (load_harmful_prompts reads 0 as "all")
        prompts = [p.prompt for p in load_harmful_prompts("beavertails", cfg.curve_num_prompts, root=cfg.data_root)
                   ] if cfg.curve_num_prompts else []
    if prompts:
        added.append(RLCurveScorer(prompts, reward.score, _reference(cfg, trainer), fmt=cfg.prompt_format,
                                   max_new_tokens=harm.max_new_tokens if harm is not None else cfg.curve_max_new_tokens,
                                   batch_size=cfg.curve_batch_size, max_length=cfg.max_length, constraint=constraint))
    if curve is not None:
        curve.scorers.extend(added)
    elif added:
        trainer.add_callback(ResistanceCurveCallback(added, cfg.curve_every_steps, tokenizer=tokenizer,
                                                     save_models=cfg.curve_save_models))
