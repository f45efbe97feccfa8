#!/usr/bin/env bash
# Mixed layout: vLLM rollout workers on GPU hosts, the JAX trainer on TPU or other GPU hosts.
#
#   GPU host(s)  ray start --head / --address=HEAD:6379 --num-gpus=8
#                -> RolloutWorker actors (caspo_jax.remote), each one vLLM engine on 1 GPU
#   trainer      the JAX job (tpu_pod.sh or slurm_gpu.sbatch) with rollout.workers=ray: every
#                trainer process joins Ray as a client (rollout.ray_address), starts its own
#                rollout.num_workers actors, pushes weights as safetensors buckets (put once
#                in Ray's object store, fetched by its actors), sends its prompt chunks and
#                receives Rollouts.
#
# Ray is optional (pip install 'ray>=2.9' on the trainer hosts and the GPU hosts).
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
# The trainer side: a run config with the rollouts on these actors, e.g.
#   caspo train --preset qwen2_5_vl_7b-start-sft --set rollout.engine=vllm --set rollout.workers=ray \
#       --set rollout.ray_address=ray://HEAD:10001 --set rollout.num_workers=8 --set rollout.worker_gpus=1 \
#       --set rollout.worker_model_dir=/models/Qwen2.5-VL-7B-Instruct ...
# (async_tpu_vllm.yaml: the same with rollouts one weight version ahead of the update)
