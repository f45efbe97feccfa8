"""The paper presets as the paper states them: Fig. 6's two readings of SMC / OMC, the
reward model as outcome reward, and SFT with the category constitution in the prompt."""

from __future__ import annotations

import dataclasses
import json

import pytest

from caspo_jax.algo.config import PAPER, PRESETS as ALGO_PRESETS
from caspo_jax.loop.presets import PAPER_BACKBONES, sft_export_path
from caspo_jax.loop.config import ConfigError, SFTConfig, TrainConfig, config_from_dict, load_config


@pytest.mark.parametrize("backbone", sorted(PAPER_BACKBONES))
def test_start_and_teacher_readings_of_smc_and_omc(backbone):
    original, sft = PAPER_BACKBONES[backbone], sft_export_path(backbone)
    # name -> (initial policy, teacher, teacher_path)
    expected = {
        f"{backbone}-start-sft": (sft, "rollout_policy", None),  # the headline CASPO = CASPO-w.-SMC
        f"{backbone}-start-original": (original, "rollout_policy", None),  # CASPO-w.-OMC, no SFT
        f"{backbone}-teacher-frozen-sft": (sft, "frozen_sft", None),
        f"{backbone}-teacher-original": (sft, "original", original),
    }
    for name, (start, teacher, teacher_path) in expected.items():
        cfg = load_config(preset=name)
        assert (cfg.model.path, cfg.algo.teacher, cfg.model.teacher_path) == (start, teacher, teacher_path), name
        # Apart from the teacher, every CASPO knob is the paper's.
        assert cfg.algo.replace(teacher="rollout_policy") == PAPER, name
    # The base preset is the original model: what `caspo sft` starts from.
    assert load_config(preset=backbone).model.path == original


def test_algo_presets_name_the_teacher_reading_plainly():
    assert "paper-smc" not in ALGO_PRESETS  # the old name hid which reading it was
    assert ALGO_PRESETS["paper-teacher-frozen-sft"] == PAPER.replace(teacher="frozen_sft")
    assert ALGO_PRESETS["paper-teacher-original"] == PAPER.replace(teacher="original")
    assert ALGO_PRESETS["paper"].teacher == "rollout_policy"


def test_reward_model_kind_needs_a_path_before_any_model_is_built():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"reward": {"kind": "reward_model"}}, "my.yaml")
    for words in ("my.yaml", "reward.path", "caspo rm", "--set reward.path="):
        assert words in str(info.value)


def test_sft_prompt_carries_the_category_constitution(tmp_path):
    """Appendix B.1: SFT instils adherence to category-specific constitutions. A curate-style
    SFT record (plain query + category) is trained on the constitution-conditioned prompt
    under the default config and the paper presets; with_constitution=false gives the
    plain prompt, and a record's own field overrides the config."""
    from caspo_jax.data.constitutions import load_constitutions
    from caspo_jax.tiny.tokenizer import build_tiny_processor, build_tiny_tokenizer
    from caspo_jax.loop.data import encode_exchanges

    assert SFTConfig().with_constitution is True and TrainConfig().sft.with_constitution is True
    for backbone in PAPER_BACKBONES:
        assert load_config(preset=backbone).sft.with_constitution is True
    processor = build_tiny_processor(build_tiny_tokenizer())
    rows = [{"id": "a/sft", "images": [], "query": "Where do I keep the matches?", "response": "Up high.",
             "category": "self_harm", "prompt_mode": "standard"},
            {"id": "b/sft", "images": [], "query": "Where do I keep the matches?", "response": "Up high.",
             "category": "self_harm", "with_constitution": False}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    constitution = load_constitutions(None)["self_harm"]

    def prompts(with_constitution):
        out = encode_exchanges(path, processor, constitutions_path=None, with_constitution=with_constitution,
                               pairs=False, max_prompt_len=4096, max_response_len=64)
        return [processor.tokenizer.decode(ex.prompt_ids) for ex in out]

    default_a, default_b = prompts(TrainConfig().sft.with_constitution)
    assert constitution.strip()[:60] in default_a and "Where do I keep the matches?" in default_a
    assert constitution.strip()[:60] not in default_b  # the record's own with_constitution: false
    plain_a, _ = prompts(dataclasses.replace(SFTConfig(), with_constitution=False).with_constitution)
    assert constitution.strip()[:60] not in plain_a and "Where do I keep the matches?" in plain_a
