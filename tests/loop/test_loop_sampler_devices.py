"""rollout.devices = n: the in-process JAX sampler on this process's last n devices, the
trainer's mesh (run.mesh_*, -1 included) over the rest (`caspo_jax.loop.placement`).

On the 8 simulated CPU devices of tests/conftest.py: the split (disjoint, in order), the
parameters' device-to-device copy onto the sampler (no host transfer, checked with JAX's
transfer guards), the errors, and two tiny runs: k = 1 on its own devices stays within one
version; k = 0 on its own devices equals the shared-devices run exactly (same sampler
layout, data = 2 on both sides, so the sampled tokens and every metric are bit-equal).
"""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
from _dist_launch import launch_two  # noqa: E402
from test_distributed_caspo import FLAGS, assert_same_run, train_argv, train_one_process  # noqa: E402
from test_distributed_caspo import read as read_run  # noqa: E402
from test_loop_e2e import read, small_config, strip_timing  # noqa: E402
from test_loop_staleness import override  # noqa: E402

from caspo_jax.loop import caspo as caspo_mod  # noqa: E402
from caspo_jax.loop.config import ConfigError, load_config  # noqa: E402
from caspo_jax.loop.placement import make_placement  # noqa: E402
from caspo_jax.sharding import copy_to_devices  # noqa: E402
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams, jax_engine  # noqa: E402
from caspo_jax.sharding import make_mesh  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs the 8 simulated devices of tests/conftest.py")

DEVICES = jax.devices()
S = 8  # prompts_per_step 2 x group_size 4 (small_config)


def placement(*overrides, rows=24, model=None):
    cfg = load_config(preset="tiny-cpu", overrides=list(overrides))
    return make_placement(cfg, model, None, rows=rows, rows_field="optim.minibatch_size")


@pytest.mark.parametrize("mesh, n, trainer_shape, trainer_devices", [
    ((-1, 1, 1), 2, (6, 1, 1), range(6)),
    ((2, -1, 1), 2, (2, 3, 1), range(6)),
    ((1, 1, -1), 4, (1, 1, 4), range(4)),
    ((2, 1, 2), 4, (2, 1, 2), range(4)),
    ((2, 1, 1), 2, (2, 1, 1), range(2)),  # one process may use the first trainer devices only
    ((1, -1, 1), 7, None, [0]),            # one trainer device: no mesh, the default device
    ((-1, 1, 1), 0, (8, 1, 1), range(8)),  # rollout.devices=0: today's placement
])
def test_the_sampler_takes_the_last_devices_and_the_trainer_mesh_the_rest(mesh, n, trainer_shape, trainer_devices):
    data, fsdp, tensor = mesh
    place = placement(f"run.mesh_data={data}", f"run.mesh_fsdp={fsdp}", f"run.mesh_tensor={tensor}",
                      f"rollout.devices={n}")
    sampler = set(place.sampler_mesh.devices.flat) if place.sampler_mesh is not None else set()
    if trainer_shape is None:
        assert place.mesh is None and jax.numpy.zeros(1).devices() == {DEVICES[0]}
        trainer = {DEVICES[0]}
    else:
        assert tuple(place.mesh.shape.values()) == trainer_shape
        trainer = set(place.mesh.devices.flat)
        assert list(place.mesh.devices.flat) == [DEVICES[i] for i in trainer_devices]
    if n:
        assert sampler == set(DEVICES[8 - n:]) and place.sampler_devices == tuple(DEVICES[8 - n:])
        assert not trainer & sampler
        assert tuple(place.sampler_mesh.shape.values()) == (n, 1, 1)  # parameters replicated, rows split
    else:
        assert place.sampler_mesh is place.mesh and place.sampler_devices == ()


def test_sampler_params_are_copied_device_to_device_onto_the_sampler_devices_only():
    """A parameter sharded over the trainer's fsdp x data devices lands whole and equal on
    each sampler device, with host transfers forbidden. jax.device_put of the same array
    goes through the host (shown below), which is why `copy_to_devices` exists."""
    trainer = make_mesh(2, 3, 1, devices=DEVICES[:6])
    sampler = make_mesh(2, 1, 1, devices=DEVICES[6:])
    host = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    x = jax.device_put(host, NamedSharding(trainer, PartitionSpec("fsdp", "data")))
    target = NamedSharding(sampler, PartitionSpec())
    with jax.transfer_guard_device_to_host("disallow_explicit"), \
            jax.transfer_guard_host_to_device("disallow_explicit"):
        y = jax.block_until_ready(copy_to_devices(x, target))
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.block_until_ready(jax.device_put(x, target))
    assert y.sharding == target and y.devices() == set(DEVICES[6:])
    for shard in y.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host)
    unsharded = jax.device_put(host, DEVICES[0])  # a trainer without a mesh: one device
    np.testing.assert_array_equal(np.asarray(copy_to_devices(unsharded, target)), host)


@pytest.fixture(scope="module")
def tiny_policy():
    from caspo_jax.loop.setup import build_policy

    cfg = load_config(preset="tiny-cpu", overrides=["model.tiny=test"])
    return build_policy(cfg.model, cfg.data)


def test_the_sampler_generates_on_its_own_devices_like_on_the_default_one(tiny_policy, monkeypatch):
    """JaxSampler on the placement's sampler mesh (devices 6, 7) with `sampler_params` of
    parameters sharded on the trainer's (2, 3, 1) mesh: the same tokens and log-probs as a
    sampler on the default device; its parameters, its suppressed-token mask and the
    prompt arrays it feeds the decode all live on its devices, none on the trainer's
    default device 0 (on a GPU those would queue behind the update)."""

    model, params = tiny_policy.model, tiny_policy.params
    place = placement("run.mesh_data=2", "run.mesh_fsdp=3", "rollout.devices=2", "optim.minibatch_size=24",
                      "algo.prompts_per_step=8", "algo.group_size=3", model=model)
    trained = place.params(params)
    assert {d for leaf in jax.tree.leaves(trained) for d in leaf.devices()} == set(DEVICES[:6])
    fed = []
    rollout = jax_engine._rollout

    def recording(*args):
        fed.append(args[6].devices())  # ids_PxL, made in generate
        return rollout(*args)

    monkeypatch.setattr(jax_engine, "_rollout", recording)
    prompts = [RolloutPrompt(np.asarray([5, 6, 7, 8], np.int32), seed=3), RolloutPrompt(np.asarray([9, 10], np.int32),
                                                                                         seed=4)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6)
    own = JaxSampler(model, place.sampler_params(trained), eos_token_ids=tiny_policy.eos_ids,
                     mesh=place.sampler_mesh)
    got = own.generate(prompts, n=2, sampling=sampling)
    want = JaxSampler(model, params, eos_token_ids=tiny_policy.eos_ids).generate(prompts, n=2, sampling=sampling)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-5)  # float32 rounding, other layouts
    assert all(leaf.devices() == set(DEVICES[6:]) for leaf in jax.tree.leaves(own.params))
    assert own._suppressed_V.devices() == {DEVICES[6]} and fed[0] == {DEVICES[6]}
    assert fed[1] == {DEVICES[0]}  # the default sampler's, for contrast


def test_placement_errors_name_rollout_devices_and_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match=r"rollout.devices=8 leaves no device for the trainer.* at most 7"):
        placement("rollout.devices=8")
    with pytest.raises(ConfigError, match=r"run.mesh_data=4 .* does not divide the 6 devices.*trainer's 6 devices: "
                                          r"rollout.devices=2"):
        placement("run.mesh_data=4", "rollout.devices=2")
    with pytest.raises(ConfigError, match=r"optim.minibatch_size=4 rows .* 6 \* 1 = 6.*lower rollout.devices"):
        placement("run.mesh_data=-1", "rollout.devices=2", rows=4)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"rollout.devices=2 with 2 processes.*set rollout.devices=1"):
        placement("rollout.devices=2")


def recording_factory(engines: list):
    """`make_rollout_engine`, keeping each engine it builds in `engines`."""
    def factory(*args, **kwargs):
        engines.append(caspo_mod.make_rollout_engine(*args, **kwargs))
        return engines[-1]

    return factory


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-step runs on a 2-device data mesh: the sampler on the trainer's devices (k=0), on
    its own 2 devices (k=0), and on its own devices with k=1; each run's engine kept."""
    from caspo_jax.loop.setup import build_policy

    tmp = tmp_path_factory.mktemp("sampler_devices")
    cfg = small_config(tmp, "run.steps=2", "run.mesh_data=2")
    policy = build_policy(cfg.model, cfg.data)
    out = {}
    for name, extra in (("shared", []), ("own", ["rollout.devices=2"]),
                        ("own_k1", ["rollout.devices=2", "rollout.max_staleness=1"])):
        engines = []
        caspo_mod.run_caspo(override(cfg, *extra), tmp / name, policy=policy, progress=False, export=False,
                            engine_factory=recording_factory(engines))
        out[name] = (read(tmp / name / "metrics.jsonl"), engines[0])
    return out


def test_k1_on_its_own_devices_completes_within_one_version(runs):
    rows, engine = runs["own_k1"]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["async/staleness"] in (0.0, 1.0) and r["grad_norm"] > 0
        assert r["async/staleness_hist/0"] + r["async/staleness_hist/1"] == S
    assert all(leaf.devices() == set(DEVICES[6:]) for leaf in jax.tree.leaves(engine.params))


def test_k0_on_its_own_devices_equals_the_shared_devices_run(runs):
    """Same sampler layout (rows over 2 devices), same per-prompt seeds, same trainer mesh:
    every metric of both steps (step 2 samples with the weights pushed after step 1) is
    bit-equal, timings aside; only the devices differ."""
    (shared, shared_engine), (own, own_engine) = runs["shared"], runs["own"]
    assert strip_timing(own) == strip_timing(shared)
    assert {d for leaf in jax.tree.leaves(shared_engine.params) for d in leaf.devices()} == set(DEVICES[:2])
    assert all(leaf.devices() == set(DEVICES[6:]) for leaf in jax.tree.leaves(own_engine.params))
    assert own_engine.version == shared_engine.version == 2


def test_dry_run_sizes_the_trainer_on_the_devices_the_sampler_leaves():
    """8 H100s, rollout.devices=4: the trainer's default mesh is fsdp=4, so each trainer
    device holds 1/4 of the float32 parameters instead of 1/8; an explicit --mesh must
    cover the trainer's devices; the sampler line gives its whole-weights copy. (fsdp=6,
    what rollout.devices=2 leaves, divides none of the 7B's widths: the estimate then
    replicates every parameter, as the run's rules would.)"""
    from caspo_jax.launch import dryrun

    raw = {"model": {"path": "x/Qwen2.5-VL-7B-Instruct", "dtype": "bfloat16", "remat": True},
           "optim": {"minibatch_size": 64}}

    def params_gib(text):
        return float(next(line for line in text.splitlines() if "params (f32)" in line).split()[2])

    table = dryrun.model_for(raw).param_table()
    shared = dryrun.dry_run_report(raw, "8xh100")
    raw["rollout"] = {"devices": 4}
    own = dryrun.dry_run_report(raw, "8xh100")
    assert "data=1 fsdp=8 tensor=1\n" in shared and "rollout.devices" not in shared
    assert "data=1 fsdp=4 tensor=1 (the trainer's 4; rollout.devices=4 for the sampler alone)" in own
    for text, fsdp in ((shared, 8), (own, 4)):  # the f32 parameters of one device of an fsdp-way mesh
        assert params_gib(text) == pytest.approx(4 * dryrun.shard_elements(table, (1, fsdp, 1))[0] / 2**30, abs=0.01)
    assert params_gib(own) > 1.9 * params_gib(shared)
    assert "sampler's 4 device(s) (rollout.devices), each holding the float32 weights whole (30.89 GiB)" in own
    assert dryrun.Topology.parse("8xh100", "2,3,1", sampler_devices=2).mesh == (2, 3, 1)
    with pytest.raises(ValueError, match=r"not the trainer's 6 \(rollout.devices=2 go to the sampler\).*D\*F\*T=6"):
        dryrun.Topology.parse("8xh100", "2,2,2", sampler_devices=2)
    with pytest.raises(ValueError, match="rollout.devices=8 leaves no device of 8"):
        dryrun.Topology.parse("8xh100", sampler_devices=8)


@pytest.mark.long
def test_two_processes_each_with_one_sampler_device_equal_the_one_device_run(tmp_path):
    """Two `caspo train` processes x 3 devices, rollout.devices=1: each samples on its last
    device (a one-device sampler mesh: no collective), the trainer's (1, 4, 1) mesh spans
    the other two of each; the metrics equal a one-device run within the two-process
    test's tolerance (`tests/distributed/test_distributed_caspo.py`: sampled outcomes
    exact, the rest within rtol 1e-4 + atol 1e-5)."""

    want = train_one_process(tmp_path / "one", 1, (1, 1, 1))
    out = tmp_path / "two"
    launch_two(train_argv(out, (1, -1, 1)) + ["--set", "rollout.devices=1"], tmp_path, timeout=500,
               xla_flags=f"--xla_force_host_platform_device_count=3 {FLAGS}")
    print(f"two processes, rollout.devices=1 vs one device: worst metric diff "
          f"{assert_same_run(read_run(out), want):.2e}")
