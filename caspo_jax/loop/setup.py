"""Building the policy, its processor and its eos ids from a ModelConfig (its dtype,
remat and attention implementation set on the model every forward uses).

model.path = None gives the built-in tiny Qwen2.5-VL (random weights) whose config
matches the tiny offline tokenizer's ids (`tokenizer_info`), so the demo and the tests
run offline on a CPU. Otherwise the HF directory is loaded with `load_pretrained` and
its own tokenizer and image processor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from caspo_jax.hf_checkpoint import load_hf_checkpoint, stop_token_ids
from caspo_jax.loop.config import TINY_SIZES, ConfigError, DataConfig, ModelConfig
from caspo_jax.models import load_pretrained
from caspo_jax.models.common.checkpoint import refuse_custom_code
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from caspo_jax.tiny.tokenizer import build_tiny_processor, build_tiny_tokenizer, tokenizer_info

__all__ = ["Policy", "build_policy", "load_teacher_params", "tiny_hf_config"]


@dataclasses.dataclass
class Policy:
    """A model description, its parameters, its processor and the ids that end a response."""

    model: object
    params: object  # typed weights (caspo_jax.models.common.weights), the model's table
    processor: object
    eos_ids: tuple[int, ...]
    pad_id: int


def tiny_hf_config(size: str, info) -> dict:
    """A transformers-5 Qwen2.5-VL config dict of a TINY_SIZES entry, using `info`'s token ids."""
    s = TINY_SIZES[size]
    head_dim = s["hidden"] // s["heads"]
    quarter = head_dim // 2
    section = [quarter - 2 * (quarter * 3 // 8), quarter * 3 // 8, quarter * 3 // 8]  # 16 -> [2, 3, 3]
    return {
        "model_type": "qwen2_5_vl",
        "text_config": dict(
            vocab_size=info.vocab_size, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
            hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=4096, bos_token_id=None,
            eos_token_id=info.im_end_id, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}),
        "vision_config": dict(
            depth=s["vision_depth"], hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
            num_heads=2, fullatt_block_indexes=[s["vision_depth"] - 1], hidden_act="silu", in_channels=3,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, tokens_per_second=2,
            out_hidden_size=s["hidden"]),
        "image_token_id": info.image_token_id,
        "video_token_id": info.video_token_id,
        "vision_start_token_id": info.vision_start_token_id,
        "vision_end_token_id": info.vision_end_token_id,
        "tie_word_embeddings": False,
    }


def build_policy(model_cfg: ModelConfig, data_cfg: DataConfig) -> Policy:
    """The initial policy (tiny random model, or an HF checkpoint) and its processor."""
    dtype = jnp.bfloat16 if model_cfg.dtype == "bfloat16" else jnp.float32
    if model_cfg.path is None:
        tokenizer = build_tiny_tokenizer()
        info = tokenizer_info(tokenizer)
        processor = build_tiny_processor(tokenizer, min_pixels=data_cfg.image_min_pixels,
                                         max_pixels=data_cfg.image_max_pixels)
        config = Qwen2_5_VLConfig.from_dict(tiny_hf_config(model_cfg.tiny, info), source=f"tiny:{model_cfg.tiny}")
        model = Qwen2_5_VL(config, remat=model_cfg.remat, attn_implementation=model_cfg.attn_implementation)
        params = model.init(jax.random.PRNGKey(model_cfg.seed), dtype)
        return Policy(model, params, processor, (info.im_end_id, info.eos_token_id), info.pad_token_id)
    model, params, processor = load_hf_checkpoint(model_cfg.path, dtype=dtype, remat=model_cfg.remat,
                                                  min_pixels=data_cfg.image_min_pixels,
                                                  max_pixels=data_cfg.image_max_pixels,
                                                  ignore_custom_code=model_cfg.ignore_custom_code)
    model = dataclasses.replace(model, attn_implementation=model_cfg.attn_implementation)
    return Policy(model, params, processor, stop_token_ids(processor.tokenizer), processor.tokenizer.pad_token_id)


def load_teacher_params(model_cfg: ModelConfig, model):
    """The parameters at model.teacher_path (algo.teacher='original'), checked to fit `model`:
    the same parameter names and shapes, else a ConfigError naming the first difference."""
    path = Path(model_cfg.teacher_path)
    if not (path / "config.json").exists():
        raise ConfigError(f"model.teacher_path={str(path)!r}: no config.json there; point it at the original "
                          "(pre-SFT) model's HF directory")
    if not model_cfg.ignore_custom_code:
        refuse_custom_code(path)
    dtype = jnp.bfloat16 if model_cfg.dtype == "bfloat16" else jnp.float32
    teacher, params = load_pretrained(path, dtype=dtype)
    want = {tuple(s.path): tuple(s.shape) for s in model.param_table()}
    got = {tuple(s.path): tuple(s.shape) for s in teacher.param_table()}
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            raise ConfigError(
                f"model.teacher_path={str(path)!r}: its architecture differs from the policy's at "
                f"{'/'.join(map(str, name))} (teacher {got.get(name)}, policy {want.get(name)}); the teacher must be "
                "the same model family and size (the original checkpoint the policy was fine-tuned from)")
    return params
