"""Response log-probs: jitted JAX Qwen2.5-VL vs transformers' PyTorch forward, same weights and inputs.

Shape: text hidden 512, 8 layers, vocab 32k, batch 4 x 1024 tokens, one 224x224 image per
sample (256 patches -> 64 image tokens), the last 256 tokens are the response. Baseline:
``Qwen2_5_VLForConditionalGeneration`` float32 with ``attn_implementation="sdpa"``
(``--baseline-attn eager`` for the other one), full-sequence logits then log-softmax,
as a plain transformers user computes response log-probs. Also times a 2048^3 float32
matmul in JAX in the same run and reports the fraction of that roof the JAX forward
reaches (model FLOPs counted analytically: every matmul, dense attention scores, the LM
head on the response positions; XLA's cost analysis counts a scanned layer once).
For information it also times transformers with ``logits_to_keep`` (LM head on the
response only, as TRL does), which is not the goal's baseline.

Growth with length (``--lengths``): the same log-probs at each length against the peer's
best setting, transformers with ``logits_to_keep``; RESULT = our cost's growth per doubling
of the length over the peer's (goal <= 1).

Run: python bench/forward.py   (ends with one RESULT line)
     python bench/forward.py --batch 1 --lengths 1024 2048 4096   (growth; RESULT forward_growth)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from caspo_jax.models import load_pretrained  # noqa: E402
from caspo_jax.tiny import models as tm, qwen3_vl as tq  # noqa: E402

GOAL = 1.2


def bench_config(vocab: int, layers: int) -> dict:
    cfg = tm.hf_config_dict("vision", vocab_size=vocab, num_layers=layers)
    cfg["text_config"].update(hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                              num_key_value_heads=2, max_position_embeddings=4096)
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 12]
    cfg["vision_config"].update(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, window_size=112,
                                fullatt_block_indexes=[1, 3], out_hidden_size=512)
    ids = dict(image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
               vision_end_token_id=vocab - 1)
    cfg.update(ids)
    cfg["text_config"]["eos_token_id"] = vocab - 1
    return cfg


def make_inputs(cfg: dict, batch: int, length: int, image_px: int, seed: int = 0, patch: int = 14):
    """Random token ids with one image of image_px^2 pixels (2x2-merged patches) at position 5."""
    rng = np.random.default_rng(seed)
    grid = image_px // patch
    n_image = grid * grid // 4
    input_ids = rng.integers(0, cfg["text_config"]["vocab_size"] - 8, (batch, length))
    input_ids[:, 4] = cfg["vision_start_token_id"]
    input_ids[:, 5:5 + n_image] = cfg["image_token_id"]
    input_ids[:, 5 + n_image] = cfg["vision_end_token_id"]
    pixel_values = rng.standard_normal((batch * grid * grid, 3 * 2 * patch * patch)).astype(np.float32)
    image_grid_thw = np.tile([[1, grid, grid]], (batch, 1))
    return input_ids, np.ones_like(input_ids), pixel_values, image_grid_thw


def model_flops(cfg: dict, batch: int, length: int, lm_positions: int, patches: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add), attention scores computed densely."""
    t, v = cfg["text_config"], cfg["vision_config"]
    D, F, V, layers = t["hidden_size"], t["intermediate_size"], t["vocab_size"], t["num_hidden_layers"]
    hd = D // t["num_attention_heads"]
    NH, KH = D, t["num_key_value_heads"] * hd
    tokens = batch * length
    text = 2 * tokens * layers * (D * NH + 2 * D * KH + NH * D + 3 * D * F)
    attn = 4 * batch * t["num_attention_heads"] * length**2 * hd * layers
    head = 2 * batch * lm_positions * D * V
    E, Fv, O = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    vision = 2 * patches * 3 * 2 * 14 * 14 * E + v["depth"] * (
        2 * patches * (4 * E * E + 3 * E * Fv) + 4 * patches**2 * E) + 2 * (patches // 4) * (16 * E * E + 4 * E * O)
    return float(text + attn + head + vision)


def parse_args(description: str, argv, *, repeats: int, add_more=None):
    """The benches' common command line (shape and repeats); `add_more(parser)` adds the rest."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--image-px", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--lengths", type=int, nargs="+", metavar="L",
                        help="growth mode: time ours and the peer's best setting (transformers with logits_to_keep) "
                             "at each length (e.g. 1024 2048 4096) at --batch rows, instead of the headline")
    if add_more is not None:
        add_more(parser)
    return parser.parse_args(argv)


def hf_and_port(hf_class, hf_config, attn: str, *, train: bool = False):
    """transformers' model with seeded random float32 weights, and our port loaded from its save."""
    hf_config._attn_implementation = attn
    torch.manual_seed(0)
    hf = hf_class(hf_config).float()
    hf = hf.train() if train else hf.eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, params = load_pretrained(tmp)
    return hf, model, params


def torch_inputs(cfg: dict, input_ids, mask, pixel_values, grid_thw) -> dict:
    """`make_inputs`' arrays as the keyword tensors transformers' forward takes."""
    return dict(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask),
                pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid_thw),
                mm_token_type_ids=torch.tensor((input_ids == cfg["image_token_id"]).astype(np.int64)))


def torch_response_logprobs(hf, t_inputs: dict, targets, *, keep_response_only: bool = False):
    """transformers' log-probs of the last R tokens: full-sequence logits then log-softmax,
    as a plain user computes them, or (`keep_response_only`) with `logits_to_keep`, as TRL does."""
    t_targets = torch.tensor(targets)
    R = t_targets.shape[1]

    def logprobs():
        hf.model.rope_deltas = None
        with torch.no_grad():
            if keep_response_only:
                logits = hf(**t_inputs, logits_to_keep=R + 1).logits[:, :-1]
            else:
                logits = hf(**t_inputs).logits[:, -R - 1:-1]
            return torch.log_softmax(logits, -1).gather(-1, t_targets[..., None])[..., 0]

    return logprobs


def jax_response_logprobs(model, params, input_ids, mask, pixel_values, grid_thw, targets):
    """(fn, args): our log-probs of the last R tokens, host-side positions computed once, the
    LM head on the response only; `fn.lower(model, *args)` compiles it for `model`."""
    R = targets.shape[1]
    position_ids, _ = model.get_rope_index(input_ids, grid_thw, mask)
    grids = tuple(map(tuple, grid_thw.tolist()))

    @functools.partial(jax.jit, static_argnums=0)
    def logprobs(model, params, input_ids, mask, pixel_values, position_ids, targets):
        h = model.hidden_states(params, input_ids, mask, pixel_values, grids, position_ids=position_ids)
        logits = model.lm_head(params, h[:, -R - 1:-1])
        return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]

    args = (params, jnp.asarray(input_ids), jnp.asarray(mask), jnp.asarray(pixel_values),
            jnp.asarray(position_ids), jnp.asarray(targets))
    return logprobs, args


def matmul_roof_run():
    """(run, flop): a jitted 2048^3 float32 matmul to time beside the model (its best time is
    the roof the model's FLOP rate is compared with), and the FLOPs it does."""
    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return (lambda: matmul(a, a).block_until_ready()), 2 * 2048**3


def interleaved_rounds(runs: dict, repeats: int):
    """(outputs of a warm-up call, {name: [seconds]}) over `repeats` rounds that call every
    run in turn, so that load from other processes on the shared machine hits all alike."""
    outputs = {name: fn() for name, fn in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return outputs, times


def growth_per_doubling(seconds_by_length: dict[int, float]) -> float:
    """How many times the cost grows per doubling of the length: (t_last / t_first) ** (1 /
    log2(L_last / L_first)) over the shortest and longest lengths measured."""
    lengths = sorted(seconds_by_length)
    first, last = lengths[0], lengths[-1]
    if last == first:
        raise ValueError("growth needs at least two different lengths")
    return (seconds_by_length[last] / seconds_by_length[first]) ** (1 / np.log2(last / first))


def growth_report(name: str, unit: str, ours: dict[int, float], peer: dict[int, float]) -> list[str]:
    """The per-length table and the RESULT line: our growth per doubling over the peer's
    (goal <= 1: our cost grows no faster with length than the peer's)."""
    lines = [f"{'tokens':>7} {'ours (s)':>9} {'peer (s)':>9} {'peer/ours':>9}"]
    lines += [f"{L:>7} {ours[L]:>9.3f} {peer[L]:>9.3f} {peer[L] / ours[L]:>9.2f}" for L in sorted(ours)]
    g_ours, g_peer = growth_per_doubling(ours), growth_per_doubling(peer)
    ratio = g_ours / g_peer
    lines.append(f"growth per doubling: ours {g_ours:.2f}x, peer {g_peer:.2f}x ({unit})")
    met = "yes" if ratio <= 1.0 else "no"
    lines.append(f"RESULT name={name} value={ratio:.3f} unit=growth_ratio goal=<=1.0 met={met}")
    return lines


def main_growth(args, cfg, hf, model, params) -> int:
    """Response log-probs at each of ``args.lengths``: ours vs transformers with
    ``logits_to_keep`` (interleaved rounds, per-side minimum)."""
    ours, peer, R = {}, {}, args.response
    for L in args.lengths:
        input_ids, mask, pixel_values, grid_thw = make_inputs(cfg, args.batch, L, args.image_px)
        targets = input_ids[:, -R:]
        keep = torch_response_logprobs(hf, torch_inputs(cfg, input_ids, mask, pixel_values, grid_thw), targets,
                                       keep_response_only=True)
        jax_logprobs, j_args = jax_response_logprobs(model, params, input_ids, mask, pixel_values, grid_thw, targets)
        compiled = jax_logprobs.lower(model, *j_args).compile()
        outputs, times = interleaved_rounds({"jax": lambda: compiled(*j_args).block_until_ready(), "peer": keep},
                                            args.repeats)
        diff = float(np.abs(np.asarray(outputs["jax"]) - outputs["peer"].numpy()).max())
        if diff > 1e-3:
            print(f"ERROR: at {L} tokens JAX and transformers disagree (max |diff| {diff:.2e})", file=sys.stderr)
            return 1
        ours[L], peer[L] = min(times["jax"]), min(times["peer"])
        print(f"{L} tokens: jax {ours[L]:.3f} s, transformers logits_to_keep={R + 1} {peer[L]:.3f} s "
              f"(max |diff| {diff:.1e})", flush=True)
    print(f"growth: batch {args.batch}, {R} response tokens, vocab {args.vocab}, {args.layers} layers, hidden 512, "
          f"one {args.image_px}px image per sample; torch threads {torch.get_num_threads()}")
    print("\n".join(growth_report("forward_growth", "response log-probs", ours, peer)))
    return 0


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv, repeats=4, add_more=lambda p: p.add_argument(
        "--baseline-attn", default="sdpa", choices=["sdpa", "eager"]))


    cfg = bench_config(args.vocab, args.layers)
    hf, model, params = hf_and_port(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(**cfg), args.baseline_attn)
    if args.lengths:
        return main_growth(args, cfg, hf, model, params)
    input_ids, mask, pixel_values, grid_thw = make_inputs(cfg, args.batch, args.length, args.image_px)
    R = args.response
    targets = input_ids[:, -R:]
    t_inputs = torch_inputs(cfg, input_ids, mask, pixel_values, grid_thw)
    torch_logprobs = torch_response_logprobs(hf, t_inputs, targets)
    torch_logprobs_keep = torch_response_logprobs(hf, t_inputs, targets, keep_response_only=True)
    jax_logprobs, j_args = jax_response_logprobs(model, params, input_ids, mask, pixel_values, grid_thw, targets)
    start = time.perf_counter()
    compiled = jax_logprobs.lower(model, *j_args).compile()
    compile_s = time.perf_counter() - start
    dense = jax_logprobs.lower(dataclasses.replace(model, attn_block=0), *j_args).compile()
    patches = len(pixel_values)
    flops = model_flops(cfg, args.batch, args.length, R, patches)
    torch_flops = model_flops(cfg, args.batch, args.length, args.length, patches)

    roof_run, roof_flop = matmul_roof_run()
    outputs, times = interleaved_rounds({
        "roof": roof_run,
        "jax": lambda: compiled(*j_args).block_until_ready(),
        "jax_dense": lambda: dense(*j_args).block_until_ready(),
        "torch": torch_logprobs,
        "torch_keep": torch_logprobs_keep,
    }, args.repeats)
    # Minimum over rounds: the closest to each side's uncontended time on a shared machine
    # (PyTorch's OpenMP barriers stall badly when a neighbour takes a core, which would
    # inflate a median-based ratio); medians are printed too.
    t_jax, t_dense, t_torch, t_keep = (min(times[n]) for n in ("jax", "jax_dense", "torch", "torch_keep"))
    medians = {n: statistics.median(ts) for n, ts in times.items()}
    assert np.allclose(np.asarray(outputs["jax_dense"]), np.asarray(outputs["jax"]), atol=1e-4)
    roof = roof_flop / min(times["roof"])
    out_jax, out_torch = outputs["jax"], outputs["torch"]
    assert torch.allclose(outputs["torch_keep"], out_torch, atol=1e-4)
    max_diff = float(np.abs(np.asarray(out_jax) - out_torch.numpy()).max())
    speedup = t_torch / t_jax
    fraction = flops / t_jax / roof
    tokens = args.batch * args.length
    print(f"shape: batch {args.batch} x {args.length} tokens ({R} response), vocab {args.vocab}, "
          f"{args.layers} layers, hidden 512, one {args.image_px}px image per sample; "
          f"{jax.device_count()} JAX devices, torch threads {torch.get_num_threads()}")
    print(f"matmul roof (2048^3 f32, JAX): {roof / 1e12:.3f} TFLOP/s")
    print(f"jax    : {t_jax:.3f} s min  ({tokens / t_jax:.0f} tok/s), compile {compile_s:.1f} s, "
          f"{flops / 1e9:.1f} GFLOP (LM head on the response) -> {fraction:.2f} of the roof")
    print(f"jax, one dense attention call per layer (attn_block=0): {t_dense:.3f} s  (info)")
    print(f"torch  : {t_torch:.3f} s min  ({tokens / t_torch:.0f} tok/s), attn={args.baseline_attn}, "
          f"{torch_flops / 1e9:.1f} GFLOP -> {torch_flops / t_torch / roof:.2f} of the roof   [baseline]")
    print(f"torch logits_to_keep={R + 1}: {t_keep:.3f} s  (info; jax is {t_keep / t_jax:.2f}x faster)")
    print("medians over rounds: " + ", ".join(f"{n} {t:.3f} s" for n, t in medians.items())
          + f"  (median ratio {medians['torch'] / medians['jax']:.2f}x)")
    print(f"max |log-prob diff| jax vs torch: {max_diff:.2e}")
    if max_diff > 1e-3:
        print("ERROR: JAX and transformers disagree", file=sys.stderr)
        return 1
    print(f"RESULT name=forward value={speedup:.3f} unit=x goal=>={GOAL} met={'yes' if speedup >= GOAL else 'no'}")
    return 0


# ----- Qwen3-VL (issue 9): `python bench/forward.py --model qwen3_vl` ---------------------------
# Same measurement as above (response log-probs, transformers sdpa baseline, interleaved rounds,
# ratio of per-side minimum times) for a Qwen3-VL of the same text shape: hidden 512, head_dim 64
# (mrope_section [12, 10, 10], interleaved), q/k norm, and a 4-block patch-16 ViT with three
# DeepStack taps; one 224px image (14 x 14 patches -> 49 tokens) per sample.


def qwen3_vl_bench_config(vocab: int, layers: int) -> dict:
    cfg = tq.hf_config_dict("vision", vocab_size=vocab, num_layers=layers)
    cfg["text_config"].update(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                              head_dim=64, eos_token_id=vocab - 1)
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [12, 10, 10]
    cfg["vision_config"].update(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                                num_position_embeddings=2304, deepstack_visual_indexes=[0, 1, 2])
    cfg.update(image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
               vision_end_token_id=vocab - 1)
    return cfg


def main_qwen3_vl(argv=None) -> int:
    args = parse_args("Qwen3-VL response log-probs: JAX vs transformers", argv, repeats=3,
                      add_more=lambda p: p.add_argument("--baseline-attn", default="sdpa", choices=["sdpa", "eager"]))


    cfg = qwen3_vl_bench_config(args.vocab, args.layers)
    hf, model, params = hf_and_port(Qwen3VLForConditionalGeneration, Qwen3VLConfig(**cfg), args.baseline_attn)
    input_ids, mask, pixel_values, grid_thw = make_inputs(cfg, args.batch, args.length, args.image_px, patch=16)
    B, L, R = args.batch, args.length, args.response
    targets = input_ids[:, -R:]
    torch_logprobs = torch_response_logprobs(hf, torch_inputs(cfg, input_ids, mask, pixel_values, grid_thw), targets)
    jax_logprobs, j_args = jax_response_logprobs(model, params, input_ids, mask, pixel_values, grid_thw, targets)
    start = time.perf_counter()
    compiled = jax_logprobs.lower(model, *j_args).compile()
    compile_s = time.perf_counter() - start
    outputs, times = interleaved_rounds({"jax": lambda: compiled(*j_args).block_until_ready(),
                                         "torch": torch_logprobs}, args.repeats)
    t_jax, t_torch = min(times["jax"]), min(times["torch"])
    max_diff = float(np.abs(np.asarray(outputs["jax"]) - outputs["torch"].numpy()).max())
    speedup = t_torch / t_jax
    print(f"Qwen3-VL shape: batch {B} x {L} tokens ({R} response), vocab {args.vocab}, {args.layers} layers, "
          f"hidden 512, head_dim 64, ViT depth 4 with DeepStack taps [0, 1, 2], one {args.image_px}px image "
          f"per sample; torch threads {torch.get_num_threads()}")
    print(f"jax    : {t_jax:.3f} s min (median {statistics.median(times['jax']):.3f}), compile {compile_s:.1f} s")
    print(f"torch  : {t_torch:.3f} s min (median {statistics.median(times['torch']):.3f}), "
          f"attn={args.baseline_attn}   [baseline]")
    print(f"max |log-prob diff| jax vs torch: {max_diff:.2e}")
    if max_diff > 1e-3:
        print("ERROR: JAX and transformers disagree", file=sys.stderr)
        return 1
    print(f"RESULT name=forward_qwen3_vl value={speedup:.3f} unit=x goal=>={GOAL} "
          f"met={'yes' if speedup >= GOAL else 'no'}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:3] == ["--model", "qwen3_vl"]:
        sys.exit(main_qwen3_vl(sys.argv[3:]))
    sys.exit(main())
