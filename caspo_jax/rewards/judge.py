"""Outcome rewards from an OpenAI-compatible judge scoring the R/S/E rubric.

The judge sees the query, the images (as base64 data URLs), the category and the response
(and the dataset's hazard reference only when `use_reference=True`, an explicit opt-in:
see `JudgeReward`); it returns R, S, E in {0, 1, 2}, reduced to
a scalar by `reduce` (default `rse_to_reward` = (R+S+E)/6). Transport failures are
retried by the client; unparseable replies get one repair round; whatever still fails is
reported per item with NaN reward (the trainer masks its group), never scored 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from caspo_jax.llm.client import ChatClient, ClientConfig
from caspo_jax.rewards.base import RewardBatch, prompt_fields
from caspo_jax.rubric.rse import RUBRIC_VERSION, RSEItem, RSEJudgement, RSEScore, judge_rse, rse_to_reward

__all__ = ["JudgeReward"]


class JudgeReward:
    """OutcomeReward backed by `judge_rse`.

    client: a ChatClient, or a ClientConfig to build one (the API key is read from the
      environment variable the config names; it is never stored here).
    use_reference: show the dataset's hazard reference to the judge. Off by default: the
      reference is privileged information that the paper's outcome reward RM_phi
      (Algorithm 1 line 5, eq. 7) never sees, so a judge that reads it scores an easier
      task than the paper's reward does. Turn it on explicitly (`use_reference: true` in
      the reward config) when that is what you want, e.g. to anchor R on the intended
      hazard while curating data; `caspo curate respond` judges with the reference by
      design, training and the paper presets do not.
    image_max_pixels: downscale images above this many pixels before sending them.
    """

    def __init__(
        self,
        client: ChatClient | ClientConfig,
        *,
        reduce: Callable[[RSEScore], float] = rse_to_reward,
        use_reference: bool = False,
        json_mode: bool = True,
        progress: str | None = None,
        name: str = "judge",
        image_max_pixels: int | None = None,
    ):
        self.client = client if isinstance(client, ChatClient) else ChatClient(client)
        self.reduce = reduce
        self.use_reference = use_reference
        self.json_mode = json_mode
        self.progress = progress
        self.name = name
        self.image_max_pixels = image_max_pixels
        self.rubric_version = RUBRIC_VERSION
        self.last_judgements: list[RSEJudgement] = []

    def __repr__(self) -> str:
        return f"JudgeReward(model={self.client.config.model!r}, rubric={self.rubric_version!r})"

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> RewardBatch:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        items = []
        for prompt, response in zip(prompts, responses):
            fields = prompt_fields(prompt)
            items.append(
                RSEItem(
                    query=fields.query,
                    response=response,
                    images=fields.images,
                    category=fields.category,
                    hazard_reference=fields.reference if self.use_reference else None,
                )
            )
        before = self.client.stats
        judgements = judge_rse(
            self.client, items, json_mode=self.json_mode, progress=self.progress,
            image_max_pixels=self.image_max_pixels,
        )
        after = self.client.stats
        self.last_judgements = judgements
        values = [self.reduce(j.score) if j.ok else None for j in judgements]
        errors = [None if j.ok else (j.error or "judge failed") for j in judgements]
        metrics = {
            "judge/requests": float(after.requests - before.requests),
            "judge/retries": float(after.retries - before.retries),
            "judge/cache_hits": float(after.cache_hits - before.cache_hits),
            "judge/prompt_tokens": float(after.prompt_tokens - before.prompt_tokens),
            "judge/completion_tokens": float(after.completion_tokens - before.completion_tokens),
        }
        scored = [j.score for j in judgements if j.ok]
        for field in ("risk", "safety", "effectiveness"):
            metrics[f"judge/{field}_mean"] = (
                float(np.mean([getattr(s, field) for s in scored])) if scored else float("nan")
            )
        return RewardBatch.from_items(values, errors, metrics)
