"""Outcome rewards behind one protocol: reward model, LLM judge, Python function."""

from caspo_jax.rewards.base import OutcomeReward, RewardBatch, RewardPrompt, group_ok, prompt_fields
from caspo_jax.rewards.function import FunctionReward
from caspo_jax.rewards.judge import JudgeReward

__all__ = [
    "FunctionReward",
    "JudgeReward",
    "OutcomeReward",
    "RewardBatch",
    "RewardPrompt",
    "group_ok",
    "prompt_fields",
]
