"""After a push, prove the rollout engine holds the trainer's weights.

``verify_sync`` compares vLLM's prompt log-probs on a probe batch with the JAX model's
(float32 tolerance 1e-4). On a mismatch it names the first bad tensor: every HF tensor is
located in vLLM's fused parameters (q/k/v -> ``qkv_proj`` rows, gate/up -> ``gate_up_proj``
rows, ``model.`` -> ``language_model.model.``) and compared. vLLM's CPU kernels repack
linear weights into opaque buffers (their parameter becomes empty); those cannot be read
back and are listed as unreadable when no readable tensor differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from caspo_jax.bridge.hf_tensors import hf_tensor_refs, iter_hf_arrays
from caspo_jax.bridge.transport import in_process_worker

_FUSED = (
    (".self_attn.q_proj.", ".self_attn.qkv_proj.", 0),
    (".self_attn.k_proj.", ".self_attn.qkv_proj.", 1),
    (".self_attn.v_proj.", ".self_attn.qkv_proj.", 2),
    (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
    (".mlp.up_proj.", ".mlp.gate_up_proj.", 1),
)


class WeightSyncError(RuntimeError):
    """The rollout engine's outputs disagree with the trainer's after a weight push."""


def vllm_slots(table) -> dict[str, tuple[str, int, int]]:
    """HF name -> (vLLM parameter name, first row, end row) for vLLM's Qwen2-VL family layout."""
    refs = hf_tensor_refs(table)
    rows = {ref.name: ref.hf_shape[0] for ref in refs}
    slots = {}
    for ref in refs:
        name = ref.name
        if name.startswith("model."):
            target = "language_model." + name
        elif name.startswith("lm_head."):
            target = "language_model." + name
        else:
            target = name
        start, stop = 0, rows[name]
        for hf_part, vllm_part, position in _FUSED:
            if hf_part in name:
                siblings = [name.replace(hf_part, part) for part, fused, _ in _FUSED if fused == vllm_part]
                start = sum(rows[s] for s in siblings[:position])
                stop = start + rows[name]
                target = target.replace(hf_part, vllm_part)
                break
        slots[name] = (target, start, stop)
    return slots


def vllm_module_order(table) -> tuple[list[str], dict[str, str]]:
    """HF names grouped by the vLLM module that receives them (first-appearance order), and
    name -> module: a bucket that splits a module's pieces (q/k/v, gate/up, weight/bias)
    would leave vLLM processing a half-loaded module."""
    slots = vllm_slots(table)
    module_of = {name: target.rsplit(".", 1)[0] for name, (target, _, _) in slots.items()}
    groups: dict[str, list[str]] = {}
    for name in slots:
        groups.setdefault(module_of[name], []).append(name)
    return [name for names in groups.values() for name in names], module_of


def jax_prompt_logprobs(model, params, prompts) -> list[np.ndarray]:
    """log p(token t | tokens < t), t = 1..L-1, from the JAX forward (one prompt at a time)."""
    out = []
    for p in prompts:
        logits = model.forward(params, p.token_ids[None], pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)
        logp = np.asarray(jax.nn.log_softmax(logits[0, :-1], axis=-1))
        out.append(np.take_along_axis(logp, p.token_ids[1:, None].astype(np.int64), axis=1)[:, 0])
    return out


def find_bad_tensor(vllm_model, params, table) -> tuple[str | None, float, list[str]]:
    """(first HF tensor whose values differ in ``vllm_model``, its max |diff|, unreadable names)."""
    named = dict(vllm_model.named_parameters())
    slots = vllm_slots(table)
    unreadable = []
    for name, ours in iter_hf_arrays(params, table):
        target, start, stop = slots[name]
        if target not in named:
            return name, float("inf"), unreadable
        theirs = named[target].detach()
        if theirs.numel() == 0:
            unreadable.append(name)
            continue
        theirs = theirs.float().cpu().numpy()[start:stop]
        ours32 = np.asarray(ours, np.float32)
        if theirs.shape[0] > ours32.shape[0]:  # vocab-padded embeddings
            theirs = theirs[: ours32.shape[0]]
        if theirs.shape != ours32.shape:
            return name, float("inf"), unreadable
        diff = float(np.max(np.abs(theirs - ours32))) if ours32.size else 0.0
        if diff > 0:
            return name, diff, unreadable
    return None, 0.0, unreadable


def verify_sync(engine, params, probes: Sequence, *, atol: float = 1e-4) -> float:
    """Max |vLLM - JAX| prompt log-prob over ``probes``; raises ``WeightSyncError`` above ``atol``."""
    theirs = engine.prompt_logprobs(probes)
    ours = jax_prompt_logprobs(engine.model, params, probes)
    worst = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(theirs, ours))
    if worst <= atol:
        return worst
    detail = "the engine is not in-process, so tensors were not compared"
    try:
        vllm_model = in_process_worker(engine.llm).model_runner.get_model()
    except RuntimeError:
        vllm_model = None
    if vllm_model is not None:
        name, diff, unreadable = find_bad_tensor(vllm_model, params, engine.model.param_table())
        if name is not None:
            raise WeightSyncError(f"weight sync failed: prompt log-probs differ by {worst:.3g} (> {atol}); first bad "
                                  f"tensor: {name} (max |diff| {diff:.3g}, vLLM parameter {vllm_slots(engine.model.param_table())[name][0]})")
        detail = (f"every readable tensor matches; {len(unreadable)} are packed by vLLM's kernels and cannot be read "
                  f"back (first: {unreadable[:3]})")
    raise WeightSyncError(f"weight sync failed: prompt log-probs differ by {worst:.3g} (> {atol}); {detail}. Check "
                          "the dtype (float32 for exact checks) and that both sides resize images alike")
