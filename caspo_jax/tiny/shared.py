"""What the tiny Qwen-VL worlds of both families share: the special token ids, the batch
layout (``MultimodalBatch``, ``make_batch``) and the random-weight transformers reference.

Special token ids sit at the top of the vocabulary so random text never collides with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

VOCAB = 512
IMAGE_TOKEN_ID = VOCAB - 4
VIDEO_TOKEN_ID = VOCAB - 3
VISION_START_TOKEN_ID = VOCAB - 2
VISION_END_TOKEN_ID = VOCAB - 1
MERGE = 2
# The special-token fields of a tiny HF config.json (both families).
SPECIAL_TOKEN_FIELDS = {"image_token_id": IMAGE_TOKEN_ID, "video_token_id": VIDEO_TOKEN_ID,
                        "vision_start_token_id": VISION_START_TOKEN_ID, "vision_end_token_id": VISION_END_TOKEN_ID}


@dataclasses.dataclass
class MultimodalBatch:
    """Inputs in the HF processor's layout (NumPy): ``pixel_values`` [patches, 3*2*P*P]."""

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


def image_tokens(grid_thw: tuple[int, int, int], token_id: int = IMAGE_TOKEN_ID) -> list[int]:
    """``<|vision_start|>`` + one placeholder per merged patch + ``<|vision_end|>``."""
    t, h, w = grid_thw
    return [VISION_START_TOKEN_ID] + [token_id] * (t * h * w // MERGE**2) + [VISION_END_TOKEN_ID]


def make_batch(samples: list[list], *, patch_size: int, timestamped_video_frames: bool, pad: str = "left",
               seed: int = 0, text_vocab: int = VOCAB - 8) -> MultimodalBatch:
    """A padded batch. Each sample is a list of segments: an int n (n random text tokens), a
    (t, h, w) grid (one image with that patch grid; h and w even) or ("video", t, h, w).

    A video is one placeholder run (Qwen2.5-VL) or, with ``timestamped_video_frames``
    (Qwen3-VL's processor), t frames, each preceded by two timestamp text tokens and
    wrapped in vision start/end."""
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
                if timestamped_video_frames:
                    for _ in range(t):
                        ids += rng.integers(0, text_vocab, 2).tolist() + image_tokens((1, h, w), VIDEO_TOKEN_ID)
                else:
                    ids += image_tokens((t, h, w), VIDEO_TOKEN_ID)
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
    patch_dim = 3 * 2 * patch_size * patch_size

    def pixels(gs):
        if not gs:
            return None, None
        n_patches = sum(t * h * w for t, h, w in gs)
        return rng.standard_normal((n_patches, patch_dim)).astype(np.float32), np.asarray(gs, np.int64)

    return MultimodalBatch(input_ids, mask, *pixels(grids), *pixels(video_grids))


def random_hf_model(family: str, config_dict: dict, *, seed: int, attn_implementation: str,
                    scale_of: Callable[[str], tuple[float, float]]):
    """A float32 ``transformers.{family}ForConditionalGeneration`` (eval mode; ``family``
    "Qwen2_5_VL" or "Qwen3VL") whose every weight is redrawn as ``offset + scale * N(0, 1)``
    with ``(offset, scale) = scale_of(parameter name)``, so every parameter (biases and norms
    included) matters to a parity test. PyTorch is the reference's optional dependency."""
    import torch
    import transformers

    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForConditionalGeneration")
    config = config_cls(**config_dict)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config).eval().float()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            offset, scale = scale_of(name)
            p.copy_(offset + scale * torch.randn(p.shape, generator=generator))
        if config.tie_word_embeddings:
            model.tie_weights()
    model.config._attn_implementation = attn_implementation
    return model
