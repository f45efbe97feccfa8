"""plan_start: which launcher started the process, from the environment alone."""

import pytest

from caspo_jax.distributed import plan_start, take_local_rows


def test_explicit_variables():
    plan = plan_start({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
                       "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"})  # explicit wins over the scheduler
    assert plan.kind == "explicit" and plan.multi_process
    assert dict(plan.initialize_kwargs) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert plan_start({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}).kind == "single"
    with pytest.raises(ValueError, match="JAX_PROCESS_ID.*missing"):
        plan_start({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must lie in \[0, JAX_NUM_PROCESSES=2\)"):
        plan_start({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="must be an integer"):
        plan_start({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})


def test_slurm_tpu_and_single():
    slurm = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "3"}
    assert plan_start(slurm).kind == "slurm" and plan_start(slurm).initialize_kwargs == {}
    with pytest.raises(ValueError, match="srun"):
        plan_start({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "2"})
    assert plan_start({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "1"}).kind == "single"  # one task: no coordinator
    assert plan_start({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "1"}).kind == "tpu"
    assert plan_start({"TPU_WORKER_HOSTNAMES": "localhost"}).kind == "single"  # a single-host TPU VM
    assert plan_start({}).kind == "single" and not plan_start({}).multi_process


def test_one_process_holds_every_row():
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from caspo_jax.distributed import global_batch, local_rows
    from caspo_jax.sharding import make_mesh

    mesh = make_mesh(2, 4, 1)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    tree = {"ids": np.arange(16).reshape(8, 2), "pixels": np.ones((3, 2)), "none": None}
    shardings = {"ids": rows, "pixels": NamedSharding(mesh, PartitionSpec()), "none": None}
    assert local_rows(rows, (8, 2)) == slice(0, 8)
    local = take_local_rows(tree, shardings)
    out = global_batch(local, shardings)
    assert out["none"] is None and out["ids"].sharding == rows and len(out["ids"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out["ids"]), tree["ids"])
    assert jax.process_count() == 1
