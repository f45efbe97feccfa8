"""CASPO with the trainer on a TPU host and the rollouts on GPU hosts running vLLM, one
weight version apart (rollout.max_staleness=1) with token-level truncated IS.

    GPU hosts    start Ray as in mixed_ray.sh (head + workers, one GPU per vLLM actor)
    TPU host     python launch/recipes/async_tpu_vllm.py --ray ray://HEAD:10001 --workers 8 \\
                     --vllm-model-dir /models/sft-Qwen2.5-VL-7B/export --out gs://bucket/runs/caspo-async \\
                     --preset qwen2_5_vl_7b-start-sft --set model.path=/mnt/models/sft-Qwen2.5-VL-7B/export \\
                     --set reward.path=/mnt/models/rm-Qwen2.5-VL-7B/export [--resume]

What runs where: this process is the only trainer process (max_staleness >= 1 needs one;
a single TPU VM host's chips are its devices: run.mesh_fsdp=-1). Its producer thread asks
the Ray actors (`caspo_jax.remote.RolloutWorker`, one vLLM engine per GPU) for step s+1's
rollouts while the TPU trains step s; after each update the weights are published and
pushed as safetensors buckets (put once in Ray's object store) before the next batch, each
worker finishing the batch it serves first. Every batch carries its weight version;
a batch two versions old is never trained. vLLM's log-probs (temperature 1) against the
trainer's give the TIS weights and the log-prob gap metrics (rollout_correction/*).
The model directory on the GPU hosts (--vllm-model-dir) gives vLLM its architecture,
tokenizer and processor; its weights are replaced by the trainer's at start.

A dead or hung worker stops the run with one error after rollout.timeout_s (the last
checkpoint intact); restart the actor and rerun with --resume.
"""

from __future__ import annotations

import argparse

from caspo_jax.distributed import start as start_distributed
from caspo_jax.loop.caspo import run_caspo
from caspo_jax.loop.config import load_config
from caspo_jax.remote import RemoteRolloutEngine, WorkerSpec

ASYNC = ["rollout.max_staleness=1", "optim.rollout_correction=tis", "optim.tis_cap=2.0", "rollout.engine=vllm",
         "rollout.temperature=1.0", "run.mesh_fsdp=-1", "run.mesh_data=1"]


def build_config(args):
    """The run config: preset <- --config <- this recipe's settings <- --set."""
    return load_config(preset=args.preset, path=args.config, overrides=ASYNC + list(args.set))


def ray_engine_factory(args):
    """`run_caspo(engine_factory=)`: vLLM Ray actors holding the trainer's weights."""

    def factory(cfg, policy, place, params, version=0):
        import ray

        ray.init(address=args.ray)
        spec = WorkerSpec.vllm(policy.model, args.vllm_model_dir, engine_kwargs=dict(
            dtype=cfg.model.dtype, max_model_len=cfg.data.max_prompt_len + cfg.data.max_response_len,
            kv_cache_memory_bytes=None, seed=cfg.run.seed, eos_token_ids=policy.eos_ids))
        engine = RemoteRolloutEngine.ray(policy.model, spec, workers=args.workers, actor_options=dict(num_gpus=1),
                                         timeout=cfg.rollout.timeout_s)
        engine.sync_weights(params, version=version)
        return engine

    return factory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ray", required=True, help="Ray address of the GPU cluster, e.g. ray://HEAD:10001")
    parser.add_argument("--workers", type=int, default=8, help="vLLM actors, one GPU each")
    parser.add_argument("--vllm-model-dir", required=True, help="the HF model directory on the GPU hosts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="qwen2_5_vl_7b-start-sft")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    start_distributed()
    run_caspo(build_config(args), args.out, resume=args.resume, engine_factory=ray_engine_factory(args))


if __name__ == "__main__":
    main()
