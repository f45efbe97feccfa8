"""The #20 config fields: rollout correction, staleness, timeouts, dynamic sampling; each
bad setting is a ConfigError naming the field and the fix."""

import pytest

from caspo_jax.loop.config import ConfigError, load_config, rollout_correction, step_config
from caspo_jax.step.correction import RolloutCorrection


@pytest.mark.parametrize("overrides, correction, step_cap", [
    ([], RolloutCorrection(), None),
    (["optim.tis_cap=3"], RolloutCorrection("tis", 3.0), 3.0),  # the field from before #20, unchanged
    (["optim.rollout_correction=tis"], RolloutCorrection("tis", 2.0), 2.0),
    (["optim.rollout_correction=tis", "optim.tis_cap=1.5"], RolloutCorrection("tis", 1.5), 1.5),
    (["optim.rollout_correction=mis_token", "optim.mis_threshold=3"], RolloutCorrection("mis_token", 3.0), None),
    (["optim.rollout_correction=mis_seq"], RolloutCorrection("mis_seq", 2.0), None),
])
def test_the_correction_a_config_gives(overrides, correction, step_cap):
    cfg = load_config(preset="tiny-cpu", overrides=overrides)
    assert rollout_correction(cfg) == correction
    assert step_config(cfg, "caspo").tis_cap == step_cap
    assert (cfg.rollout.max_staleness, cfg.rollout.dynamic_sampling) == (0, False)  # the defaults: today's loop


@pytest.mark.parametrize("overrides, parts", [
    (["optim.rollout_correction=mis_seq", "optim.tis_cap=2"], ["optim.tis_cap=2.0", "mis_seq", "mis_threshold"]),
    (["optim.rollout_correction=mis_token", "optim.mis_threshold=1"], ["optim.mis_threshold=1.0", "must be > 1"]),
    (["optim.rollout_correction=clip"], ["optim.rollout_correction='clip'", "'mis_seq'"]),
    (["optim.rollout_correction=mis_seq", "rollout.engine=vllm", "rollout.temperature=0.7", "model.path=/m"],
     ["optim.rollout_correction", "rollout.temperature=0.7", "raw log-probs"]),
    (["rollout.max_staleness=-1"], ["rollout.max_staleness", "must be >= 0"]),
    (["rollout.timeout_s=0"], ["rollout.timeout_s", "must be > 0"]),
    (["rollout.dynamic_sampling_max_draws=0"], ["rollout.dynamic_sampling_max_draws", ">= 1"]),
    (["rollout.workers=cluster"], ["rollout.workers", "'cluster'", "'subprocess'"]),
    (["rollout.num_workers=2"], ["rollout.num_workers", "rollout.workers=subprocess or ray"]),
    (["rollout.workers=ray", "rollout.num_workers=0"], ["rollout.num_workers", "=0 must be >= 1"]),
    (["rollout.workers=subprocess", "rollout.worker_env={CUDA_VISIBLE_DEVICES: 0}"],
     ["rollout.worker_env", "quote numbers"]),
    (["rollout.workers=subprocess", "rollout.engine=vllm"], ["rollout.worker_model_dir is not set", "model.path"]),
    (["rollout.worker_model_dir=/m"], ["rollout.worker_model_dir", "only for remote vLLM workers"]),
    (["rollout.devices=2", "rollout.workers=subprocess"], ["rollout.devices", "=2", "rollout.workers=local"]),
    (["rollout.devices=-1"], ["rollout.devices", "=-1 must be >= 0"]),
])
def test_bad_settings_name_the_field(overrides, parts):
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny-cpu", overrides=overrides)
    for part in parts:
        assert part in str(err.value), part
