"""Rewards from any Python callable: custom and toy tasks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from caspo_jax.rewards.base import RewardBatch

__all__ = ["FunctionReward"]


class FunctionReward:
    """Wraps `fn(prompt, response) -> float | None` (or, with batched=True,
    `fn(prompts, responses) -> list[float | None]`).

    None, a non-finite value or an exception marks the item failed (excluded, never 0);
    the exception's message is reported in `errors`.

    check: optional `check(prompt) -> str | None`, why `fn` cannot score a prompt at all
    (None: it can), asked of a dataset's records before training (`check_records`).
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None, *, batched: bool = False,
                 check: Callable[[Any], str | None] | None = None):
        self.fn = fn
        self.batched = batched
        self.check = check
        self.name = name or getattr(fn, "__name__", "function")

    def check_records(self, prompts: Sequence[Any]) -> str | None:
        """Why some of `prompts` cannot be scored (how many, and the first one's id and
        reason), or None when all can (or no `check` was given)."""
        if self.check is None:
            return None
        problems = [(p, why) for p in prompts if (why := self.check(p)) is not None]
        if not problems:
            return None
        first, why = problems[0]
        record_id = first.get("id") if isinstance(first, dict) else getattr(first, "id", None)
        return (f"{len(problems)} of {len(prompts)} records cannot be scored by the {self.name!r} reward; "
                f"the first (id {record_id!r}): {why}")

    def __repr__(self) -> str:
        return f"FunctionReward(name={self.name!r}, batched={self.batched})"

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> RewardBatch:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if self.batched:
            try:
                raw = list(self.fn(list(prompts), list(responses)))
            except Exception as exc:  # the whole batch failed: report every item
                message = f"{self.name} raised {type(exc).__name__}: {exc}"
                return RewardBatch.from_items([None] * len(responses), [message] * len(responses))
            if len(raw) != len(responses):
                raise ValueError(f"{self.name} returned {len(raw)} rewards for {len(responses)} responses")
        else:
            raw = []
            for prompt, response in zip(prompts, responses):
                try:
                    raw.append(self.fn(prompt, response))
                except Exception as exc:
                    raw.append(exc)
        values: list[float | None] = []
        errors: list[str | None] = []
        for value in raw:
            if isinstance(value, Exception):
                values.append(None)
                errors.append(f"{self.name} raised {type(value).__name__}: {value}")
                continue
            try:
                number = None if value is None else float(value)
            except (TypeError, ValueError):
                number = None
            if number is None or not math.isfinite(number):
                values.append(None)
                errors.append(f"{self.name} returned {value!r}, not a finite number")
            else:
                values.append(number)
                errors.append(None)
        return RewardBatch.from_items(values, errors)
