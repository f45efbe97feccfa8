"""Dry-run sizing: topology parsing, shard arithmetic, FLOPs by hand, the memory estimate
against XLA's compiled peak for a tiny model (within 20%), and the full-size report."""

import dataclasses
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _dist_scenario as sc  # noqa: E402

from caspo_jax.launch import dryrun  # noqa: E402
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig  # noqa: E402
from caspo_jax.tiny import models as tm  # noqa: E402
from caspo_jax.step import init_state, make_train_step  # noqa: E402

MEMORY_TOL = 0.20


def test_topology_names():
    v5p = dryrun.Topology.parse("v5p-64")
    assert (v5p.devices, v5p.memory_gib, v5p.mesh) == (32, 95.0, (1, 32, 1))  # 2 TensorCores per chip
    gpus = dryrun.Topology.parse("16xa100-80gb", mesh="2,8,1")
    assert (gpus.devices, gpus.memory_gib, gpus.mesh) == (16, 80.0, (2, 8, 1))
    assert dryrun.Topology.parse("8x24:1,4,2").mesh == (1, 4, 2)
    with pytest.raises(ValueError, match="D\\*F\\*T=16"):
        dryrun.Topology.parse("16xh100:2,2,2")
    with pytest.raises(ValueError, match="unknown device"):
        dryrun.Topology.parse("4xtoaster")


def test_shard_elements_follow_the_logical_rules():
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("vision")))
    table = model.param_table()
    local, total = dryrun.shard_elements(table, (1, 1, 1))
    assert local == total == sum(math.prod(x.shape) for x in jax.tree.leaves(jax.eval_shape(model.init,
                                                                                         jax.random.key(0))))
    # fsdp=2 halves every leaf with an "embed"/"vision_embed" axis of even size, by hand:
    expected = 0
    for spec in table:
        n = math.prod(spec.shape)
        split = any(a in ("embed", "vision_embed") and d % 2 == 0 for a, d in zip(spec.axes, spec.shape))
        expected += n // 2 if split else n
    assert dryrun.shard_elements(table, (1, 2, 1))[0] == expected < total


def test_step_flops_by_hand():
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("vision")))
    table, dims = model.param_table(), dryrun.text_dims(model.config)
    body, head = dryrun.matmul_params(table)
    D, I, K, hd = 64, 128, 2, 16
    assert body == 2 * (D * D + 2 * D * K * hd + D * D + 3 * D * I) and head == D * tm.VOCAB  # 2 layers
    f = dryrun.step_flops(table, dims, prompts=2, group=4, prompt_len=12, response_len=4, remat=True)
    rows, L = 8, 16
    attention = 4 * 2 * 4 * hd * L * L / 2
    layers_fwd = rows * (2 * body * L + attention)
    forward = layers_fwd + rows * 2 * head * 4
    assert f["logprobs"] == pytest.approx(3 * forward) and f["train"] == pytest.approx(4 * forward - rows * 2 * head * 4)


@pytest.mark.parametrize("remat", [False, True])
def test_memory_estimate_within_20_percent_of_compiled_peak(remat):
    """XLA's buffer assignment for the donated train step (arguments + outputs - aliased +
    temporaries) on one CPU device vs the arithmetic estimate."""
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("vision")))
    batch = sc.batch_for(model)
    cfg = sc.CFG.replace(remat=remat)
    state = jax.eval_shape(lambda: init_state(model.init(jax.random.key(0)), cfg))
    compiled = make_train_step(model, cfg, sc.CASPO, donate=True).lower(state, batch).compile()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    table = model.param_table()
    est = dryrun.estimate_memory(table, dryrun.text_dims(model.config), (1, 1, 1), rows=batch.num_rows,
                                 seq_len=batch.student.input_ids.shape[1], response_len=batch.response_len,
                                 remat=remat, optimizer_leaves=dryrun.optimizer_copies(table))
    print(f"memory estimate / compiled peak (remat={remat}): {est.total / peak:.3f} ({est.total} / {peak} bytes)")
    assert abs(est.total / peak - 1) <= MEMORY_TOL, (est, peak)
    assert est.activations > 0.2 * est.total  # the activation term matters at this size


def test_full_size_report_needs_no_weights():
    text = dryrun.dry_run_report("qwen2_5_vl_7b", "v5p-64")
    assert "data=1 fsdp=32 tensor=1" in text and "8.292 B parameters" in text  # 7B LM + 0.67B ViT
    assert "fits" in text
    model = dryrun.model_for({"model": {"path": "nowhere/Qwen2.5-VL-7B-Instruct"}})
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == dryrun.shard_elements(
        model.param_table(), (1, 1, 1))[1]
    small = dryrun.dry_run_report({"model": {"path": "x/Qwen3-VL-4B", "dtype": "bfloat16", "remat": False},
                                   "optim": {"minibatch_size": 512}}, "1x16")
    assert "DOES NOT FIT" in small
    with pytest.raises(FileNotFoundError, match="model.path"):
        dryrun.model_for({"model": {"path": "/nowhere/mystery-model"}})


def test_report_prints_the_gpu_memory_split_and_sizes_the_trainer_against_its_share():
    raw = {"model": {"path": "x/Qwen2.5-VL-7B-Instruct", "dtype": "bfloat16", "remat": True},
           "rollout": {"engine": "vllm"}, "optim": {"minibatch_size": 64}}
    alone = dryrun.dry_run_report(raw, "8xh100")
    assert "of 80 GiB: fits" in alone and "memory split    none" in alone
    raw["model"]["gpu_memory_split"] = 0.3
    shared = dryrun.dry_run_report(raw, "8xh100")
    assert ("memory split    trainer (JAX) 0.65 (52.0 GiB), vLLM engine 0.30 (24.0 GiB), headroom 0.05 (4.0 GiB)"
            in shared)
    assert "of 52 GiB (the trainer's share): fits" in shared
    raw["model"]["gpu_memory_split"] = 0.9  # the trainer keeps 4 GiB: the 7B state no longer fits
    assert "DOES NOT FIT" in dryrun.dry_run_report(raw, "8xh100") and "lower model.gpu_memory_split" in \
        dryrun.dry_run_report(raw, "8xh100")
    raw["rollout"]["engine"] = "jax"  # no in-process engine: the knob does not apply
    assert "memory split    none" in dryrun.dry_run_report(raw, "8xh100")


def test_cli_dryrun(capsys):
    from caspo_jax.launch.cli import main

    assert main(["dryrun", "--preset", "qwen3_vl_4b", "--topology", "16xa100-80gb", "--mesh", "2,8,1",
                 "--set", "optim.minibatch_size=256"]) == 0
    out = capsys.readouterr().out
    assert "data=2 fsdp=8 tensor=1" in out and "mini-batch 256 rows" in out and "(16 per device" in out
    assert np.isfinite(float(out.split("total")[-1].split()[0]))


def test_train_dry_run_sizes_the_typed_config(capsys):
    """`caspo train --dry-run` reads the same validated config as a real run and allocates nothing."""
    from caspo_jax.launch.cli import main

    assert main(["train", "--preset", "qwen2_5_vl_7b", "--dry-run", "--topology", "v5p-64",
                 "--set", "optim.minibatch_size=256"]) == 0
    out = capsys.readouterr().out
    assert "mini-batch 256 rows" in out and "parameters" in out
    total_gib = out.split("  total")[1].split()[0]
    assert float(total_gib) > 0
    # a bad field fails before any sizing, naming the field
    assert main(["train", "--preset", "qwen2_5_vl_7b", "--dry-run", "--set", "optim.no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err


def test_dry_run_sizes_the_step_config_the_run_uses(capsys):
    """`--set optim.micro_batches=4` shrinks the activation estimate (a quarter of the rows per
    micro-batch), and the report is `run_memory` of the run's own `step_config`."""
    from caspo_jax.launch.cli import main
    from caspo_jax.loop.config import load_config, step_config

    def report(*overrides):
        sets = [arg for item in overrides for arg in ("--set", item)]
        assert main(["dryrun", "--preset", "qwen3_vl_4b", "--topology", "16xa100-80gb", *sets]) == 0
        return capsys.readouterr().out

    one, four = report(), report("optim.micro_batches=4")
    assert "1 micro-batch(es)" in one and "(32 per device" in one
    assert "4 micro-batch(es)" in four and "(8 per device" in four
    cfg = load_config(preset="qwen3_vl_4b", overrides=["optim.micro_batches=4"])
    step = step_config(cfg, "caspo")
    assert (step.micro_batches, step.compute_dtype, step.remat) == (4, "bfloat16", True)
    model = dryrun.model_for({"_preset": "qwen3_vl_4b", **dataclasses.asdict(cfg)})
    topo = dryrun.Topology.parse("16xa100-80gb")
    table = model.param_table()
    mem = dryrun.run_memory(cfg, model, topo)
    assert mem == dryrun.estimate_memory(table, dryrun.text_dims(model.config), topo.mesh, rows=512, seq_len=3072,
                                         response_len=1024, compute_dtype="bfloat16", reference_dtype="bfloat16",
                                         remat=True, micro_batches=4, optimizer_leaves=2,
                                         logprob_chunk=step.logprob_chunk)
    assert f"activations   {dryrun._gib(mem.activations)}" in four
    single = dryrun.run_memory(load_config(preset="qwen3_vl_4b"), model, topo)
    assert f"activations   {dryrun._gib(single.activations)}" in one
    assert mem.activations < single.activations and mem.params == single.params
