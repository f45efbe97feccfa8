"""Rollout throughput and weight-bridge cost, in the RL regime, on one model.

Model: Qwen2.5-VL with text hidden 512, 8 layers (8 heads, 2 kv heads, MLP 1408), vocab
32k, float32, random weights. Regime: 4 prompts x n=16 samples, 128-token prompts,
128 new tokens (no early stop), temperature 1.0, one timed run after one warm-up run
(compiles for JAX, kernel warm-up for vLLM; transformers is timed once, without warm-up
as it has nothing to compile).

Measured in the same run:
- new tokens/s of ``JaxSampler`` vs transformers ``generate`` (sampling,
  ``num_return_sequences=16``) vs vLLM-CPU (``VllmEngine``, in-process) when vllm imports;
- bridge conversion: pytree -> HF-named torch tensors (the iterator the push consumes)
  vs a plain host memcpy (``np.copyto``) of the same bytes;
- end-to-end sync (conversion + vLLM ``reload_weights`` + cache resets) vs vLLM's own
  ``reload_weights`` of ready-made HF tensors (min of 5 interleaved each; medians printed);
- the decode step against its compute floor (weights x rows x 2 FLOP at the measured
  matmul roof).

Run: /work/venv-vllm/bin/python bench/rollout.py   (full comparison; plain `python` skips
vLLM and compares against transformers). Ends with one RESULT line: JAX tokens/s over
vLLM's (over transformers' without vLLM); goal >= 1.0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from caspo_jax.bridge import transport  # noqa: E402
from caspo_jax.bridge.hf_tensors import iter_torch_tensors, state_dict_bytes  # noqa: E402
from caspo_jax.models import load_pretrained, save_pretrained  # noqa: E402
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig  # noqa: E402
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams, VllmEngine  # noqa: E402
from caspo_jax.tiny import models as tm  # noqa: E402
from caspo_jax.tiny.tokenizer import (  # noqa: E402
    build_tiny_processor,
    build_tiny_tokenizer,
    save_tiny_processor,
    tokenizer_info,
)

GOAL_SAMPLER, GOAL_CONVERSION, GOAL_SYNC = 1.0, 0.5, 1.25


def bench_config(vocab: int = 32000, layers: int = 8) -> dict:
    """The bench shape, with the tiny tokenizer's special-token ids (vLLM loads its processor)."""
    cfg = tm.hf_config_dict("vision", vocab_size=vocab, num_layers=layers)
    cfg["text_config"].update(hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                              num_key_value_heads=2, max_position_embeddings=4096)
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 12]
    cfg["vision_config"].update(depth=2, hidden_size=128, intermediate_size=256, num_heads=2,
                                fullatt_block_indexes=[1], out_hidden_size=512)
    info = tokenizer_info(build_tiny_tokenizer())
    cfg.update(image_token_id=info.image_token_id, video_token_id=info.video_token_id,
               vision_start_token_id=info.vision_start_token_id, vision_end_token_id=info.vision_end_token_id)
    cfg["text_config"]["eos_token_id"] = info.im_end_id
    return cfg


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out) if isinstance(out, jax.Array) else None
    return out, time.perf_counter() - start


def bench_transformers(path, prompts, n, new_tokens) -> float:
    """New tokens/s of ``generate`` at batch prompts x n (``new_tokens`` may be fewer than the
    regime's to keep the bench short: per-token cost only grows with length, so this
    flatters the baseline)."""
    torch.set_num_threads(os.cpu_count() or 1)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    ids = torch.tensor(np.stack([p.token_ids for p in prompts]).astype(np.int64))
    with torch.no_grad():
        out, seconds = _timed(lambda: hf.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0))
    produced = (out.shape[1] - ids.shape[1]) * out.shape[0]
    del hf
    return produced / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf-new-tokens", type=int, default=32,
                        help="new tokens for the transformers baseline (it is slow; fewer tokens flatter it)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--vllm-threads", type=int, default=os.cpu_count() or 1,
                        help="OMP threads for vLLM (vLLM's own default is 1; we give it the CPUs JAX gets)")
    args = parser.parse_args(argv)


    cfg = bench_config()
    tmp = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(cfg))
    save_pretrained(model, model.init(jax.random.PRNGKey(0)), tmp)
    save_tiny_processor(build_tiny_processor(), tmp)  # vLLM's Qwen2.5-VL processor needs one
    model, params = load_pretrained(tmp)
    rng = np.random.default_rng(0)
    # ids above the tiny tokenizer's 512 (so no special token, e.g. an image pad, is drawn)
    prompts = [RolloutPrompt(rng.integers(512, 32000, args.prompt_len)) for _ in range(args.prompts)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    total = args.prompts * args.n * args.new_tokens
    print(f"model: hidden 512, 8 layers, vocab 32000, float32; {args.prompts} prompts x n={args.n}, "
          f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens ({total} new tokens per run); "
          f"{os.cpu_count()} CPUs")

    rates = {}
    if not args.skip_transformers:
        rates["transformers"] = bench_transformers(tmp, prompts, args.n, args.hf_new_tokens)
        print(f"transformers generate (sdpa, sampling, {args.hf_new_tokens} new tokens): "
              f"{rates['transformers']:.0f} new tokens/s")

    # min_new_bucket: the 2-token warm-up compiles the very loop the timed run uses
    sampler = JaxSampler(model, params, eos_token_ids=(), min_new_bucket=args.new_tokens)
    warm = SamplingParams(temperature=1.0, max_new_tokens=2, seed=0)
    _, compile_s = _timed(lambda: sampler.generate(prompts, n=args.n, sampling=warm))
    rollouts, seconds = _timed(lambda: sampler.generate(prompts, n=args.n, sampling=sampling))
    assert int(rollouts.mask.sum()) == total
    rates["jax"] = total / seconds
    print(f"JAX sampler: {rates['jax']:.0f} new tokens/s ({seconds:.2f} s; 2-token warm-up incl. compile {compile_s:.1f} s)")
    print_floor(cfg, args, seconds)

    try:
        import vllm  # noqa: F401
        have_vllm = True
    except Exception as err:  # noqa: BLE001
        have_vllm = False
        print(f"vLLM not importable here ({type(err).__name__}); run with the vLLM venv's python for the full "
              "comparison")
    if have_vllm:
        os.environ["OMP_NUM_THREADS"] = str(args.vllm_threads)  # vLLM would drop to 1 thread
        bench_vllm(tmp, model, params, prompts, sampling, args, total, rates)

    baseline = "vllm" if "vllm" in rates else "transformers"
    if baseline not in rates:
        print("no baseline measured")
        return 1
    ratio = rates["jax"] / rates[baseline]
    print(f"JAX sampler / {baseline}: {ratio:.2f}x")
    print(f"RESULT name=rollout value={ratio:.3f} unit=x_vs_{baseline} goal=>={GOAL_SAMPLER} "
          f"met={'yes' if ratio >= GOAL_SAMPLER else 'no'}")
    return 0


def matmul_roof() -> float:
    """FLOP/s of a jitted 2048^3 float32 matmul (min of 3): what this CPU's matmuls reach now."""
    a = jax.numpy.ones((2048, 2048), jax.numpy.float32)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    return 2 * 2048**3 / min(_timed(lambda: mm(a))[1] for _ in range(3))


def print_floor(cfg, args, seconds) -> None:
    """The decode's compute floor: every step multiplies S = prompts x n rows by all layer
    kernels and the LM head (2 FLOP per weight per row); at this S the weights are reused
    S times per read, so on this CPU the step is bound by matmul throughput, not by
    reading the weights."""
    text = cfg["text_config"]
    D, F, V, Y = text["hidden_size"], text["intermediate_size"], cfg["text_config"]["vocab_size"], \
        text["num_hidden_layers"]
    kv = D // text["num_attention_heads"] * text["num_key_value_heads"]
    weights = Y * (2 * D * D + 2 * D * kv + 3 * D * F) + D * V
    S = args.prompts * args.n
    step_flop = 2 * S * weights
    roof = matmul_roof()
    step_s = seconds / args.new_tokens
    print(f"decode step: {step_s * 1e3:.1f} ms for {S} tokens; floor {step_flop / 1e9:.2f} GFLOP "
          f"({weights / 1e6:.1f} M weights, {4 * weights / 2**20:.0f} MiB float32) at the matmul roof "
          f"{roof / 1e12:.3f} TFLOP/s = {step_flop / roof * 1e3:.1f} ms; the step reaches "
          f"{step_flop / step_s / roof:.2f} of the roof (prefill and sampling included)")


def bench_vllm(path, model, params, prompts, sampling, args, total, rates) -> None:
    engine = VllmEngine.start(path, model, max_model_len=args.prompt_len + args.new_tokens + 16,
                              kv_cache_memory_bytes=512 * 2**20, eos_token_ids=(),
                              # one scheduler step takes every prompt whole: vLLM-CPU crashes on a chunked
                              # prefill of a seeded request ("CPU Generator does not use offset")
                              llm_kwargs=dict(limit_mm_per_prompt={"image": 0},
                                              max_num_batched_tokens=args.prompts * args.n * args.prompt_len + 1024,
                                              max_num_seqs=max(256, args.prompts * args.n)))
    engine.generate(prompts, n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))  # warm-up
    rollouts, seconds = _timed(lambda: engine.generate(prompts, n=args.n, sampling=sampling))
    assert int(rollouts.mask.sum()) == total
    rates["vllm"] = total / seconds
    print(f"vLLM-CPU (in-process, eager, float32, {args.vllm_threads} threads): {rates['vllm']:.0f} new tokens/s "
          f"({seconds:.2f} s)")

    # ----- bridge: conversion vs memcpy -----
    table = model.param_table()
    nbytes = state_dict_bytes(params, table)
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)

    def convert():
        return sum(t.numel() for _, t in iter_torch_tensors(params, table))

    def memcpy():
        np.copyto(dst, src)

    convert_s = statistics.median(_timed(convert)[1] for _ in range(3))
    memcpy_s = statistics.median(_timed(memcpy)[1] for _ in range(3))

    conversion = memcpy_s / convert_s
    print(f"bridge conversion of {nbytes / 2**20:.0f} MiB to HF-named torch tensors: {convert_s * 1e3:.1f} ms vs "
          f"memcpy {memcpy_s * 1e3:.1f} ms -> {conversion:.2f}x memcpy throughput (goal >= {GOAL_CONVERSION}: "
          f"{'met' if conversion >= GOAL_CONVERSION else 'not met'}); our leaves are stored in HF's layouts, so "
          f"the tensors are contiguous zero-copy views of the CPU buffers")

    # ----- bridge: end-to-end sync vs vLLM's bare reload of ready-made tensors -----
    ready = [(name, t.contiguous().clone()) for name, t in iter_torch_tensors(params, table)]
    worker = transport.in_process_worker(engine.llm)

    def bare():
        worker.reload_weights(weights_iterator=iter(ready), is_checkpoint_format=True)

    def sync():
        engine.sync_weights(params)

    bare_runs, sync_runs = [], []
    for _ in range(5):  # interleaved, so load changes hit both alike
        bare_runs.append(_timed(bare)[1])
        sync_runs.append(_timed(sync)[1])
    bare_s, sync_s = min(bare_runs), min(sync_runs)
    ratio = sync_s / bare_s
    print(f"end-to-end sync (conversion + reload_weights + cache resets; min of 5): {sync_s * 1e3:.0f} ms vs vLLM "
          f"reload of ready-made tensors {bare_s * 1e3:.0f} ms -> {ratio:.2f}x (goal <= {GOAL_SYNC}: "
          f"{'met' if ratio <= GOAL_SYNC else 'not met'}); medians {statistics.median(sync_runs) * 1e3:.0f} / "
          f"{statistics.median(bare_runs) * 1e3:.0f} ms")
    after = engine.generate(prompts[:1], n=1, sampling=sampling)
    assert torch.isfinite(torch.tensor(after.logprobs)).all()


if __name__ == "__main__":
    sys.exit(main())
