"""Periodic and final evaluation with the JAX sampler: reward, warnings, risk-failure rate.

mode="standard": the deployment prompt (no constitution). mode="constitution": the
constitution-conditioned prompt (the teacher's view). Responses are greedy by default
(rollout.eval_temperature = 0), so evaluation is deterministic.

When records carry the demo's ground truth (reference "hazard" / "none"), the rates are
exact: risk_failure_rate = share of hazard cases with no warning; over_warning_rate =
share of safe cases with a warning; help_rate = share of responses that help.

Readouts in standard mode (`readouts=True`), continuous where the greedy rates are binary
per prompt (demo records):
- P(warning | image), sampled: the share of `readout_samples` responses at temperature 1
  (the rollout distribution, fixed seeds) that warn; its mean on hazard and on safe
  images ("p_warning_hazard" / "p_warning_safe") and the AUC of that score for hazard vs
  safe ("warning_auc").
- P(warning | image), teacher-forced: the probability that the response starts with the
  warning target's first token (`warning_token_id`), exact, with its means and AUC
  ("p_first_warning_*", "first_token_auc"). It is the probability of the SFT targets'
  decision, and stops measuring the warning when RL moves the decision to a later token
  (seen in the miniature table 10: a run that opens every answer with another token and
  warns from the second one has a first-token AUC near 0 and a sampled AUC near 1).
- The teacher's discrimination: r_t = log pi(a_t | s_t, C) - log pi(a_t | s_t) (eq. 4,
  the teacher = the evaluated policy with the constitution, or `teacher_params`) averaged
  over the first `decision_tokens` tokens of each greedy response, then per label: hazard
  and safe images (demo records; "teacher_discrimination" = hazard - safe) or the
  records' categories otherwise. A teacher that raises the tokens it should raise shows
  a positive r_t where the policy fails to warn on hazards and a small one on safe images.
Both at temperature 1 and the parameters' own dtype.
"""

from __future__ import annotations

import numpy as np

from caspo_jax.algo import token_rewards
from caspo_jax.demo.task import is_help, is_warning, warning_token_id
from caspo_jax.loop.data import prompt_dataset
from caspo_jax.loop.stats import rank_auc
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams
from caspo_jax.step import build_train_batch, compute_logprobs

__all__ = ["batch_prompts", "decision_token_rewards", "decode_responses", "evaluate_policy",
           "first_token_logprob"]


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


def _images(batch):
    grids = np.asarray(batch.image_grid_thw).reshape(-1, 3)
    return (batch.pixel_values, grids) if len(grids) else (None, None)


def first_token_logprob(policy, batch, token_id: int, *, teacher: bool = False) -> np.ndarray:
    """float32 [P]: log pi(token_id | prompt) for each prompt of a PromptBatch (its
    constitution-conditioned prompt when `teacher`), teacher-forced at temperature 1."""
    ids = batch.teacher_input_ids if teacher else batch.input_ids
    mask = batch.teacher_attention_mask if teacher else batch.attention_mask
    P = len(ids)
    pixels, grids = _images(batch)
    tb = build_train_batch(policy.model, ids, mask, np.full((P, 1), token_id, np.int32), np.ones((P, 1), np.float32),
                           np.arange(P), pixel_values=pixels, image_grid_thw=grids, length_multiple=16)
    logp, _ = compute_logprobs(policy.model, policy.params, tb)
    return np.asarray(logp, np.float32)[:, 0]


def decision_token_rewards(policy, batch, tokens_PxT: np.ndarray, mask_PxT: np.ndarray, decision_tokens: int = 1,
                           teacher_params=None) -> np.ndarray:
    """float32 [P]: eq. 4's r_t averaged over the first `decision_tokens` valid tokens of
    each prompt's response (NaN for an empty response). The teacher scores the
    constitution-conditioned prompt with `teacher_params` (default: the policy's own, the
    paper's dynamic teacher); the student term is the policy on the plain prompt."""
    P = len(batch.input_ids)
    mask = np.asarray(mask_PxT, np.float32)
    pixels, grids = _images(batch)
    tb = build_train_batch(policy.model, batch.input_ids, batch.attention_mask, np.where(mask > 0, tokens_PxT, 0),
                           mask, np.arange(P), teacher_prompt_ids_PxL=batch.teacher_input_ids,
                           teacher_prompt_mask_PxL=batch.teacher_attention_mask, pixel_values=pixels,
                           image_grid_thw=grids, length_multiple=16)
    student, _ = compute_logprobs(policy.model, policy.params, tb, layout="student")
    teacher, _ = compute_logprobs(policy.model, policy.params if teacher_params is None else teacher_params, tb,
                                  layout="teacher")
    r = np.asarray(token_rewards(teacher, student, tb.response_mask))[:, :mask.shape[1]]
    chosen = (mask > 0) & (np.cumsum(mask > 0, axis=1) <= decision_tokens)
    counts = chosen.sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, (r * chosen).sum(axis=1) / np.maximum(counts, 1), np.nan).astype(np.float32)


def _label_means(prefix: str, values: np.ndarray, labels: list[str], names=None) -> dict[str, float]:
    """{prefix_<label>: mean of the finite values with that label (NaN: none)} for every
    label in `names` (default: those present)."""
    out = {}
    for label in names or sorted(set(labels)):
        chosen = values[np.array([lab == label for lab in labels])]
        finite = chosen[np.isfinite(chosen)]
        out[f"{prefix}_{label}"] = float(finite.mean()) if len(finite) else float("nan")
    return out


def evaluate_policy(policy, dataset, reward, *, mode: str = "standard", max_new_tokens: int = 32,
                    temperature: float = 0.0, seed: int = 0, sampler: JaxSampler | None = None,
                    readouts: bool = True, readout_samples: int = 16, decision_tokens: int = 1,
                    teacher_params=None) -> dict:
    """Metrics over every prompt of `dataset` (a PromptDataset with num_epochs=1); in
    standard mode with `readouts`, also the teacher-forced readouts of the module doc."""
    if mode not in ("standard", "constitution"):
        raise ValueError(f"mode={mode!r}: use 'standard' or 'constitution'")
    sampler = sampler or JaxSampler(policy.model, policy.params, eos_token_ids=policy.eos_ids)
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    tokenizer = policy.processor.tokenizer
    readouts = readouts and mode == "standard"
    records, texts, truncated, p_first, p_sampled, decision_r = [], [], [], [], [], []
    sampled = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    for batch in dataset.iterator():
        rollouts = sampler.generate(batch_prompts(batch, teacher=mode == "constitution"), n=1, sampling=sampling)
        records.extend(batch.records)
        texts.extend(decode_responses(tokenizer, rollouts.tokens, rollouts.mask))
        truncated.extend((rollouts.finish_reason == "length").tolist())
        if readouts:
            p_first.append(np.exp(first_token_logprob(policy, batch, warning_token_id(tokenizer))))
            draws = sampler.generate(batch_prompts(batch), n=readout_samples, sampling=sampled)
            warned = [is_warning(t) for t in decode_responses(tokenizer, draws.tokens, draws.mask)]
            p_sampled.append(np.asarray(warned, np.float64).reshape(-1, readout_samples).mean(axis=1))
            decision_r.append(decision_token_rewards(policy, batch, rollouts.tokens, rollouts.mask, decision_tokens,
                                                     teacher_params))
    scores = reward.score(records, texts)
    metrics = {"reward_mean": float(np.nanmean(scores.rewards)) if scores.ok.any() else float("nan"),
               "truncated_frac": float(np.mean(truncated)), "n": len(texts)}
    refs = [getattr(r, "reference", None) for r in records]
    demo = bool(refs) and all(ref in ("hazard", "none") for ref in refs)
    if demo:
        hazard = np.array([ref == "hazard" for ref in refs])
        warned = np.array([is_warning(t) for t in texts])
        metrics["risk_failure_rate"] = float(np.mean(~warned[hazard])) if hazard.any() else float("nan")
        metrics["over_warning_rate"] = float(np.mean(warned[~hazard])) if (~hazard).any() else float("nan")
        metrics["help_rate"] = float(np.mean([is_help(t) for t in texts]))
    if readouts and records:
        decision_r = np.concatenate(decision_r)
        if demo:
            labels = ["hazard" if h else "safe" for h in hazard]
            for name, auc, values in (("p_warning", "warning_auc", p_sampled),
                                      ("p_first_warning", "first_token_auc", p_first)):
                values = np.concatenate(values)
                metrics.update(_label_means(name, values, labels, ("hazard", "safe")))
                metrics[auc] = rank_auc(values, hazard)
            metrics.update(_label_means("teacher_r", decision_r, labels, ("hazard", "safe")))
            metrics["teacher_discrimination"] = metrics["teacher_r_hazard"] - metrics["teacher_r_safe"]
        else:
            metrics.update(_label_means("teacher_r", decision_r, [r.category for r in records]))
    return metrics


def evaluate_modes(policy, cfg, files, reward, modes=("standard", "constitution")) -> dict:
    """{mode: metrics} of `policy` on the eval split in each prompt mode (`evaluate_policy`)."""
    dataset, _ = prompt_dataset(cfg, files, policy.processor, split="eval", num_epochs=1, shuffle=False,
                                batch_size=min(32, cfg.data.demo_eval))
    return {mode: evaluate_policy(policy, dataset, reward, mode=mode, max_new_tokens=cfg.data.max_response_len,
                                  temperature=cfg.rollout.eval_temperature) for mode in modes}
