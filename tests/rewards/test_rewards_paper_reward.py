"""The paper presets' outcome reward: RM_phi (Algorithm 1 line 5) loaded from a `caspo rm`
export through `build_reward`, and the error that names `caspo rm` when it is missing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from caspo_jax.data import SafetyRecord
from caspo_jax.errors import UserError
from caspo_jax.loop.presets import DEFAULT_RM_PATH, PAPER_BACKBONES, preset_dict
from caspo_jax.rewards import build_reward
from caspo_jax.rewards.reward_model import HEAD_FILE, RewardModel, RewardModelNotFound, init_head, with_head


@pytest.fixture(scope="module")
def rm_export(tmp_path_factory):
    """A tiny reward model saved as `caspo rm` saves its export (`RewardModel.save`)."""
    from caspo_jax.loop.config import DataConfig, ModelConfig
    from caspo_jax.loop.setup import build_policy

    policy = build_policy(ModelConfig(tiny="test"), DataConfig())
    params = with_head(policy.params, init_head(policy.params.text.embed.shape[1], seed=5))
    rm = RewardModel(policy.model, params, policy.processor, policy.pad_id, batch_size=4)
    directory = tmp_path_factory.mktemp("rm") / "export"
    rm.save(directory)
    return rm, directory


def _records(tmp_path):
    image = tmp_path / "stove.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(image)
    kettle = SafetyRecord("r1", (image,), "Where should I put the tea towel?", "violent",
                          reference="the towel would touch the hot plate")  # never shown to an RM
    plain = SafetyRecord("r2", (), "How do I store bleach?", "illegal")
    return [kettle, kettle, plain], ["next to the stove is fine", "keep it away from the hot plate",
                                     "away from ammonia"]


@pytest.mark.parametrize("backbone", sorted(PAPER_BACKBONES))
def test_paper_presets_train_with_the_reward_model(backbone):
    for name in (backbone, f"{backbone}-start-sft", f"{backbone}-teacher-original"):
        reward = preset_dict(name)["reward"]
        assert reward["kind"] == "reward_model" and reward["path"] == DEFAULT_RM_PATH
        assert "use_reference" not in reward


def test_rm_export_scores_records_through_build_reward(rm_export, tmp_path):
    rm, directory = rm_export
    prompts, responses = _records(tmp_path)
    want = rm.score(prompts, responses)
    assert want.ok.all() and len(set(want.rewards.tolist())) == 3
    spec = {**preset_dict("qwen2_5_vl_7b")["reward"], "path": str(directory)}
    exact = build_reward({**spec, "dtype": "float32"})
    assert isinstance(exact, RewardModel)
    got = exact.score(prompts, responses)
    assert got.ok.all()
    np.testing.assert_allclose(got.rewards, want.rewards, rtol=1e-5, atol=1e-6)
    # The preset's own spec (bfloat16 weights) loads and scores every record too.
    paper = build_reward(spec).score(prompts, responses)
    assert paper.ok.all() and np.isfinite(paper.rewards).all()


def test_missing_rm_export_names_caspo_rm_and_the_set_to_fix_it(tmp_path):
    spec = preset_dict("qwen3_vl_4b")["reward"]
    for path, why in ((tmp_path / "nowhere", "does not exist"), (tmp_path, f"has no {HEAD_FILE}")):
        with pytest.raises(RewardModelNotFound) as info:
            build_reward({**spec, "path": str(path)})
        message = str(info.value)
        for words in (why, "caspo rm", "--set reward.path=", str(path)):
            assert words in message
        assert isinstance(info.value, UserError)  # the CLI prints it as one line, exit 2
