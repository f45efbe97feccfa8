"""The one table mapping Qwen2.5-VL parameters to HF checkpoint names, layouts and axes.

Our pytree::

    {"text": {"embed": [V, D], "layers": {... stacked [layers, ...]}, "norm": [D], "lm_head": [V, D]},
     "vision": {"patch_embed": [E, C*T*P*P], "blocks": {... stacked [depth, ...]},
                "merger": {...}}}

Linear kernels are stored [out, in], HF's own layout, so loading, saving and the
vLLM bridge hand tensors over as they are (no transposes; see BUILD_NOTES). ``lm_head`` is absent when
embeddings are tied. Names follow the layout transformers writes (``model.layers.*``,
``visual.*``); ``canonical_hf_name`` also accepts ``model.language_model.*`` /
``model.visual.*``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from caspo_jax.models.common import params as common_params
from caspo_jax.models.common.checkpoint import ParamSpec
from caspo_jax.models.common.params import rename, text_param_table

from .config import Qwen2_5_VLConfig


def param_table(cfg: Qwen2_5_VLConfig) -> list[ParamSpec]:
    v = cfg.vision
    E, Fv, Lv, O = v.hidden_size, v.intermediate_size, v.depth, v.out_hidden_size
    U = E * v.spatial_merge_size**2

    def block(hf, path, shape, axes):
        return ParamSpec(f"visual.blocks.{{i}}.{hf}", ("vision", "blocks", *path), (Lv, *shape),
                         ("layers", *axes), num_layers=Lv)

    table = text_param_table(cfg, "model.")
    table += [
        ParamSpec("visual.patch_embed.proj.weight", ("vision", "patch_embed"), (E, v.patch_dim),
                  ("vision_embed", "patch"), "flatten_in",
                  hf_shape=(E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)),
        block("norm1.weight", ("attn_norm",), (E,), ("vision_embed",)),
        block("attn.qkv.weight", ("qkv_kernel",), (3 * E, E), ("vision_qkv", "vision_embed")),
        block("attn.qkv.bias", ("qkv_bias",), (3 * E,), ("vision_qkv",)),
        block("attn.proj.weight", ("proj_kernel",), (E, E), ("vision_embed", "vision_heads")),
        block("attn.proj.bias", ("proj_bias",), (E,), ("vision_embed",)),
        block("norm2.weight", ("mlp_norm",), (E,), ("vision_embed",)),
        block("mlp.gate_proj.weight", ("gate_kernel",), (Fv, E), ("vision_mlp", "vision_embed")),
        block("mlp.gate_proj.bias", ("gate_bias",), (Fv,), ("vision_mlp",)),
        block("mlp.up_proj.weight", ("up_kernel",), (Fv, E), ("vision_mlp", "vision_embed")),
        block("mlp.up_proj.bias", ("up_bias",), (Fv,), ("vision_mlp",)),
        block("mlp.down_proj.weight", ("down_kernel",), (E, Fv), ("vision_embed", "vision_mlp")),
        block("mlp.down_proj.bias", ("down_bias",), (E,), ("vision_embed",)),
        ParamSpec("visual.merger.ln_q.weight", ("vision", "merger", "norm"), (E,), ("vision_embed",)),
        ParamSpec("visual.merger.mlp.0.weight", ("vision", "merger", "fc1_kernel"), (U, U),
                  ("vision_mlp", None)),
        ParamSpec("visual.merger.mlp.0.bias", ("vision", "merger", "fc1_bias"), (U,), ("vision_mlp",)),
        ParamSpec("visual.merger.mlp.2.weight", ("vision", "merger", "fc2_kernel"), (O, U),
                  ("embed", "vision_mlp")),
        ParamSpec("visual.merger.mlp.2.bias", ("vision", "merger", "fc2_bias"), (O,), ("embed",)),
    ]
    return table


_ALIASES = (
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^model\.visual\."), "visual."),
)


def canonical_hf_name(name: str) -> str:
    """Map the transformers-5 in-memory layout (``model.language_model.*``, ``model.visual.*``)
    to the saved layout the table uses (``model.*``, ``visual.*``)."""
    return rename(name, _ALIASES)


def init_params(cfg: Qwen2_5_VLConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random parameters with the table's shapes (norm weights 1, everything else N(0, scale))."""
    return common_params.init_params(param_table(cfg), key, dtype, scale)
