"""Tiny random-weight Qwen3-VL configs, checkpoints and batches, built in code (no downloads).

Variants:

- ``"vision"``: text hidden 64, 3 layers, head_dim 16 (mrope_section [4, 2, 2], interleaved),
  a 2-block ViT (patch 16, 16 learned position embeddings = a 4 x 4 grid) with DeepStack
  taps [0, 1] (added after LLM layers 0 and 1).
- ``"deepstack"``: 5 LLM layers and a 4-block ViT with three DeepStack taps in a
  non-monotonic order [3, 0, 2], so tap order, vision-layer index and LLM layer all differ.
- ``"text"``: the smallest model (1-block ViT, one tap) for I/O tests.

Special token ids sit at the top of the vocabulary so random text never collides with them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caspo_jax.tiny.models import MultimodalBatch

VOCAB = 512
IMAGE_TOKEN_ID = VOCAB - 4
VIDEO_TOKEN_ID = VOCAB - 3
VISION_START_TOKEN_ID = VOCAB - 2
VISION_END_TOKEN_ID = VOCAB - 1
PATCH_SIZE = 16
MERGE = 2
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
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_start_token_id": VISION_START_TOKEN_ID,
        "vision_end_token_id": VISION_END_TOKEN_ID,
        "tie_word_embeddings": tie_word_embeddings,
    }


def hf_model(variant: str = "vision", *, seed: int = 0, attn_implementation: str = "eager", **kwargs):
    """A float32 ``transformers.Qwen3VLForConditionalGeneration`` with random weights (eval mode).

    Weights are redrawn (norm scales near 1, everything else N(0, 0.05)) so every parameter,
    biases and the learned position embeddings included, matters.
    """
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(**hf_config_dict(variant, **kwargs))
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval().float()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith("pos_embed.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
        if config.tie_word_embeddings:
            model.tie_weights()
    model.config._attn_implementation = attn_implementation
    return model


def save_hf_checkpoint(out_dir: str | Path, variant: str = "vision", *, seed: int = 0, **kwargs) -> Path:
    """Write a tiny checkpoint with transformers' own ``save_pretrained``; returns the directory."""
    out_dir = Path(out_dir)
    hf_model(variant, seed=seed, **kwargs).save_pretrained(out_dir)
    return out_dir


def image_tokens(grid_thw: tuple[int, int, int], token_id: int = IMAGE_TOKEN_ID) -> list[int]:
    """``<|vision_start|>`` + one placeholder per merged patch + ``<|vision_end|>``."""
    t, h, w = grid_thw
    return [VISION_START_TOKEN_ID] + [token_id] * (t * h * w // MERGE**2) + [VISION_END_TOKEN_ID]


def make_batch(samples: list[list], *, pad: str = "left", seed: int = 0, text_vocab: int = VOCAB - 8
               ) -> MultimodalBatch:
    """Build a padded batch. Each sample is a list of segments: an int n (n random text tokens),
    a (t, h, w) grid (one image with that patch grid; h and w even) or ("video", t, h, w): a video
    laid out as the Qwen3-VL processor does, each of its t frames preceded by two timestamp text
    tokens and wrapped in vision start/end."""
    rng = np.random.default_rng(seed)
    rows, grids, video_grids = [], [], []
    for segments in samples:
        ids: list[int] = []
        for seg in segments:
            if isinstance(seg, int):
                ids += rng.integers(0, text_vocab, seg).tolist()
            elif seg[0] == "video":
                t, h, w = seg[1:]
                video_grids.append((t, h, w))
                for _ in range(t):
                    ids += rng.integers(0, text_vocab, 2).tolist() + image_tokens((1, h, w), VIDEO_TOKEN_ID)
            else:
                grids.append(tuple(seg))
                ids += image_tokens(tuple(seg))
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, ids in enumerate(rows):
        sl = slice(length - len(ids), length) if pad == "left" else slice(0, len(ids))
        input_ids[b, sl] = ids
        mask[b, sl] = 1

    def pixels(gs):
        if not gs:
            return None, None
        n_patches = sum(t * h * w for t, h, w in gs)
        return rng.standard_normal((n_patches, PATCH_DIM)).astype(np.float32), np.asarray(gs, np.int64)

    return MultimodalBatch(input_ids, mask, *pixels(grids), *pixels(video_grids))
