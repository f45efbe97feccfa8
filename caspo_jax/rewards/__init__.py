"""Outcome rewards behind one protocol: reward model, LLM judge, Python function."""

from caspo_jax.rewards.base import OutcomeReward, RewardBatch, RewardPrompt, group_ok, prompt_fields
from caspo_jax.rewards.factory import build_reward, register_reward_kind, reward_kinds
from caspo_jax.rewards.function import FunctionReward
from caspo_jax.rewards.judge import JudgeReward
from caspo_jax.rewards.reward_model import build_reward_model

register_reward_kind("reward_model", build_reward_model)

__all__ = [
    "FunctionReward",
    "JudgeReward",
    "OutcomeReward",
    "RewardBatch",
    "RewardPrompt",
    "build_reward",
    "register_reward_kind",
    "reward_kinds",
    "group_ok",
    "prompt_fields",
]
