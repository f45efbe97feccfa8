"""The outcome-reward protocol shared by the judge, Python functions and (later) reward models.

Every reward source answers `score(prompts, responses) -> RewardBatch`: one float per
response plus whether it could be scored. A failure is never a number: its reward is NaN,
`ok` is False, and `errors` says why, so the trainer can exclude the whole group
(`group_ok`) instead of learning from a fake zero.

Let N denote the number of responses and G the number of prompt groups (N = G * group size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["OutcomeReward", "RewardBatch", "RewardPrompt", "group_ok", "prompt_fields", "records_problem"]


@dataclasses.dataclass(frozen=True)
class RewardPrompt:
    """What a reward may look at besides the response. `SafetyRecord` satisfies it too."""

    query: str
    images: tuple[str | Path, ...] = ()
    category: str | None = None
    reference: str | None = None
    id: str | None = None


def prompt_fields(prompt: Any) -> RewardPrompt:
    """Duck-typed view of a prompt: a RewardPrompt, a SafetyRecord, a mapping or a string."""
    if isinstance(prompt, RewardPrompt):
        return prompt
    if isinstance(prompt, str):
        return RewardPrompt(query=prompt)
    get = prompt.get if isinstance(prompt, dict) else lambda k, d=None: getattr(prompt, k, d)
    query = get("query")
    if not isinstance(query, str):
        raise TypeError(f"prompt {prompt!r} has no string 'query'")
    return RewardPrompt(
        query=query,
        images=tuple(get("images", ()) or ()),
        category=get("category"),
        reference=get("reference"),
        id=get("id"),
    )


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """rewards_N: float32, NaN where ok_N is False. errors[i] is None exactly when ok_N[i]."""

    rewards: np.ndarray
    ok: np.ndarray
    errors: tuple[str | None, ...]
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = len(self.errors)
        if self.rewards.shape != (n,) or self.ok.shape != (n,):
            raise ValueError(f"RewardBatch shapes disagree: {self.rewards.shape}, {self.ok.shape}, {n}")
        if np.isnan(self.rewards[self.ok]).any():
            raise ValueError("RewardBatch: an ok item has a NaN reward")
        if not np.isnan(self.rewards[~self.ok]).all():
            raise ValueError("RewardBatch: a failed item has a numeric reward (must be NaN)")

    def __len__(self) -> int:
        return len(self.errors)

    @property
    def num_failed(self) -> int:
        return int((~self.ok).sum())

    @classmethod
    def from_items(
        cls, values: Sequence[float | None], errors: Sequence[str | None], metrics: dict | None = None
    ) -> "RewardBatch":
        ok = np.array([e is None for e in errors], dtype=bool)
        rewards = np.array(
            [float(v) if e is None else np.nan for v, e in zip(values, errors)], dtype=np.float32
        ).reshape(len(errors))
        base = {
            "reward/scored": float(ok.sum()),
            "reward/failed": float((~ok).sum()),
            "reward/mean": float(rewards[ok].mean()) if ok.any() else float("nan"),
        }
        return cls(rewards, ok, tuple(errors), {**base, **(metrics or {})})


@runtime_checkable
class OutcomeReward(Protocol):
    """A source of outcome rewards R_o (judge, Python function, reward model).

    A reward may also define `check_records(prompts) -> str | None`: a cheap test, run on
    the training records before step 1 (`records_problem`), of whether it can score them
    at all (None: yes; else why not). A reward without it is assumed to score anything.
    """

    name: str

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> RewardBatch:
        """One reward per (prompt, response) pair; prompts[i] goes with responses[i]."""
        ...


def records_problem(reward: OutcomeReward, prompts: Sequence[Any]) -> str | None:
    """Why `reward` cannot score `prompts` (its optional `check_records`), or None."""
    check = getattr(reward, "check_records", None)
    return None if check is None else check(prompts)


def group_ok(ok_N: np.ndarray, group_size: int) -> np.ndarray:
    """ok_G: True for groups whose every response was scored (else mask the group's advantage).

    GRPO normalises rewards within a group; one missing reward would shift the group's
    mean and std, so the whole group is excluded rather than imputed.
    """
    ok_N = np.asarray(ok_N, dtype=bool)
    if group_size < 1 or ok_N.shape[0] % group_size:
        raise ValueError(f"{ok_N.shape[0]} responses do not split into groups of {group_size}")
    return ok_N.reshape(-1, group_size).all(axis=1)
