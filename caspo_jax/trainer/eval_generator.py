"""The JAX sampler behind `caspo eval`'s Generator protocol (for `--engine jax`).

`JaxGenerator(checkpoint_dir)` loads an HF directory (e.g. the `export/` of a caspo
run: weights, tokenizer, preprocessor config, chat template) and answers
`generate(prompts, n, sampling) -> list[Generation]` like `evals.generators`'
OpenAIGenerator: system message, images and text through the checkpoint's chat
template and image processor, then n samples per prompt from the JAX sampler.
`caspo_jax.evals.generators.local_generator("jax", checkpoint)` can return it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from caspo_jax.data.images import load_image, resize_image
from caspo_jax.data.pipeline import processor_resize_settings
from caspo_jax.data.prompts import expand_image_tokens, image_token_counts
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams

__all__ = ["JaxGenerator"]


class JaxGenerator:
    def __init__(self, checkpoint: str, *, image_min_pixels: int = 56 * 56, image_max_pixels: int = 28 * 28 * 1280,
                 seed: int = 0, batch_size: int = 16):
        from caspo_jax.trainer.config import DataConfig, ModelConfig
        from caspo_jax.trainer.setup import build_policy

        data = DataConfig(image_min_pixels=image_min_pixels, image_max_pixels=image_max_pixels)
        self.policy = build_policy(ModelConfig(path=str(checkpoint)), data)
        self.sampler = JaxSampler(self.policy.model, self.policy.params, eos_token_ids=self.policy.eos_ids)
        self.name = f"jax:{checkpoint}"
        self.seed = seed
        self.batch_size = batch_size

    def _encode(self, prompt) -> RolloutPrompt:
        processor = self.policy.processor
        messages = []
        if prompt.system:
            messages.append({"role": "system", "content": prompt.system})
        content = [{"type": "image"} for _ in prompt.images] + [{"type": "text", "text": prompt.text}]
        messages.append({"role": "user", "content": content})
        text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pixel_values = grid = None
        images = ()
        if prompt.images:
            factor, lo, hi = processor_resize_settings(processor)
            images = tuple(resize_image(load_image(p), factor, lo, hi) for p in prompt.images)
            vision = processor.image_processor(images=list(images), return_tensors="np")
            pixel_values = np.asarray(vision["pixel_values"], np.float32)
            grid = np.asarray(vision["image_grid_thw"]).reshape(-1, 3)
            text = expand_image_tokens(text, image_token_counts(grid, processor.image_processor.merge_size))
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return RolloutPrompt(np.asarray(ids), pixel_values, grid, images)

    def generate(self, prompts: Sequence, n: int, sampling) -> list:
        from caspo_jax.evals.generators import Generation

        params = SamplingParams(temperature=float(sampling.temperature), max_new_tokens=int(sampling.max_new_tokens),
                                seed=self.seed)
        tokenizer = self.policy.processor.tokenizer
        out = []
        for lo in range(0, len(prompts), self.batch_size):
            chunk = [self._encode(p) for p in prompts[lo:lo + self.batch_size]]
            rollouts = self.sampler.generate(chunk, n=n, sampling=params)
            for p, encoded in enumerate(chunk):
                rows = range(p * n, (p + 1) * n)
                texts = [tokenizer.decode(rollouts.response(s), skip_special_tokens=True) for s in rows]
                out.append(Generation(texts=texts, errors=[None] * n, prompt_tokens=len(encoded.token_ids),
                                      completion_tokens=int(sum(rollouts.lengths[s] for s in rows))))
        return out
