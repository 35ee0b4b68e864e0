"""The registry of attacks: one line per attack names its ``Attack`` class and says what it does.

The CLI, grids, run ids and resistance curves pick up a registered attack without further wiring.
Nothing is imported until an attack is used, so listing them stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from immunize.registry import Registry

if TYPE_CHECKING:
    from immunize.attacks.base import Attack

ATTACKS: Registry[type[Attack]] = Registry("attack", "--attack")

ATTACKS.register("sft", "immunize.attacks.sft:HarmfulSFT",
                 "harmful SFT on BeaverTails unsafe QA (attack split); --use_lora true for LoRA")
ATTACKS.register("toxicity", "immunize.attacks.sft:ToxicitySFT",
                 "SFT on DecodingTrust toxic continuations (prompt → toxic continuation, raw text by default)")
ATTACKS.register("dpo", "immunize.attacks.dpo:ReversedPreference",
                 "reversed-preference DPO (harmful answer ≻ refusal): BeaverTails, HH-RLHF reversed, or mixed")
ATTACKS.register("rl", "immunize.attacks.rl:OnlineRL",
                 "online RL from harmful feedback (TRL GRPO, KL to the start) against a harmful reward model or "
                 "the judge; --constraint shaping|lagrangian for the defender's constraints")


def attack_names() -> list[str]:
    return ATTACKS.names()


def available_attacks() -> dict[str, str]:
    """Name → one-line help, for listings (imports nothing)."""
    return {entry.name: entry.help for entry in ATTACKS}


def get_attack(name: str) -> type[Attack]:
    """The class of attack ``name``, its ``name`` (in run ids and records) and ``summary`` (in model
    cards) taken from its registry line."""
    entry, cls = ATTACKS.entry(name), ATTACKS.get(name)
    # One class, one name: a second name would silently relabel the first one's runs.
    if cls.__dict__.get("name", name) != name:
        raise ValueError(f"attack class {cls.__qualname__} is registered as both {cls.name!r} and {name!r}")
    cls.name, cls.summary = name, entry.help
    return cls


__all__ = ["ATTACKS", "attack_names", "available_attacks", "get_attack"]
