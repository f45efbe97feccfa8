"""The jitted CASPO train step vs transformers' forward + backward, with the matmul roof.

Shape (bench/forward.py's): text hidden 512, 8 layers, vocab 32k, batch 4 x 1024 tokens,
one 224x224 image per sample, the last 256 tokens are the response. Ours:
``caspo_jax.step.make_train_step`` (forward with gradient through the text decoder AND the
vision tower, chunked LM head on the response, CASPO loss, AdamW), float32. Peer:
``Qwen2_5_VLForConditionalGeneration`` float32, ``attn_implementation="sdpa"``, full-sequence
logits, log-softmax, the same token-mean policy-gradient loss, ``loss.backward()`` (no
optimizer step: the peer is charged less work than we are). Also times a jitted 2048^3
float32 matmul in the same run and reports our model FLOP/s as a fraction of it (FLOPs
counted analytically as 3x bench/forward.py's forward count: backward = 2x forward).
Prints peak memory (XLA's memory analysis of the compiled step, the state donated as a
trainer does: args + outputs + temp - aliased) against params + grads + AdamW state. The step runs with ``StepConfig.remat="save_projections"``
(``--remat none`` for no rematerialisation): on this CPU it is faster (0.707 vs 0.665
of the roof, 2026-12-08) and keeps XLA's temporaries at ~1.2 GiB instead of ~2.3 GiB
(the MLP's elementwise residuals are recomputed, not stored; attention keeps only its
log-sum-exp either way, ``models/common/flash.py``).

Also times transformers' forward + backward with ``logits_to_keep`` (the LM head on the
response only, the peer's best setting; for information). ``--lengths`` (e.g. 1024 2048
4096) instead times our step and that peer at each length: RESULT = our growth per
doubling of the length over the peer's (goal <= 1).

Run: python bench/train_step.py   (ends with one RESULT line)
     python bench/train_step.py --batch 1 --lengths 1024 2048 4096   (growth; RESULT train_step_growth)
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

from caspo_jax.algo import CaspoConfig  # noqa: E402
from caspo_jax.step import StepConfig, build_train_batch, compute_logprobs, init_state, make_train_step  # noqa: E402

GOAL = 0.55


def _forward_bench():
    spec = importlib.util.spec_from_file_location("bench_forward", Path(__file__).with_name("forward.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_inputs(fwd, cfg, model, params, batch: int, length: int, response: int, image_px: int):
    """(raw inputs, TrainBatch with old/ref log-probs and random advantages, advantages) for a
    batch whose last ``response`` tokens are the response."""
    input_ids, mask, pixel_values, grid_thw = fwd.make_inputs(cfg, batch, length, image_px)
    Lp = length - response
    train_batch = build_train_batch(model, input_ids[:, :Lp], mask[:, :Lp], input_ids[:, Lp:], mask[:, Lp:],
                                    np.arange(batch), pixel_values=pixel_values, image_grid_thw=grid_thw)
    logp, _ = compute_logprobs(model, params, train_batch)
    adv = np.random.default_rng(0).standard_normal((batch, response)).astype(np.float32)
    train_batch = train_batch.with_signals(old_logp=np.asarray(logp), ref_logp=np.asarray(logp), advantages=adv)
    return (input_ids, mask, pixel_values, grid_thw), train_batch, adv


def torch_step_fn(fwd, hf, cfg, raw, train_batch, adv, *, keep_response_only: bool):
    """transformers' forward + backward of the same token-mean surrogate (ratio 1): full-sequence
    logits (a plain user) or ``logits_to_keep`` (the LM head on the response only, TRL's way)."""
    input_ids = raw[0]
    R = adv.shape[1]
    t_inputs = fwd.torch_inputs(cfg, *raw)
    t_targets = torch.tensor(input_ids[:, -R:])
    t_old, t_adv = torch.tensor(np.asarray(train_batch.old_logp)), torch.tensor(adv)

    def torch_step():
        hf.zero_grad(set_to_none=True)
        hf.model.rope_deltas = None
        if keep_response_only:
            logits = hf(**t_inputs, logits_to_keep=R + 1).logits[:, :-1]
        else:
            logits = hf(**t_inputs).logits[:, -R - 1:-1]
        lp = torch.log_softmax(logits, -1).gather(-1, t_targets[..., None])[..., 0]
        loss = (-t_adv * torch.exp(lp - t_old)).mean()
        loss.backward()
        return float(loss)

    return torch_step


def main_growth(fwd, args, cfg, hf, model, params, step_cfg, caspo) -> int:
    """The train step at each of ``args.lengths`` vs transformers' fwd+bwd with ``logits_to_keep``."""
    step = make_train_step(model, step_cfg, caspo, donate=True)
    holder = {"state": init_state(params, step_cfg)}
    ours, peer = {}, {}
    for L in args.lengths:
        raw, batch, adv = train_inputs(fwd, cfg, model, holder["state"].params, args.batch, L, args.response,
                                       args.image_px)
        compiled = step.lower(holder["state"], batch).compile()

        def jax_step():
            new_state, metrics = compiled(holder["state"], batch)
            holder["state"] = jax.block_until_ready(new_state)
            return float(metrics["loss"])

        torch_keep = torch_step_fn(fwd, hf, cfg, raw, batch, adv, keep_response_only=True)
        _, times = fwd.interleaved_rounds({"jax": jax_step, "peer": torch_keep}, args.repeats)
        ours[L], peer[L] = min(times["jax"]), min(times["peer"])
        print(f"{L} tokens: jax train step {ours[L]:.3f} s, transformers fwd+bwd logits_to_keep={args.response + 1} "
              f"{peer[L]:.3f} s", flush=True)
    print(f"growth: batch {args.batch}, {args.response} response tokens, vocab {args.vocab}, {args.layers} layers, "
          f"hidden 512, one {args.image_px}px image per sample; remat={args.remat}")
    print("\n".join(fwd.growth_report("train_step_growth", "train step", ours, peer)))
    return 0


def main(argv=None) -> int:
    fwd = _forward_bench()
    args = fwd.parse_args(__doc__.splitlines()[0], argv, repeats=2, add_more=lambda p: p.add_argument(
        "--remat", default="save_projections", choices=["none", "full", "save_projections", "save_dots"],
        help="StepConfig.remat (default save_projections: store the weight matmuls' outputs, "
             "recompute attention and elementwise work)"))

    cfg = fwd.bench_config(args.vocab, args.layers)
    hf, model, params = fwd.hf_and_port(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(**cfg), "sdpa",
                                        train=True)
    B, R = args.batch, args.response
    caspo = CaspoConfig(group_size=2, prompts_per_step=B)
    step_cfg = StepConfig(learning_rate=1e-6, remat=args.remat)
    if args.lengths:
        return main_growth(fwd, args, cfg, hf, model, params, step_cfg, caspo)
    raw, batch, adv = train_inputs(fwd, cfg, model, params, B, args.length, R, args.image_px)
    pixel_values = raw[2]
    step = make_train_step(model, step_cfg, caspo, donate=True)  # the state is updated in place, as a trainer does
    state = init_state(params, step_cfg)
    del params
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()

    # transformers: same inputs, the same token-mean surrogate (ratio 1), backward.
    torch_step = torch_step_fn(fwd, hf, cfg, raw, batch, adv, keep_response_only=False)
    torch_keep = torch_step_fn(fwd, hf, cfg, raw, batch, adv, keep_response_only=True)

    roof_run, roof_flop = fwd.matmul_roof_run()
    holder = {"state": state}

    def jax_step():
        new_state, metrics = compiled(holder["state"], batch)
        holder["state"] = jax.block_until_ready(new_state)
        return float(metrics["loss"])

    outputs, times = fwd.interleaved_rounds({"roof": roof_run, "jax": jax_step, "torch": torch_step,
                                             "torch_keep": torch_keep}, args.repeats)
    t_jax, t_torch, t_keep = min(times["jax"]), min(times["torch"]), min(times["torch_keep"])
    roof = roof_flop / min(times["roof"])
    patches = len(pixel_values)
    flops = 3 * fwd.model_flops(cfg, B, args.length, R, patches)
    torch_flops = 3 * fwd.model_flops(cfg, B, args.length, args.length, patches)
    fraction = flops / t_jax / roof
    state_bytes = 4 * n_params * 4  # params + grads + AdamW mu and nu, float32
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    tokens = B * args.length
    print(f"shape: batch {B} x {args.length} tokens ({R} response), vocab {args.vocab}, {args.layers} layers, "
          f"hidden 512, one {args.image_px}px image per sample; {n_params / 1e6:.1f} M params; "
          f"{jax.device_count()} JAX devices, torch threads {torch.get_num_threads()}, remat={args.remat}")
    print(f"matmul roof (2048^3 f32, JAX): {roof / 1e12:.3f} TFLOP/s")
    print(f"jax train step  : {t_jax:.3f} s min ({tokens / t_jax:.0f} tok/s), compile {compile_s:.1f} s, "
          f"{flops / 1e9:.1f} GFLOP -> {fraction:.2f} of the roof")
    print(f"torch fwd+bwd   : {t_torch:.3f} s min ({tokens / t_torch:.0f} tok/s), sdpa, "
          f"{torch_flops / 1e9:.1f} GFLOP -> {torch_flops / t_torch / roof:.2f} of the roof   [peer]")
    print(f"torch fwd+bwd, logits_to_keep={R + 1}: {t_keep:.3f} s min (the peer's best setting; jax is "
          f"{t_keep / t_jax:.2f}x faster)   (info)")
    print(f"speed vs peer: {t_torch / t_jax:.2f}x; medians: "
          + ", ".join(f"{n} {statistics.median(ts):.3f} s" for n, ts in times.items()))
    print(f"memory: XLA temp {mem.temp_size_in_bytes / 2**20:.0f} MiB, peak (args + outputs + temp - aliased) "
          f"{peak / 2**20:.0f} MiB vs params+grads+AdamW {state_bytes / 2**20:.0f} MiB "
          f"({peak / state_bytes:.2f}x)")
    print(f"losses: jax {outputs['jax']:.5f}, torch {outputs['torch']:.5f}")
    met = fraction >= GOAL and t_jax < t_torch
    print(f"RESULT name=train_step value={fraction:.3f} unit=roof_fraction goal=>={GOAL} met={'yes' if met else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
