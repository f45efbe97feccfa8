"""Periodic and final evaluation with the JAX sampler: reward, warnings, risk-failure rate.

mode="standard": the deployment prompt (no constitution). mode="constitution": the
constitution-conditioned prompt (the teacher's view). Responses are greedy by default
(rollout.eval_temperature = 0), so evaluation is deterministic.

When records carry the demo's ground truth (reference "hazard" / "none"), the rates are
exact: risk_failure_rate = share of hazard cases with no warning; over_warning_rate =
share of safe cases with a warning; help_rate = share of responses that help.
"""

from __future__ import annotations

import numpy as np

from caspo_jax.demo.task import is_help, is_warning
from caspo_jax.loop.data import prompt_dataset
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams

__all__ = ["batch_prompts", "decode_responses", "evaluate_policy"]


def batch_prompts(batch, teacher: bool = False, seeds=None) -> list[RolloutPrompt]:
    """RolloutPrompts of a PromptBatch (left padding removed, images split per prompt)."""
    ids = batch.teacher_input_ids if teacher else batch.input_ids
    mask = batch.teacher_attention_mask if teacher else batch.attention_mask
    grids = np.asarray(batch.image_grid_thw).reshape(-1, 3)
    patch_counts = np.prod(grids, axis=1) if len(grids) else np.zeros(0, int)
    out, image, patch = [], 0, 0
    for p, images in enumerate(batch.images):
        n = len(images)
        g = grids[image:image + n]
        count = int(patch_counts[image:image + n].sum())
        pixels = batch.pixel_values[patch:patch + count] if n else None
        out.append(RolloutPrompt(ids[p][mask[p] > 0], pixels, g if n else None, tuple(images),
                                 None if seeds is None else int(seeds[p])))
        image += n
        patch += count
    return out


def decode_responses(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    return tokenizer.batch_decode([t[m > 0].tolist() for t, m in zip(tokens, mask)], skip_special_tokens=True)


def evaluate_policy(policy, dataset, reward, *, mode: str = "standard", max_new_tokens: int = 32,
                    temperature: float = 0.0, seed: int = 0, sampler: JaxSampler | None = None) -> dict:
    """Metrics over every prompt of `dataset` (a PromptDataset with num_epochs=1)."""
    if mode not in ("standard", "constitution"):
        raise ValueError(f"mode={mode!r}: use 'standard' or 'constitution'")
    sampler = sampler or JaxSampler(policy.model, policy.params, eos_token_ids=policy.eos_ids)
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    records, texts, truncated = [], [], []
    for batch in dataset.iterator():
        rollouts = sampler.generate(batch_prompts(batch, teacher=mode == "constitution"), n=1, sampling=sampling)
        records.extend(batch.records)
        texts.extend(decode_responses(policy.processor.tokenizer, rollouts.tokens, rollouts.mask))
        truncated.extend((rollouts.finish_reason == "length").tolist())
    scores = reward.score(records, texts)
    metrics = {"reward_mean": float(np.nanmean(scores.rewards)) if scores.ok.any() else float("nan"),
               "truncated_frac": float(np.mean(truncated)), "n": len(texts)}
    refs = [getattr(r, "reference", None) for r in records]
    if refs and all(ref in ("hazard", "none") for ref in refs):
        hazard = np.array([ref == "hazard" for ref in refs])
        warned = np.array([is_warning(t) for t in texts])
        metrics["risk_failure_rate"] = float(np.mean(~warned[hazard])) if hazard.any() else float("nan")
        metrics["over_warning_rate"] = float(np.mean(warned[~hazard])) if (~hazard).any() else float("nan")
        metrics["help_rate"] = float(np.mean([is_help(t) for t in texts]))
    return metrics


def evaluate_modes(policy, cfg, files, reward, modes=("standard", "constitution")) -> dict:
    """{mode: metrics} of `policy` on the eval split in each prompt mode (`evaluate_policy`)."""
    dataset, _ = prompt_dataset(cfg, files, policy.processor, split="eval", num_epochs=1, shuffle=False,
                                batch_size=min(32, cfg.data.demo_eval))
    return {mode: evaluate_policy(policy, dataset, reward, mode=mode, max_new_tokens=cfg.data.max_response_len,
                                  temperature=cfg.rollout.eval_temperature) for mode in modes}
