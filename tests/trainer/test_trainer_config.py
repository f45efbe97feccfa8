"""Config loading, overrides and validation: every error before any compute, naming the field."""

import pytest
import yaml

from caspo_jax.trainer.config import ConfigError, TrainConfig, config_from_dict, dump_config, load_config
from caspo_jax.launch.presets import PRESETS


def test_defaults_are_the_paper_settings():
    cfg = TrainConfig()
    assert (cfg.algo.prompts_per_step, cfg.algo.group_size) == (64, 32)
    assert (cfg.algo.lam, cfg.algo.beta, cfg.algo.kl_kind, cfg.algo.clip_low) == (0.3, 0.005, "k3", 0.2)
    assert cfg.algo.learning_rate == 2e-6 and cfg.run.epochs == 3
    assert (cfg.data.max_prompt_len, cfg.data.max_response_len) == (2048, 1024)
    assert (cfg.sft.learning_rate, cfg.sft.epochs) == (1e-5, 2)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = load_config(preset=name)
    assert cfg.rollouts_per_step % cfg.optim.minibatch_size == 0


def test_paper_presets_match_the_paper():
    for name in ("qwen2_5_vl_7b", "qwen3_vl_4b"):
        cfg = load_config(preset=name)
        assert (cfg.algo.prompts_per_step, cfg.algo.group_size, cfg.algo.learning_rate) == (64, 32, 2e-6)
        assert (cfg.data.max_prompt_len, cfg.data.max_response_len, cfg.run.epochs) == (2048, 1024, 3)
        assert (cfg.algo.beta, cfg.algo.kl_kind, cfg.algo.lam, cfg.algo.clip_high) == (0.005, "k3", 0.3, 0.2)


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"algo": {"lam": 0.6, "learning_rate": "2e-6"}, "run": {"steps": 5}}))
    cfg = load_config(preset="tiny-cpu", path=path, overrides=["algo.lam=1.0", "algo.variant=token",
                                                               "reward.kind=demo"])
    assert cfg.algo.lam == 1.0 and cfg.algo.variant == "token" and cfg.run.steps == 5
    assert cfg.algo.learning_rate == 2e-6  # YAML reads 2e-6 as a string; coerced to float
    assert cfg.data.max_response_len == 16  # from the preset
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("raw, words", [
    ({"algo": {"lamda": 0.3}}, ["algo", "lamda", "unknown"]),
    ({"algoo": {}}, ["algoo", "unknown section"]),
    ({"algo": {"group_size": 1}}, ["group_size", "G >= 2"]),
    ({"algo": {"lam": -0.1}}, ["lam", ">= 0"]),
    ({"algo": {"prompts_per_step": 4, "group_size": 8}, "optim": {"minibatch_size": 12}},
     ["minibatch_size", "divide"]),
    ({"run": {"steps": "ten"}}, ["run.steps", "int"]),
    ({"model": {"tiny": "huge"}}, ["model.tiny"]),
])
def test_bad_configs_fail_with_the_field(raw, words):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, "my.yaml")
    message = str(info.value)
    assert "my.yaml" in message
    for word in words:
        assert word in message


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(overrides=["lam"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(overrides=["alg.lam=1"])
