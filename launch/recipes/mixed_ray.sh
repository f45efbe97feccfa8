#!/usr/bin/env bash
# Mixed layout: vLLM rollout workers on GPU hosts, the JAX trainer on TPU or other GPU hosts.
#
#   GPU host(s)  ray start --head / --address=HEAD:6379 --num-gpus=8
#                -> RolloutWorker actors (caspo_jax.remote), each one vLLM engine on 1 GPU
#   trainer      the JAX job (tpu_pod.sh or slurm_gpu.sbatch); process 0 joins Ray as a
#                client (ray.init(address="ray://HEAD:10001")), pushes weights as
#                safetensors buckets (put once in Ray's object store, fetched by every
#                actor), sends prompt chunks and receives Rollouts.
#
# Ray is optional (pip install 'ray>=2.9' on the trainer's process-0 host and the GPU hosts).
# usage on the rollout hosts:  HEAD=10.0.0.5 bash mixed_ray.sh head|worker
set -euo pipefail
ROLE=${1:?head or worker}
VENV=${VENV:-$HOME/caspo-vllm}   # pip install -e '.[gpu]' 'ray>=2.9'
. "$VENV/bin/activate"
if [ "$ROLE" = head ]; then
  ray start --head --port=6379 --ray-client-server-port=10001 --num-gpus="$(nvidia-smi -L | wc -l)"
else
  ray start --address="${HEAD:?set HEAD to the address of the head node}:6379" --num-gpus="$(nvidia-smi -L | wc -l)"
fi
# The trainer side (process 0 only), in Python:
#   import ray; ray.init(address="ray://HEAD:10001")
#   from caspo_jax.remote import RemoteRolloutEngine, WorkerSpec
#   spec = WorkerSpec.vllm(model, "/models/Qwen2.5-VL-7B-Instruct",
#                          engine_kwargs=dict(dtype="bfloat16", kv_cache_memory_bytes=None, in_process=True))
#   engine = RemoteRolloutEngine.ray(model, spec, workers=8, actor_options=dict(num_gpus=1))
#   engine.sync_weights(params); rollouts = engine.generate(prompts, n=32, sampling=sampling)
