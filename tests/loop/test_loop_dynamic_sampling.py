"""DAPO dynamic sampling: which groups are informative, how draws fill a step (prompts,
images and rollouts kept together), and the loop's fill-rate metrics."""

import sys
from pathlib import Path

import numpy as np
import pytest

from caspo_jax.loop.dynamic_sampling import fill_groups, informative_groups, take_prompts

G = 2


def draw(tag: int, rewards, images_per_prompt, prompt_width, response_width):
    """A fake draw: P = len(images_per_prompt) prompts, G rollouts each; every value tags its
    draw (tag * 100 + prompt) so selections can be read back."""
    P = len(images_per_prompt)
    ids = np.zeros((P, prompt_width), np.int32)
    ids[:, -1] = tag * 100 + np.arange(P)
    grids = np.asarray([[1, 2, 2]] * int(sum(images_per_prompt)), np.int64).reshape(-1, 3)
    owner = np.repeat(np.arange(P), images_per_prompt)
    pixels = np.repeat(tag * 100 + owner, 4)[:, None].astype(np.float32)  # 4 patches per image
    rows = np.repeat(tag * 100 + np.arange(P), G)
    return {"ids": ids, "mask": (ids != 0).astype(np.int32), "teacher_ids": ids.copy(),
            "teacher_mask": (ids != 0).astype(np.int32), "pixels": pixels if len(pixels) else np.zeros((0, 1)),
            "grids": grids, "images": np.asarray(images_per_prompt),
            "tokens": np.tile(rows[:, None], (1, response_width)).astype(np.int32),
            "response_mask": np.ones((P * G, response_width), np.int32), "rewards": np.asarray(rewards, float),
            "ok": np.ones(P * G, bool), "rollout_logp": np.zeros((P * G, 8), np.float32)}


def test_informative_groups_need_varied_scored_rewards():
    rewards = [0, 1, 1, 1, 0.5, 0.5, 0, 1]
    ok = [1, 1, 1, 1, 1, 1, 1, 0]
    assert informative_groups(rewards, ok, G).tolist() == [True, False, False, False]
    assert informative_groups([np.nan, 1.0], [0, 1], G).tolist() == [False]


def test_take_prompts_keeps_images_and_rollouts_with_their_prompt():
    part = draw(1, [0] * 6, [1, 0, 2], prompt_width=3, response_width=2)
    got = take_prompts(part, [2, 0], G)
    assert got["ids"][:, -1].tolist() == [102, 100]
    assert got["images"].tolist() == [2, 1] and len(got["grids"]) == 3
    assert got["pixels"][:, 0].tolist() == [102] * 8 + [100] * 4
    assert got["tokens"][:, 0].tolist() == [102, 102, 100, 100]


def test_fill_groups_takes_informative_groups_first_then_fills_in_draw_order():
    first = draw(1, [0, 1, 1, 1, 0, 0], [1, 0, 1], prompt_width=3, response_width=2)   # informative: p0
    second = draw(2, [1, 1, 0, 1, 0, 1], [0, 1, 1], prompt_width=5, response_width=4)  # informative: p1, p2
    flags = [informative_groups(d["rewards"], d["ok"], G) for d in (first, second)]
    merged, n = fill_groups([first, second], flags, 3, G, pad_id=0)
    assert n == 3
    assert merged["ids"].shape == (3, 5) and merged["ids"][:, -1].tolist() == [100, 201, 202]
    assert merged["tokens"].shape == (6, 4) and merged["tokens"][:, 0].tolist() == [100, 100, 201, 201, 202, 202]
    assert merged["response_mask"][:2].tolist() == [[1, 1, 0, 0]] * 2  # the shorter draw, right-padded
    assert merged["mask"][0].tolist() == [0, 0, 0, 0, 1]  # re-left-padded
    assert merged["images"].tolist() == [1, 1, 1] and merged["pixels"][:, 0].tolist() == [100] * 4 + [201] * 4 + [
        202] * 4
    # too few informative groups: the dropped ones fill the step, in draw order
    merged, n = fill_groups([first], flags[:1], 3, G, pad_id=0)
    assert n == 1 and merged["ids"][:, -1].tolist() == [100, 101, 102]


@pytest.mark.parametrize("staleness", [0, 1])
def test_the_loop_draws_until_the_step_is_full(tmp_path, monkeypatch, staleness):
    """A reward that gives every sample of the first draw 1.0 (no group informative), then
    alternates 0 / 1 (every group informative): step 1 drops its first draw's 2 groups and
    fills from a second draw; step 2 is full at once. The trained groups are the varied ones.
    With max_staleness 1 the producer thread draws and scores: the same draws, within the
    version bound."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_loop_e2e import read, small_config

    from caspo_jax.loop import caspo as caspo_mod
    from caspo_jax.loop.setup import build_policy
    from caspo_jax.rewards.base import RewardBatch

    calls = {"n": 0}

    class Scripted:
        name = "scripted"

        def score(self, prompts, responses):
            calls["n"] += 1
            n = len(responses)
            rewards = np.ones(n) if calls["n"] == 1 else (np.arange(n) % 2).astype(float)
            return RewardBatch(rewards.astype(np.float32), np.ones(n, bool), (None,) * n)

    monkeypatch.setattr(caspo_mod, "make_reward", lambda spec: Scripted())
    cfg = small_config(tmp_path, "run.steps=2", "rollout.dynamic_sampling=true",
                       "rollout.dynamic_sampling_max_draws=3", f"rollout.max_staleness={staleness}")
    caspo_mod.run_caspo(cfg, tmp_path / "run", policy=build_policy(cfg.model, cfg.data), progress=False,
                        export=False)
    first, second = read(tmp_path / "run" / "metrics.jsonl")
    assert (first["dynamic_sampling/draws"], first["dynamic_sampling/dropped_groups"]) == (2.0, 2.0)
    assert (second["dynamic_sampling/draws"], second["dynamic_sampling/dropped_groups"]) == (1.0, 0.0)
    assert first["dynamic_sampling/fill_rate"] == second["dynamic_sampling/fill_rate"] == 1.0
    assert first["reward/mean"] == 0.5 and first["reward/std"] == 0.5  # the second draw's groups trained
    assert calls["n"] == 3
    if staleness:
        assert {first["async/staleness"], second["async/staleness"]} <= {0.0, 1.0}
        assert first["async/producer_reward_s"] > 0  # scored in the producer thread
