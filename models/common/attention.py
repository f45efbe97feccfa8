"""Which attention kernel runs: ``model.attn_implementation = "auto"`` resolved per call.

``choose_attention`` is a pure function of the platform, the mask kind and the shapes, so
the decisions are tested on CPU with made-up inputs; ``resolve`` applies it inside a trace
(platform = ``jax.default_backend()``) and logs each distinct decision once.

Kernels:
- "cudnn": cuDNN fused (flash) attention through ``jax.nn.dot_product_attention`` on
  NVIDIA GPUs. bf16/fp16 only; head dim a multiple of 8 and at most 128 (256 on Hopper,
  which ``choose_attention`` cannot see, so it keeps to 128); with a mask in training,
  even query and key lengths (jax's ``check_is_flash_attention``). A boolean mask becomes
  a large-negative bias (never -inf, so fully masked padding rows stay finite, as in
  XLA); causal masks also set ``is_causal`` so cuDNN skips the upper triangle.
- "pallas_flash": Pallas TPU flash attention (``jax.experimental.pallas.ops.tpu``) for
  causal text attention, padding given as segment ids. Needs query and key lengths that
  are multiples of 128 and a head dim of at most 128 or a multiple of 128; GQA heads are
  repeated (the kernel has none). Segment (ViT window) attention and arbitrary dense
  masks stay on XLA on TPU: the [S, Lmax] window tiles are far below the kernel's blocks.
- None: JAX's own choice (XLA on every platform in jax 0.10), what "auto" gives on CPU,
  so CPU programs are unchanged.

Wherever the choice is XLA (None or "xla": CPU, and the GPU/TPU fallbacks above), causal
text attention (``layers.causal_attention``) runs ``flash.flash_causal_attention``, a
blocked kernel written in XLA ops with the causal skip and a hand-written backward; every
other mask kind goes to ``jax.nn.dot_product_attention``.

Mask kinds: "causal" (text self-attention, causal AND key padding, [B, 1, L, L]),
"segment" (the vision towers' [S, Lmax] segment tiles, key padding only or no mask),
"dense" (any other boolean mask, e.g. the prefill's causal mask passed without saying so).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

log = logging.getLogger(__name__)

AUTO = "auto"
EXPLICIT = (None, "xla", "cudnn")  # passed to jax.nn.dot_product_attention unchanged
MASK_KINDS = ("causal", "segment", "dense", "none")
TPU_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """implementation: None / "xla" / "cudnn" (jax.nn.dot_product_attention's) or
    "pallas_flash"; reason: why, for the log."""

    implementation: str | None
    reason: str


def choose_attention(requested: str | None, *, platform: str, mask_kind: str, dtype, head_dim: int, q_len: int,
                     kv_len: int, has_mask: bool = True) -> AttentionChoice:
    """The kernel for one attention call (pure; see the module docstring for the rules).

    requested: the model's ``attn_implementation``; anything but "auto" is returned as is.
    platform: "cpu", "gpu" (or "cuda"/"rocm"), "tpu". dtype: of q/k/v.
    """
    if requested != AUTO:
        return AttentionChoice(requested, "requested explicitly")
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind={mask_kind!r}; use one of {MASK_KINDS}")
    dtype_name = jax.numpy.dtype(dtype).name
    if platform in ("gpu", "cuda"):
        if dtype_name not in ("bfloat16", "float16"):
            return AttentionChoice("xla", f"cuDNN flash attention needs bf16/fp16 inputs, got {dtype_name}")
        if head_dim % 8 or head_dim > 128:
            return AttentionChoice("xla", f"cuDNN flash attention needs a head dim <= 128 and a multiple of 8, "
                                          f"got {head_dim}")
        if has_mask and (q_len % 2 or kv_len % 2):
            return AttentionChoice("xla", f"cuDNN's masked (bias) attention needs even lengths, got {q_len}x{kv_len}")
        return AttentionChoice("cudnn", f"cuDNN flash attention ({mask_kind} mask)")
    if platform == "tpu":
        if mask_kind != "causal":
            return AttentionChoice("xla", f"Pallas flash attention is used for causal text attention only "
                                          f"({mask_kind} mask stays on XLA)")
        if q_len % TPU_BLOCK or kv_len % TPU_BLOCK:
            return AttentionChoice("xla", f"Pallas flash attention needs lengths that are multiples of {TPU_BLOCK}, "
                                          f"got {q_len}x{kv_len}")
        if head_dim > TPU_BLOCK and head_dim % TPU_BLOCK:
            return AttentionChoice("xla", f"Pallas flash attention needs a head dim <= {TPU_BLOCK} or a multiple of "
                                          f"{TPU_BLOCK}, got {head_dim}")
        return AttentionChoice("pallas_flash", "Pallas TPU flash attention (causal, padding as segment ids)")
    return AttentionChoice(None, f"XLA on {platform} (JAX's default; no fused kernel here)")


_logged: set = set()


def resolve(requested: str | None, mask_kind: str, q_BxTxNxH, k_BxSxKxH, has_mask: bool = True) -> str | None:
    """The implementation to run for these (traced) arrays on the current default backend;
    "auto" decisions are logged once per distinct (choice, reason)."""
    if requested != AUTO:
        if requested not in EXPLICIT:
            raise ValueError(f"attn_implementation={requested!r}; use one of {[*EXPLICIT, AUTO]}")
        return requested
    choice = choose_attention(requested, platform=jax.default_backend(), mask_kind=mask_kind, dtype=q_BxTxNxH.dtype,
                              head_dim=q_BxTxNxH.shape[-1], q_len=q_BxTxNxH.shape[1], kv_len=k_BxSxKxH.shape[1],
                              has_mask=has_mask)
    key = (choice.implementation, choice.reason)
    if key not in _logged:
        _logged.add(key)
        log.info("attention (auto, %s): %s -- %s", mask_kind, choice.implementation or "JAX default", choice.reason)
    return choice.implementation


def key_segments(mask_Bx1xLxL: jax.Array) -> jax.Array:
    """Key validity [B, L] (int32: 1 attendable, 0 padding) of a causal-and-padding mask: the
    last query's row, which the causal part does not restrict."""
    return mask_Bx1xLxL[:, 0, -1, :].astype(jax.numpy.int32)


def pallas_flash_causal(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xLxL) -> jax.Array:
    """Causal attention with key padding through the Pallas TPU flash kernel: padding tokens
    form segment 0 and real tokens segment 1, so real queries see only real keys (padding
    queries see padding keys: meaningless rows, as in every implementation). TPU only."""
    N, K, H = q_BxLxNxH.shape[2], k_BxLxKxH.shape[2], q_BxLxNxH.shape[3]
    seg_BxL = key_segments(mask_Bx1xLxL)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH))  # [B, heads, L, H]
    k, v = (x.repeat(N // K, axis=1) for x in (k, v))
    out = tpu_flash.flash_attention(q, k, v, segment_ids=tpu_flash.SegmentIds(seg_BxL, seg_BxL), causal=True,
                                    sm_scale=H ** -0.5)
    return out.transpose(0, 2, 1, 3)
