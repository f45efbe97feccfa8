"""Accelerator readiness in one run: parity, train-step MFU, sampler vs vLLM, weight sync, memory.

Built for one H100 or H200 (under 8 minutes): random-weight models at Qwen2.5-VL-3B shapes
(text hidden 2048, 36 layers, 16 heads / 2 kv heads, MLP 11008, vocab 151936, tied embeddings;
ViT depth 32, width 1280), built in memory and saved to a temporary directory for
transformers and vLLM; nothing is downloaded. RESULT lines:

- ``parity``: bfloat16 response log-probs, our jitted forward vs transformers (sdpa) on
  the same device, max |diff| (goal <= PARITY_GOAL[dtype]);
- ``train_mfu_L`` for L in --lengths (default 1k, 2k, 4k; one image per row, rows =
  --tokens // L): model FLOPs (bench/forward.py's analytic count x 3, remat recompute
  not counted) / step time / the device's peak bf16 FLOP/s (goal >= 0.40);
- ``peak_memory``: the device's peak bytes after the train steps (XLA's memory analysis of
  the step where the runtime has no counter) over `caspo dryrun`'s estimate for the
  longest length (``launch.dryrun.estimate_memory``), goal within 15%;
- ``sampler``: JaxSampler new tokens/s over vLLM's on the same GPU, 4 prompts x n=16
  (skipped with the reason when vllm does not import);
- ``weight_sync``: seconds to push the weights into the in-process vLLM engine
  (DLPack, no host copy; goal <= 1 s); without vllm, the DLPack hand-over to torch alone;
- ``sleep_wake``: vLLM sleep level 2 (weights dropped) around a no-op update, woken with
  the weights re-pushed (``colocate.engine_asleep``): greedy tokens must equal those
  before (trl#5312); skipped where sleep mode is unavailable (CPU).

Every model runs with ``attn_implementation="auto"`` (cuDNN flash attention on the GPU in
bf16), so the parity line also checks the fused kernel. On a GPU every phase runs in its
own process (``--phase``), so each gets the whole memory (JAX never returns its pool); the
last phase colocates JAX and vLLM in one process under
``caspo_jax.rollout.colocate.MemorySplit``, as the trainer does. Where the full model's
train state does not fit the device (the dryrun estimate says so before anything is
allocated), the train phase drops text layers until it fits and says so.

Run: python bench/device_check.py           (a GPU machine; vLLM parts need `vllm`)
     python bench/device_check.py --smoke   (CPU, tiny shapes, in-process, < 2 min; CI runs it)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from caspo_jax.algo import CaspoConfig  # noqa: E402
from caspo_jax.bridge.hf_tensors import iter_torch_tensors  # noqa: E402
from caspo_jax.launch import dryrun  # noqa: E402
from caspo_jax.models import load_pretrained, save_pretrained  # noqa: E402
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig  # noqa: E402
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams  # noqa: E402
from caspo_jax.rollout.colocate import (  # noqa: E402
    MemorySplit,
    engine_asleep,
    set_jax_memory_fraction,
    sleep_unavailable,
)
from caspo_jax.step import StepConfig, build_train_batch, compute_logprobs, init_state, make_train_step  # noqa: E402
from caspo_jax.tiny import models as tm  # noqa: E402
from caspo_jax.tiny.tokenizer import (  # noqa: E402
    build_tiny_processor,
    build_tiny_tokenizer,
    save_tiny_processor,
    tokenizer_info,
)

PARITY_GOAL = {"float32": 1e-4, "bfloat16": 0.1}  # max |log-prob diff|; bf16: uncalibrated on a GPU so far
MFU_GOAL, SYNC_GOAL_S, MEMORY_TOLERANCE, SAMPLER_GOAL = 0.40, 1.0, 0.15, 1.0
# Dense bf16 tensor-core peak (FLOP/s) by device_kind substring, most specific first.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("A100", 312e12), ("L40S", 362e12))
LOW_TOKEN_IDS = 600  # the tiny tokenizer's ids (specials included) lie below; random prompt ids stay above


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures: the shapes and sizes of every phase."""

    smoke: bool
    dtype: str
    layers: int
    lengths: tuple[int, ...]
    tokens: int  # train-step tokens per step (rows = tokens // length)
    response: int
    image_px: int
    prompts: int
    n: int
    prompt_len: int
    new_tokens: int
    parity_length: int
    engine_share: float  # the vLLM engine's share of the GPU in the colocated phase


def make_plan(args) -> Plan:
    if args.smoke:
        return Plan(True, "float32", 2, tuple(args.lengths or (64, 128)), 256, 16, 56, 2, 2, 16, 8, 64, 0.3)
    return Plan(False, "bfloat16", args.layers, tuple(args.lengths or (1024, 2048, 4096)), args.tokens, 256, 448,
                4, 16, 128, 128, 1024, 0.3)


def model_config(plan: Plan) -> dict:
    """HF config dict: Qwen2.5-VL-3B's shapes (or the tiny test shape with --smoke), with the
    tiny tokenizer's special-token ids so vLLM's processor agrees with the config."""
    if plan.smoke:
        cfg = tm.hf_config_dict("vllm", num_layers=plan.layers, vocab_size=1024)
    else:
        cfg = tm.hf_config_dict("vision", vocab_size=151936, num_layers=plan.layers, tie_word_embeddings=True)
        cfg["text_config"].update(hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                                  num_key_value_heads=2, max_position_embeddings=32768)
        cfg["text_config"]["rope_parameters"].update(rope_theta=1e6, mrope_section=[16, 24, 24])
        cfg["vision_config"].update(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                    window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048)
    info = tokenizer_info(build_tiny_tokenizer())
    cfg.update(image_token_id=info.image_token_id, video_token_id=info.video_token_id,
               vision_start_token_id=info.vision_start_token_id, vision_end_token_id=info.vision_end_token_id)
    cfg["text_config"]["eos_token_id"] = info.im_end_id
    return cfg


def make_inputs(cfg: dict, rows: int, length: int, image_px: int, seed: int = 0, patch: int = 14):
    """(input_ids, mask, pixel_values, grid_thw): random ids above the tokenizer's specials,
    one image_px^2 image per row at position 5 (2x2-merged patches)."""
    rng = np.random.default_rng(seed)
    grid = image_px // patch
    n_image = grid * grid // 4
    input_ids = rng.integers(LOW_TOKEN_IDS, cfg["text_config"]["vocab_size"], (rows, length))
    input_ids[:, 4] = cfg["vision_start_token_id"]
    input_ids[:, 5:5 + n_image] = cfg["image_token_id"]
    input_ids[:, 5 + n_image] = cfg["vision_end_token_id"]
    pixel_values = rng.standard_normal((rows * grid * grid, 3 * 2 * patch * patch)).astype(np.float32)
    return input_ids, np.ones_like(input_ids), pixel_values, np.tile([[1, grid, grid]], (rows, 1))


def result(name: str, value: float, unit: str, goal: str, met: bool | None, note: str = "") -> str:
    """One RESULT line (met=skipped when the measurement could not be made)."""
    flag = "skipped" if met is None else ("yes" if met else "no")
    return f"RESULT name={name} value={value:.4g} unit={unit} goal={goal} met={flag}" + (f"  # {note}" if note else "")


def _forward_bench():
    spec = importlib.util.spec_from_file_location("bench_forward", Path(__file__).with_name("forward.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(fn, repeats: int = 1):
    """(last output, min seconds over ``repeats`` calls after one warm-up call)."""
    out = jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return out, best


def vllm_missing() -> str | None:
    """Why the vLLM parts cannot run here (None when vllm is importable)."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed in this environment (pip install -e '.[gpu]')"
    try:
        import vllm  # noqa: F401
    except Exception as err:  # noqa: BLE001  (a broken install is a reason too)
        return f"import vllm failed: {type(err).__name__}: {err}"
    return None


def peak_flops(device, fallback) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): the datasheet dense bf16 figure of known GPUs, else
    ``fallback()`` (a matmul roof measured now)."""
    kind = getattr(device, "device_kind", "")
    for key, flops in PEAK_BF16:
        if key in kind:
            return flops, f"{kind} datasheet dense bf16"
    return fallback(), f"{kind or device.platform}: measured matmul roof (no datasheet figure)"


# ----- phases ---------------------------------------------------------------------------------
def phase_build(plan: Plan, workdir: Path) -> dict:
    """Random weights at the plan's shape, saved as an HF directory (config, safetensors,
    tokenizer, processor) for transformers and vLLM."""
    cfg = model_config(plan)
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(cfg))
    start = time.perf_counter()
    save_pretrained(model, model.init(jax.random.PRNGKey(0), jnp.dtype(plan.dtype)), workdir, dtype=plan.dtype)
    save_tiny_processor(build_tiny_processor(), workdir)
    (workdir / "hf_config.json").write_text(json.dumps(cfg))
    n = sum(int(np.prod(s.shape)) for s in model.param_table())
    print(f"build: {n / 1e9:.3f} B parameters, {plan.dtype}, saved in {time.perf_counter() - start:.1f} s")
    return {"params": n}


def phase_parity(plan: Plan, workdir: Path) -> dict:
    """Response log-probs of our forward vs transformers' (sdpa, logits_to_keep) on the
    same weights, inputs and device, in ``plan.dtype``."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not plan.smoke:
        set_jax_memory_fraction(0.45)  # transformers' copy of the weights takes the rest
    fwd = _forward_bench()
    cfg = json.loads((workdir / "hf_config.json").read_text())
    model, params = load_pretrained(workdir, dtype=jnp.dtype(plan.dtype), attn_implementation="auto",
                                    progress=False)
    input_ids, mask, pixel_values, grid_thw = make_inputs(cfg, 2, plan.parity_length, plan.image_px)
    R = plan.response
    targets = input_ids[:, -R:]
    logprobs, j_args = fwd.jax_response_logprobs(model, params, input_ids, mask, pixel_values, grid_thw, targets)
    ours = np.asarray(logprobs(model, *j_args), np.float64)
    del params, j_args

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_dtype = getattr(torch, plan.dtype)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(workdir, dtype=t_dtype, attn_implementation="sdpa")
    hf = hf.to(device).eval()
    t_inputs = {k: v.to(device) for k, v in fwd.torch_inputs(cfg, input_ids, mask, pixel_values, grid_thw).items()}
    t_inputs["pixel_values"] = t_inputs["pixel_values"].to(t_dtype)
    with torch.no_grad():
        logits = hf(**t_inputs, logits_to_keep=R + 1).logits[:, :-1].float()
        theirs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets, device=device)[..., None])[..., 0]
    diff = np.abs(ours - theirs.double().cpu().numpy())
    print(f"parity ({plan.dtype}, {device}, 2 x {plan.parity_length} tokens, {R} response): max |diff| "
          f"{diff.max():.3e}, mean {diff.mean():.3e}")
    return {"parity_max": float(diff.max()), "parity_mean": float(diff.mean())}


def fitting_layers(plan: Plan, cfg: dict, memory_bytes: float | None, step_cfg: StepConfig) -> tuple[int, object]:
    """(text layers that fit, the dryrun estimate at the longest length): the plan's layer
    count, lowered until `caspo dryrun`'s estimate fits ``memory_bytes`` (None: no limit)."""
    layers = cfg["text_config"]["num_hidden_layers"]
    L = max(plan.lengths)
    while True:
        text = dict(cfg["text_config"], num_hidden_layers=layers)
        model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(dict(cfg, text_config=text)))
        table = model.param_table()
        estimate = dryrun.estimate_memory(
            table, dryrun.text_dims(model.config), (1, 1, 1), rows=max(1, plan.tokens // L), seq_len=L,
            response_len=plan.response, compute_dtype=step_cfg.compute_dtype, remat=step_cfg.remat in (True, "full"),
            optimizer_leaves=dryrun.optimizer_copies(table, step_cfg), attn_block=model.attn_block,
            logprob_chunk=step_cfg.logprob_chunk)
        if memory_bytes is None or estimate.total <= 0.92 * memory_bytes or layers <= 1:
            return layers, estimate
        layers -= 1


def phase_train(plan: Plan, workdir: Path) -> dict:
    """The jitted CASPO train step (text + ViT gradients, AdamW, bf16 compute over f32 master
    weights, full remat) at each length: MFU; then peak memory vs the dryrun estimate."""
    if not plan.smoke:
        set_jax_memory_fraction(0.95)  # alone on the device
    fwd = _forward_bench()
    cfg = json.loads((workdir / "hf_config.json").read_text())
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    step_cfg = StepConfig(learning_rate=1e-6, compute_dtype=plan.dtype, remat="full")
    layers, estimate = fitting_layers(plan, cfg, stats.get("bytes_limit"), step_cfg)
    note = "" if layers == cfg["text_config"]["num_hidden_layers"] else (
        f"{layers} of {cfg['text_config']['num_hidden_layers']} text layers (the full train state does not fit)")
    cfg = dict(cfg, text_config=dict(cfg["text_config"], num_hidden_layers=layers))
    if note:  # fewer layers than the saved checkpoint: fresh random weights
        model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(cfg))
        params = model.init(jax.random.PRNGKey(0))
    else:  # float32 master weights of the saved checkpoint (cheaper than compiling the init)
        model, params = load_pretrained(workdir, dtype=jnp.float32, attn_implementation="auto",
                                        progress=False)
    state = init_state(params, step_cfg)
    del params
    step = make_train_step(model, step_cfg, CaspoConfig(group_size=2, prompts_per_step=1), donate=True)
    peak, source = peak_flops(device, lambda: 2 * 2048**3 / _timed(fwd.matmul_roof_run()[0], 3)[1])
    out, analysis_peak = {"layers": layers, "note": note, "peak_flops_source": source}, 0
    for L in plan.lengths:
        rows, R = max(1, plan.tokens // L), plan.response
        ids, mask, pixels, grids = make_inputs(cfg, rows, L, plan.image_px)
        batch = build_train_batch(model, ids[:, :L - R], mask[:, :L - R], ids[:, L - R:], mask[:, L - R:],
                                  np.arange(rows), pixel_values=pixels, image_grid_thw=grids)
        logp, _ = compute_logprobs(model, state.params, batch, compute_dtype=plan.dtype)
        adv = np.random.default_rng(0).standard_normal((rows, R)).astype(np.float32)
        batch = batch.with_signals(old_logp=np.asarray(logp), ref_logp=np.asarray(logp), advantages=adv)
        compiled = step.lower(state, batch).compile()
        mem = compiled.memory_analysis()
        analysis_peak = max(analysis_peak, mem.temp_size_in_bytes + mem.argument_size_in_bytes
                            + mem.output_size_in_bytes - mem.alias_size_in_bytes)
        holder = {"state": state}

        def run():
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics["loss"]

        _, seconds = _timed(run, repeats=2)
        state = holder["state"]
        flops = 3 * fwd.model_flops(cfg, rows, L, R, len(pixels))
        out[f"mfu_{L}"] = flops / seconds / peak
        print(f"train step at {rows} x {L} tokens: {seconds:.3f} s, {flops / 1e12:.2f} TFLOP -> "
              f"MFU {out[f'mfu_{L}']:.3f} of {peak / 1e12:.0f} TFLOP/s ({source})")
    runtime_peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    out["peak_bytes"] = runtime_peak or analysis_peak
    out["peak_source"] = "runtime peak_bytes_in_use" if runtime_peak else "XLA memory analysis (no runtime counter)"
    out["estimate_bytes"] = estimate.total
    print(f"memory: peak {out['peak_bytes'] / 2**30:.2f} GiB ({out['peak_source']}) vs dryrun estimate "
          f"{estimate.total / 2**30:.2f} GiB (params {estimate.params / 2**30:.2f}, optimizer "
          f"{estimate.optimizer / 2**30:.2f}, activations {estimate.activations / 2**30:.2f})")
    return out


def phase_colocated(plan: Plan, workdir: Path) -> dict:
    """JAX and vLLM in one process under a MemorySplit: JAX sampler tokens/s, vLLM's, and the
    in-process weight push (DLPack)."""
    import torch

    split = MemorySplit.for_engine(plan.engine_share)
    if not plan.smoke:
        set_jax_memory_fraction(split.trainer)
    model, params = load_pretrained(workdir, dtype=jnp.dtype(plan.dtype), attn_implementation="auto",
                                    progress=False)
    rng = np.random.default_rng(0)
    vocab = model.config.text.vocab_size
    prompts = [RolloutPrompt(rng.integers(LOW_TOKEN_IDS, vocab, plan.prompt_len)) for _ in range(plan.prompts)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=plan.new_tokens, seed=0)
    total = plan.prompts * plan.n * plan.new_tokens
    sampler = JaxSampler(model, params, eos_token_ids=(), min_new_bucket=plan.new_tokens)
    _, seconds = _timed(lambda: sampler.generate(prompts, n=plan.n, sampling=sampling).tokens)
    out = {"jax_tokens_per_s": total / seconds, "split": split.describe()}
    print(f"JAX sampler: {out['jax_tokens_per_s']:.0f} new tokens/s ({plan.prompts} prompts x n={plan.n}, "
          f"{plan.new_tokens} new tokens, {seconds:.2f} s)")

    reason = vllm_missing()
    if reason is not None:
        out["vllm_skipped"] = reason
        table = model.param_table()

        def handover():  # what the push hands vLLM's loader: DLPack views, no host copy
            return sum(t.numel() for _, t in iter_torch_tensors(params, table, dlpack=True))

        _, out["handover_s"] = _timed(handover, repeats=3)
        print(f"vLLM part skipped: {reason}; DLPack hand-over of the weights to torch: "
              f"{out['handover_s'] * 1e3:.1f} ms")
        return out

    from caspo_jax.rollout import VllmEngine

    engine = VllmEngine.start(workdir, model, dtype=plan.dtype, max_model_len=plan.prompt_len + plan.new_tokens + 16,
                              eos_token_ids=(), dlpack=True,
                              llm_kwargs=dict(limit_mm_per_prompt={"image": 0},
                                              **(split.engine_kwargs() if torch.cuda.is_available() else {})))
    _, seconds = _timed(lambda: engine.generate(prompts, n=plan.n, sampling=sampling).tokens)
    out["vllm_tokens_per_s"] = total / seconds
    print(f"vLLM ({split.describe()}): {out['vllm_tokens_per_s']:.0f} new tokens/s ({seconds:.2f} s)")
    _, out["sync_s"] = _timed(lambda: engine.sync_weights(params), repeats=3)
    print(f"weight sync (in-process, DLPack): {out['sync_s']:.3f} s")
    # sleep level 2 (weights dropped) with the re-push on waking: greedy output must not change (trl#5312)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16, seed=0)
    before = engine.generate(prompts[:2], n=1, sampling=greedy).tokens
    start = time.perf_counter()
    with engine_asleep(engine, level=2, repush=lambda: engine.sync_weights(params)) as slept:
        pass
    if slept:
        out["sleep_wake_s"] = time.perf_counter() - start
        after = engine.generate(prompts[:2], n=1, sampling=greedy).tokens
        out["sleep_same_tokens"] = bool(np.array_equal(before, after))
        print(f"sleep(2) + wake + re-push: {out['sleep_wake_s']:.2f} s; greedy tokens unchanged: "
              f"{out['sleep_same_tokens']}")
    else:
        out["sleep_skipped"] = sleep_unavailable(engine)
        print(f"sleep mode not exercised: {out['sleep_skipped']}")
    engine.shutdown()
    return out


PHASES = {"build": phase_build, "parity": phase_parity, "train": phase_train, "colocated": phase_colocated}


PHASE_MARK = "PHASE_JSON "  # prefixes a child's result line (libraries may log after it)


def run_phase(name: str, plan: Plan, workdir: Path, argv: list[str], isolate: bool) -> dict:
    """A phase in this process, or (``isolate``) in a fresh one, its output streamed through
    and its result read from the line marked ``PHASE_MARK``."""
    if not isolate:
        return PHASES[name](plan, workdir)
    cmd = [sys.executable, __file__, *argv, "--phase", name, "--workdir", str(workdir)]
    found = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.startswith(PHASE_MARK):
                found = json.loads(line[len(PHASE_MARK):])
            else:
                print(line, end="", flush=True)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"phase {name} failed (exit {proc.returncode}); its output is above")
    return found


def report(plan: Plan, parity: dict, train: dict, colocated: dict) -> list[str]:
    """The RESULT lines of the whole run."""
    lines = [result("parity", parity["parity_max"], f"max_abs_logprob_diff_{plan.dtype}",
                    f"<={PARITY_GOAL[plan.dtype]:g}", parity["parity_max"] <= PARITY_GOAL[plan.dtype])]
    for L in plan.lengths:
        lines.append(result(f"train_mfu_{L}", train[f"mfu_{L}"], "mfu", f">={MFU_GOAL}", train[f"mfu_{L}"] >= MFU_GOAL,
                            train["note"] or train["peak_flops_source"]))
    ratio = train["peak_bytes"] / train["estimate_bytes"]
    lines.append(result("peak_memory", ratio, "x_dryrun_estimate", f"1+-{MEMORY_TOLERANCE}",
                        abs(ratio - 1) <= MEMORY_TOLERANCE, train["peak_source"]))
    if "vllm_skipped" in colocated:
        reason = colocated["vllm_skipped"]
        lines.append(result("sampler", colocated["jax_tokens_per_s"], "jax_tokens_per_s", f">={SAMPLER_GOAL}x_vllm",
                            None, reason))
        lines.append(result("weight_sync", colocated["handover_s"], "s_dlpack_handover_only", f"<={SYNC_GOAL_S}",
                            None, reason))
    else:
        ratio = colocated["jax_tokens_per_s"] / colocated["vllm_tokens_per_s"]
        lines.append(result("sampler", ratio, "x_vllm", f">={SAMPLER_GOAL}", ratio >= SAMPLER_GOAL,
                            f"jax {colocated['jax_tokens_per_s']:.0f} vs vllm "
                            f"{colocated['vllm_tokens_per_s']:.0f} tok/s"))
        lines.append(result("weight_sync", colocated["sync_s"], "s", f"<={SYNC_GOAL_S}",
                            colocated["sync_s"] <= SYNC_GOAL_S))
        if "sleep_same_tokens" not in colocated:
            lines.append(result("sleep_wake", 0, "greedy_tokens_unchanged", "=1", None,
                                colocated.get("sleep_skipped", "not run")))
        else:
            lines.append(result("sleep_wake", float(colocated["sleep_same_tokens"]), "greedy_tokens_unchanged", "=1",
                                colocated["sleep_same_tokens"],
                                f"sleep(2) + wake + re-push {colocated['sleep_wake_s']:.2f} s"))
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, every phase in this process")
    parser.add_argument("--layers", type=int, default=36, help="text layers (Qwen2.5-VL-3B: 36)")
    parser.add_argument("--lengths", type=int, nargs="+", help="train-step sequence lengths (default 1024 2048 4096)")
    parser.add_argument("--tokens", type=int, default=8192, help="train-step tokens per step (rows = tokens // length)")
    parser.add_argument("--isolate", action="store_true",
                        help="run each phase in its own process (the default off --smoke)")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    plan = make_plan(args)
    if args.phase:  # a child of an isolated run: one phase, its result as a marked JSON line
        print(PHASE_MARK + json.dumps(PHASES[args.phase](plan, args.workdir)), flush=True)
        return 0
    isolate = args.isolate or not plan.smoke
    start = time.perf_counter()
    print(f"device check: {'smoke (CPU, tiny shapes)' if plan.smoke else 'Qwen2.5-VL-3B shapes'}, "
          f"jax {jax.__version__}, {'phases isolated' if isolate else 'one process'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        workdir = Path(tmp)
        results = {name: run_phase(name, plan, workdir, argv, isolate) for name in PHASES}
    for line in report(plan, results["parity"], results["train"], results["colocated"]):
        print(line)
    print(f"device check done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
