"""Tiny random-weight Qwen2.5-VL configs and checkpoints, built in code (no downloads).

Every later test builds its models here. Variants:

- ``"text"``: a text-only-sized model (the vision tower is still present, as in every
  Qwen2.5-VL checkpoint, but minimal).
- ``"vision"``: text hidden 64 (head_dim 16, mrope_section [2, 3, 3]) with a 2-block ViT
  (window_size 56, fullatt_block_indexes [1]) so window and full attention both run.
- ``"vllm"``: head_dim 32 (hidden 128, 4 heads, 2 kv heads, mrope_section [4, 6, 6]),
  the smallest shape vLLM's kernels load.

Token ids, the batch layout and the random-weight reference are ``tiny.shared``'s.
"""

from __future__ import annotations

from pathlib import Path

from caspo_jax.tiny import shared
from caspo_jax.tiny.shared import (IMAGE_TOKEN_ID, MERGE, VIDEO_TOKEN_ID, VISION_END_TOKEN_ID,  # noqa: F401
                                   VISION_START_TOKEN_ID, VOCAB, MultimodalBatch, image_tokens)

PATCH_SIZE = 14


def hf_config_dict(variant: str = "vision", *, tie_word_embeddings: bool = False, num_layers: int = 2,
                   vocab_size: int = VOCAB) -> dict:
    """A transformers-5 style nested config dict for ``Qwen2_5_VLConfig(**d)``."""
    text = {
        "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     mrope_section=[2, 3, 3]),
        "vision": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       mrope_section=[2, 3, 3]),
        "vllm": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                     mrope_section=[4, 6, 6]),
    }[variant]
    vision = {
        "text": dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, fullatt_block_indexes=[0]),
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]),
        "vllm": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1]),
    }[variant]
    section = text.pop("mrope_section")
    return {
        "model_type": "qwen2_5_vl",
        "text_config": dict(
            vocab_size=vocab_size, num_hidden_layers=num_layers, hidden_act="silu", rms_norm_eps=1e-6,
            max_position_embeddings=4096, bos_token_id=None, eos_token_id=VISION_END_TOKEN_ID,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}, **text),
        "vision_config": dict(
            hidden_act="silu", in_channels=3, patch_size=PATCH_SIZE, spatial_merge_size=MERGE,
            temporal_patch_size=2, window_size=56, tokens_per_second=2, out_hidden_size=text["hidden_size"],
            **vision),
        **shared.SPECIAL_TOKEN_FIELDS,
        "tie_word_embeddings": tie_word_embeddings,
    }


def _scale_of(name: str) -> tuple[float, float]:
    """Norm scales near 1, everything else (biases included) N(0, 0.05)."""
    if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
        return 1.0, 0.1
    return 0.0, 0.05


def hf_model(variant: str = "vision", *, seed: int = 0, attn_implementation: str = "eager", **kwargs):
    """A float32 ``transformers.Qwen2_5_VLForConditionalGeneration`` with random weights (eval mode)."""
    return shared.random_hf_model("Qwen2_5_VL", hf_config_dict(variant, **kwargs), seed=seed,
                                  attn_implementation=attn_implementation, scale_of=_scale_of)


def save_hf_checkpoint(out_dir: str | Path, variant: str = "vision", *, seed: int = 0, **kwargs) -> Path:
    """Write a tiny checkpoint with transformers' own ``save_pretrained``; returns the directory."""
    hf_model(variant, seed=seed, **kwargs).save_pretrained(out_dir)
    return Path(out_dir)


def make_batch(samples: list[list], **options) -> MultimodalBatch:
    """``shared.make_batch`` at Qwen2.5-VL's patch size (a video is one placeholder run)."""
    return shared.make_batch(samples, patch_size=PATCH_SIZE, timestamped_video_frames=False, **options)
