"""An HF checkpoint directory as every entry point loads it: model, parameters and processor.

The trainer, the reward model, `caspo rm` and the evaluation's local engines all read the
same directories (released checkpoints or our own exports), so they read them one way:
the same loader, the same processor settings and the same fallback chat template (a
directory whose tokenizer carries none gets Qwen2-VL's); and every export writes one
the same way (`save_hf_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from caspo_jax.data.processor import load_processor
from caspo_jax.models import load_pretrained, save_pretrained
from caspo_jax.models.common.checkpoint import refuse_custom_code
from caspo_jax.tiny.tokenizer import QWEN2_VL_CHAT_TEMPLATE, save_tiny_processor


def load_hf_checkpoint(path: str | Path, *, dtype=jnp.float32, remat: bool | str = False,
                       min_pixels: int | None = None, max_pixels: int | None = None,
                       ignore_custom_code: bool = False, progress: bool = True):
    """(model, params, processor) from an HF directory (config.json, safetensors, tokenizer,
    preprocessor_config.json); min/max_pixels override the image processor's (they set the
    number of image tokens, so the trainer and the rollout engines must agree on them).

    A directory that declares its own code (``auto_map``, ``trust_remote_code``) is refused
    with an UntrustedCheckpointError (a UserError: exit 2) unless ``ignore_custom_code``
    (``--ignore-custom-code``); either way its code is never run, only its weights read.
    Pickle weights are always refused (CheckpointError). ``progress``: the loader's bar."""
    if not ignore_custom_code:
        refuse_custom_code(path)

    model, params = load_pretrained(path, dtype=dtype, remat=remat, progress=progress)
    processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels,
                               default_chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return model, params, processor


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end a reply: ``<|im_end|>`` (the chat turn's end) and the tokenizer's eos."""
    ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    return tuple(sorted(i for i in ids if isinstance(i, int) and i >= 0))


def save_hf_checkpoint(model, params, processor, out_dir: str | Path) -> Path:
    """An HF checkpoint directory (config.json, safetensors, tokenizer, preprocessor config,
    chat template) that `load_hf_checkpoint`, transformers'
    Qwen2_5_VLForConditionalGeneration and vLLM load."""
    out_dir = Path(out_dir)
    save_pretrained(model, params, out_dir)
    save_tiny_processor(processor, out_dir)
    return out_dir
