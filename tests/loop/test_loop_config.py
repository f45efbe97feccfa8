"""Config loading, overrides and validation: every error before any compute, naming the field."""

import pytest
import yaml

from caspo_jax.loop.config import ConfigError, TrainConfig, config_from_dict, dump_config, load_config
from caspo_jax.loop.presets import PRESETS


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
    ({"run": {"mesh_fsdp": 0}}, ["run.mesh_fsdp", "-1"]),
    ({"algo": {"teacher": "original"}}, ["model.teacher_path", "CASPO-w.-OMC"]),
    ({"model": {"teacher_path": "/x"}}, ["model.teacher_path", "algo.teacher=original"]),
    ({"run": {"mesh_data": -1, "mesh_tensor": -1}}, ["at most one", "-1"]),
    ({"model": {"remat": "save_everything"}}, ["model.remat", "save_projections"]),
    ({"model": {"remat": 3}}, ["model.remat", "str"]),
    ({"algo": {"prompts_per_step": 2, "group_size": 4}, "optim": {"minibatch_size": 4},
      "run": {"mesh_data": 2, "mesh_fsdp": 4}}, ["optim.minibatch_size", "run.mesh_data * run.mesh_fsdp", "8"]),
    ({"optim": {"micro_batches": 3}}, ["optim.micro_batches", "=3 must", "divide optim.minibatch_size=512"]),
    ({"optim": {"micro_batches": 0}}, ["optim.micro_batches", "=0 must", ">= 1"]),
    ({"optim": {"tis_cap": 0}}, ["optim.tis_cap", "=0.0 must", "> 0", "null"]),
    ({"optim": {"logprob_chunk": 0}}, ["optim.logprob_chunk", "=0 must", ">= 1"]),
    ({"optim": {"adam_eps": 0}}, ["optim.adam_eps", "=0.0 must", "> 0"]),
    ({"optim": {"grad_clip": -1}}, ["optim.grad_clip", "=-1.0 must", "null"]),
    ({"optim": {"warmup_steps": -2}}, ["optim.warmup_steps", "=-2 must", ">= 0"]),
    ({"optim": {"freeze_vision": "yes"}}, ["optim.freeze_vision", "bool"]),
    ({"optim": {"tis_cap": 2.0}, "rollout": {"engine": "vllm", "temperature": 0.7}},
     ["optim.tis_cap", "rollout.temperature=0.7", "raw log-probs"]),
    ({"model": {"attn_implementation": "flash"}}, ["model.attn_implementation", "='flash' must", "cudnn"]),
    ({"model": {"gpu_memory_split": 0.97}}, ["model", "gpu_memory_split=0.97 must", "(0, 0.95)", "null"]),
    ({"model": {"gpu_memory_split": 0}}, ["model", "gpu_memory_split=0.0 must", "vLLM engine"]),
])
def test_bad_configs_fail_with_the_field(raw, words):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, "my.yaml")
    message = str(info.value)
    assert "my.yaml" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("full", "full"),
                                             ("save_projections", "save_projections")])
def test_remat_takes_a_switch_or_a_policy_name(value, expected):
    cfg = load_config(preset="tiny-cpu", overrides=[f"model.remat={value}"])
    assert cfg.model.remat == expected


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(overrides=["lam"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(overrides=["alg.lam=1"])


def test_mesh_shape_fills_minus_one_and_names_the_field_when_devices_do_not_fit():
    from caspo_jax.loop.config import RunConfig
    from caspo_jax.loop.placement import mesh_shape

    assert mesh_shape(RunConfig(), 8) == (8, 1, 1)
    assert mesh_shape(RunConfig(mesh_data=2, mesh_fsdp=-1, mesh_tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(RunConfig(mesh_data=1), 8) == (1, 1, 1)  # one process may use the first devices
    with pytest.raises(ConfigError, match=r"run.mesh_data=3 .* does not divide the 8 devices"):
        mesh_shape(RunConfig(mesh_data=3), 8)
    with pytest.raises(ConfigError, match="must use every device"):
        mesh_shape(RunConfig(mesh_data=2), 8, multi_process=True)


def test_placement_rejects_rows_the_mesh_cannot_split():
    from caspo_jax.loop.placement import make_placement

    cfg = load_config(preset="tiny-cpu", overrides=["run.mesh_data=-1", "optim.minibatch_size=4",
                                                    "algo.prompts_per_step=2", "algo.group_size=4"])
    import jax

    if jax.device_count() % 8:
        pytest.skip("needs the 8 simulated devices of tests/conftest.py")
    with pytest.raises(ConfigError, match=r"optim.minibatch_size=4 rows .* 8 \* 1 = 8"):
        make_placement(cfg, None, None, rows=cfg.optim.minibatch_size, rows_field="optim.minibatch_size")
    assert make_placement(cfg.replace(run=cfg.run.__class__(mesh_data=1)), None, None, rows=4,
                          rows_field="x").mesh is None  # one device: nothing is placed


def test_merge_prompt_rows_restores_the_one_process_order():
    """Two processes' shares (interleaved prompts, different widths and image counts) merge
    into the arrays one process would have built."""
    import numpy as np

    from caspo_jax.loop.placement import merge_prompt_rows

    G = 2

    def share(prompts, width, resp_width):
        ids = np.full((len(prompts), width), 9, np.int32)  # left-padded with the pad id, as the pipeline does
        mask = np.zeros_like(ids)
        for i, (p, n_img) in enumerate(prompts):
            ids[i, width - 2:] = [p, p + 100]
            mask[i, width - 2:] = 1
        grids = np.asarray([[1, 2, 2]] * sum(n for _, n in prompts), np.int32).reshape(-1, 3)
        pixels = np.concatenate([np.full((4 * n, 3), p, np.float32) for p, n in prompts])
        tokens = np.asarray([[p * 10 + g] * resp_width for p, _ in prompts for g in range(G)], np.int32)
        return {"ids": ids, "mask": mask, "teacher_ids": ids + 1, "teacher_mask": mask, "pixels": pixels,
                "grids": grids, "images": np.asarray([n for _, n in prompts]), "tokens": tokens,
                "response_mask": tokens > 0, "rewards": tokens[:, 0].astype(np.float64)}

    # global prompts 0..3: process 0 read 0 and 2, process 1 read 1 and 3 (grain's interleaving)
    merged = merge_prompt_rows([share([(0, 1), (2, 2)], 4, 3), share([(1, 0), (3, 1)], 6, 5)], G, pad_id=9)
    assert merged["ids"].shape == (4, 6) and merged["ids"][:, -2:].tolist() == [[0, 100], [1, 101], [2, 102],
                                                                                  [3, 103]]
    assert (merged["ids"][0, :4] == 9).all() and merged["mask"][0].tolist() == [0, 0, 0, 0, 1, 1]
    assert merged["images"].tolist() == [1, 0, 2, 1] and len(merged["grids"]) == 4
    assert merged["pixels"][:, 0].tolist() == [0] * 4 + [2] * 8 + [3] * 4  # images stay with their prompt
    assert merged["tokens"][:, 0].tolist() == [0, 1, 10, 11, 20, 21, 30, 31] and merged["tokens"].shape[1] == 5
    assert merged["rewards"].tolist() == [0, 1, 10, 11, 20, 21, 30, 31]
    assert merged["response_mask"][2:4, 3:].all() and not merged["response_mask"][4:6, 3:].any()


def test_every_step_knob_is_set_from_the_run_config():
    """`step_config` is the jitted step's whole config: each knob from one run-config field."""
    from caspo_jax.loop.config import step_config

    cfg = load_config(preset="tiny-cpu", overrides=[
        "optim.micro_batches=4", "optim.tis_cap=2.0", "optim.freeze_vision=true", "optim.logprob_chunk=32",
        "optim.adam_eps=1e-6", "optim.grad_clip=null", "optim.weight_decay=0.1", "optim.b1=0.8", "optim.b2=0.99",
        "optim.warmup_steps=5", "model.dtype=bfloat16", "model.remat=save_projections", "rollout.temperature=0.7",
        "algo.learning_rate=2e-6", "sft.learning_rate=1e-5", "dpo.learning_rate=1e-6", "rm.learning_rate=3e-5"])
    caspo = step_config(cfg, "caspo")
    assert (caspo.micro_batches, caspo.tis_cap, caspo.freeze_vision, caspo.logprob_chunk) == (4, 2.0, True, 32)
    assert (caspo.adam_eps, caspo.max_grad_norm, caspo.weight_decay, caspo.b1, caspo.b2, caspo.warmup_steps) == (
        1e-6, None, 0.1, 0.8, 0.99, 5)
    assert (caspo.compute_dtype, caspo.remat) == ("bfloat16", "save_projections")
    # the stage's own: CASPO scores at the rollout temperature, SFT and DPO at 1
    assert (caspo.learning_rate, caspo.temperature) == (2e-6, 0.7)
    assert step_config(cfg, "sft") == caspo.replace(learning_rate=1e-5, temperature=1.0)
    assert step_config(cfg, "dpo") == caspo.replace(learning_rate=1e-6, temperature=1.0)
    greedy = load_config(preset="tiny-cpu", overrides=["rollout.temperature=0"])
    assert step_config(greedy, "caspo").temperature == 1.0  # log-probs of the model's own distribution
    # the reward model (`caspo rm`) trains with the same optim knobs at rm.learning_rate
    assert step_config(cfg, "rm") == caspo.replace(learning_rate=3e-5, temperature=1.0)
    with pytest.raises(ValueError, match="stage='reward'"):
        step_config(cfg, "reward")


def test_attention_implementation_reaches_the_model():
    from caspo_jax.loop.config import ModelConfig
    from caspo_jax.loop.setup import build_policy

    cfg = load_config(preset="tiny-cpu", overrides=["model.tiny=test", "model.attn_implementation=xla"])
    assert build_policy(cfg.model, cfg.data).model.attn_implementation == "xla"
    # "auto": fused kernels where they apply, and on CPU the same program as JAX's default
    assert ModelConfig().attn_implementation == "auto"
    assert build_policy(ModelConfig(tiny="test"), cfg.data).model.attn_implementation == "auto"


def test_a_config_saved_before_the_step_knobs_still_loads(tmp_path):
    """A run directory's config.yaml from before optim.micro_batches & co. (what `--resume`
    and `caspo plot` read) loads, and trains with exactly the step config it had then."""
    from pathlib import Path

    from caspo_jax.step import StepConfig
    from caspo_jax.loop.config import step_config
    from caspo_jax.loop.runtime import load_run_config

    old = Path(__file__).parent / "fixtures" / "config_before_step_knobs.yaml"
    (tmp_path / "config.yaml").write_text(old.read_text())
    cfg = load_run_config(tmp_path)
    assert cfg == load_config(preset="tiny-cpu", overrides=[
        "model.dtype=bfloat16", "model.remat=save_projections", "rollout.temperature=0.7", "optim.grad_clip=0.5",
        "optim.warmup_steps=3"])
    # the fields the old converter (_step_config) set; the rest were StepConfig defaults then too
    assert step_config(cfg, "caspo") == StepConfig(
        learning_rate=1e-4, warmup_steps=3, weight_decay=0.0, b1=0.9, b2=0.999, max_grad_norm=0.5,
        remat="save_projections", compute_dtype="bfloat16", temperature=0.7)
