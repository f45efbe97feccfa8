"""Tiny random-weight Qwen2.5-VL configs and checkpoints, built in code (no downloads).

Every later test builds its models here. Variants:

- ``"text"``: a text-only-sized model (the vision tower is still present, as in every
  Qwen2.5-VL checkpoint, but minimal).
- ``"vision"``: text hidden 64 (head_dim 16, mrope_section [2, 3, 3]) with a 2-block ViT
  (window_size 56, fullatt_block_indexes [1]) so window and full attention both run.
- ``"vllm"``: head_dim 32 (hidden 128, 4 heads, 2 kv heads, mrope_section [4, 6, 6]),
  the smallest shape vLLM's kernels load.

Special token ids sit at the top of the vocabulary so random text never collides with them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

VOCAB = 512
IMAGE_TOKEN_ID = VOCAB - 4
VIDEO_TOKEN_ID = VOCAB - 3
VISION_START_TOKEN_ID = VOCAB - 2
VISION_END_TOKEN_ID = VOCAB - 1
PATCH_SIZE = 14
MERGE = 2


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
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_start_token_id": VISION_START_TOKEN_ID,
        "vision_end_token_id": VISION_END_TOKEN_ID,
        "tie_word_embeddings": tie_word_embeddings,
    }


def hf_model(variant: str = "vision", *, seed: int = 0, attn_implementation: str = "eager", **kwargs):
    """A float32 ``transformers.Qwen2_5_VLForConditionalGeneration`` with random weights (eval mode).

    Weights are redrawn from N(0, 0.05) (norms and biases too) so every parameter matters.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(**hf_config_dict(variant, **kwargs))
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval().float()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
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


@dataclasses.dataclass
class MultimodalBatch:
    """Inputs in the HF processor's layout (NumPy): ``pixel_values`` [patches, 3*2*14*14]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray | None
    image_grid_thw: np.ndarray | None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None

    @property
    def mm_token_type_ids(self) -> np.ndarray:
        """0 text, 1 image, 2 video (what the HF processor returns and the reference needs)."""
        return np.where(self.input_ids == IMAGE_TOKEN_ID, 1, np.where(self.input_ids == VIDEO_TOKEN_ID, 2, 0))


def image_tokens(grid_thw: tuple[int, int, int]) -> list[int]:
    """``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch + ``<|vision_end|>``."""
    t, h, w = grid_thw
    return [VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * (t * h * w // MERGE**2) + [VISION_END_TOKEN_ID]


def make_batch(samples: list[list], *, pad: str = "left", seed: int = 0, text_vocab: int = VOCAB - 8
               ) -> MultimodalBatch:
    """Build a padded batch. Each sample is a list of segments: an int n (n random text tokens),
    a (t, h, w) grid (one image with that patch grid; h and w even) or ("video", t, h, w)."""
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
                ids += [VISION_START_TOKEN_ID] + [VIDEO_TOKEN_ID] * (t * h * w // MERGE**2) + [VISION_END_TOKEN_ID]
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
    patch_dim = 3 * 2 * PATCH_SIZE * PATCH_SIZE

    def pixels(gs):
        if not gs:
            return None, None
        n_patches = sum(t * h * w for t, h, w in gs)
        return rng.standard_normal((n_patches, patch_dim)).astype(np.float32), np.asarray(gs, np.int64)

    return MultimodalBatch(input_ids, mask, *pixels(grids), *pixels(video_grids))
