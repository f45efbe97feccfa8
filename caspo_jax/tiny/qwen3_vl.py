"""Tiny random-weight Qwen3-VL configs, checkpoints and batches, built in code (no downloads).

Variants:

- ``"vision"``: text hidden 64, 3 layers, head_dim 16 (mrope_section [4, 2, 2], interleaved),
  a 2-block ViT (patch 16, 16 learned position embeddings = a 4 x 4 grid) with DeepStack
  taps [0, 1] (added after LLM layers 0 and 1).
- ``"deepstack"``: 5 LLM layers and a 4-block ViT with three DeepStack taps in a
  non-monotonic order [3, 0, 2], so tap order, vision-layer index and LLM layer all differ.
- ``"text"``: the smallest model (1-block ViT, one tap) for I/O tests.

Token ids, the batch layout and the random-weight reference are ``tiny.shared``'s.
"""

from __future__ import annotations

from pathlib import Path

from caspo_jax.tiny import shared
from caspo_jax.tiny.shared import (IMAGE_TOKEN_ID, MERGE, VIDEO_TOKEN_ID, VISION_END_TOKEN_ID,  # noqa: F401
                                   VISION_START_TOKEN_ID, VOCAB, MultimodalBatch, image_tokens)

PATCH_SIZE = 16
PATCH_DIM = 3 * 2 * PATCH_SIZE * PATCH_SIZE
PATCH_DIM = 3 * 2 * PATCH_SIZE * PATCH_SIZE


def hf_config_dict(variant: str = "vision", *, tie_word_embeddings: bool = False, vocab_size: int = VOCAB,
                   num_layers: int | None = None, attention_bias: bool = False) -> dict:
    """A transformers-5 style nested config dict for ``transformers.Qwen3VLConfig(**d)``."""
    layers, depth, taps, vision_hidden = {
        "vision": (3, 2, [0, 1], 32),
        "deepstack": (5, 4, [3, 0, 2], 32),
        "text": (2, 1, [0], 16),
    }[variant]
    return {
        "model_type": "qwen3_vl",
        "text_config": dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers or layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu", rms_norm_eps=1e-6,
            max_position_embeddings=4096, attention_bias=attention_bias, bos_token_id=None,
            eos_token_id=VISION_END_TOKEN_ID,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                             "mrope_interleaved": True}),
        "vision_config": dict(
            depth=depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
            hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=PATCH_SIZE, spatial_merge_size=MERGE,
            temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=taps),
        **shared.SPECIAL_TOKEN_FIELDS,
        "tie_word_embeddings": tie_word_embeddings,
    }


def _scale_of(name: str) -> tuple[float, float]:
    """Norm scales near 1, learned position embeddings N(0, 0.5), everything else N(0, 0.05)."""
    if name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name:
        return 1.0, 0.1
    if name.endswith("pos_embed.weight"):
        return 0.0, 0.5
    return 0.0, 0.05


def hf_model(variant: str = "vision", *, seed: int = 0, attn_implementation: str = "eager", **kwargs):
    """A float32 ``transformers.Qwen3VLForConditionalGeneration`` with random weights (eval mode)."""
    return shared.random_hf_model("Qwen3VL", hf_config_dict(variant, **kwargs), seed=seed,
                                  attn_implementation=attn_implementation, scale_of=_scale_of)


def save_hf_checkpoint(out_dir: str | Path, variant: str = "vision", *, seed: int = 0, **kwargs) -> Path:
    """Write a tiny checkpoint with transformers' own ``save_pretrained``; returns the directory."""
    hf_model(variant, seed=seed, **kwargs).save_pretrained(out_dir)
    return Path(out_dir)


def make_batch(samples: list[list], **options) -> MultimodalBatch:
    """``shared.make_batch`` at Qwen3-VL's patch size, each video frame timestamped as its processor does."""
    return shared.make_batch(samples, patch_size=PATCH_SIZE, timestamped_video_frames=True, **options)
