"""One of the two JAX processes of test_distributed_train.py (started with the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment).

usage: python _dist_worker.py CHECKPOINT_DIR OUT.npz
"""

import faulthandler
import hashlib
import signal
import sys
from pathlib import Path

faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks before a timeout kill

sys.path.insert(0, str(Path(__file__).parent))

from caspo_jax import distributed  # noqa: E402

plan = distributed.start()  # before anything touches the devices

import jax  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import _dist_scenario as sc  # noqa: E402
from caspo_jax.models import load_pretrained  # noqa: E402
from caspo_jax.remote import encode_weight_buckets, params_from_hf  # noqa: E402
from caspo_jax.sharding import make_mesh  # noqa: E402
from caspo_jax.step import batch_shardings, init_state, shard_state, state_shardings  # noqa: E402


# 8 devices, 4 on each process; fsdp over all of them: parameters sharded across both
# processes, rows split 8 ways. (A (2, 2, 2) mesh hung in about one run of three: one of
# the four-device gloo communicators never finished connecting; see BUILD_NOTES.)
MESH = (1, 8, 1)


def main(ckpt: str, out: str) -> None:
    assert plan.kind == "explicit" and jax.process_count() == 2, (plan, jax.process_count())
    mesh = make_mesh(*MESH)
    model, params = load_pretrained(ckpt, mesh=mesh)
    full = sc.batch_for(model)
    shardings = batch_shardings(full, mesh)
    local = distributed.take_local_rows(full, shardings)
    batch = distributed.global_batch(local, shardings)
    assert local.response_ids.shape[0] == full.num_rows // 2 and batch.response_ids.shape == full.response_ids.shape
    state = shard_state(init_state(params, sc.CFG), state_shardings(model, sc.CFG, mesh))
    state, losses = sc.run(model, state, batch, mesh)
    host = distributed.gather_to_host(state.params)
    # the rollout push from a multi-host trainer: a collective gather, the same bytes on every process
    buckets = encode_weight_buckets(state.params, model, bucket_bytes=256 * 1024)
    digest = np.frombuffer(hashlib.sha256(b"".join(buckets)).digest(), np.uint8)
    digests = multihost_utils.process_allgather(digest)  # [processes, 32]
    # and the push from host copies (a rollout thread's, while the trainer updates): no collective
    host_buckets = encode_weight_buckets(host, model, bucket_bytes=256 * 1024)
    if distributed.is_primary():
        arrays = {}
        for data in buckets:
            arrays.update(safetensors.numpy.load(data))
        pushed = sc.flat(params_from_hf(arrays, model.param_table()))
        bridge_diff = max(float(np.abs(pushed[k] - v).max()) for k, v in sc.flat(host).items())
        np.savez(out, losses=np.asarray(losses), rows=np.asarray([local.response_ids.shape[0]]),
                 bridge=np.asarray([bridge_diff, len(buckets)]),
                 same_buckets=np.asarray([bool((digests == digests[0]).all()), host_buckets == buckets]),
                 **sc.flat(host))
    distributed.barrier("written")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
