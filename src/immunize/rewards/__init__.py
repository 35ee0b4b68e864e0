"""Harmful rewards for online RL attacks: a reward model trained on reversed preferences, or the
harmfulness judge's own score, each cached with a card of its held-out pairwise accuracy.

    from immunize.rewards import HarmfulRewardConfig, ensure_reward, load_reward
    directory = ensure_reward(HarmfulRewardConfig(...), splits)        # trains once, then cached
    reward = load_reward(directory)
    reward.score(prompts, answers)      # in held-out units: (raw - mean) / std
    reward.describe()                   # what a run records (kind, fingerprint, held-out accuracy)

``immunize.rewards.harmful`` is the reward model (config, data builder, TRL ``RewardTrainer``);
``immunize.rewards.store`` the cache, the card and scoring.
"""

from immunize.rewards.harmful import HarmfulRewardConfig, Pair, RewardPairs, is_heldout, reward_pairs
from immunize.rewards.store import Reward, ensure_reward, load_reward, reward_dir

__all__ = [
    "HarmfulRewardConfig",
    "Pair",
    "Reward",
    "RewardPairs",
    "ensure_reward",
    "is_heldout",
    "load_reward",
    "reward_dir",
    "reward_pairs",
]
