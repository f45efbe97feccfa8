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

from caspo_jax.models.common.checkpoint import ParamSpec, map_table

from .config import Qwen2_5_VLConfig


def param_table(cfg: Qwen2_5_VLConfig) -> list[ParamSpec]:
    t, v = cfg.text, cfg.vision
    D, F, V, Lt = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_hidden_layers
    NH, KH = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    E, Fv, Lv, O = v.hidden_size, v.intermediate_size, v.depth, v.out_hidden_size
    U = E * v.spatial_merge_size**2

    def layer(hf, path, shape, axes):
        return ParamSpec(f"model.layers.{{i}}.{hf}", ("text", "layers", *path), (Lt, *shape),
                         ("layers", *axes), num_layers=Lt)

    def block(hf, path, shape, axes):
        return ParamSpec(f"visual.blocks.{{i}}.{hf}", ("vision", "blocks", *path), (Lv, *shape),
                         ("layers", *axes), num_layers=Lv)

    table = [
        ParamSpec("model.embed_tokens.weight", ("text", "embed"), (V, D), ("vocab", "embed")),
        layer("input_layernorm.weight", ("attn_norm",), (D,), ("embed",)),
        layer("self_attn.q_proj.weight", ("q_kernel",), (NH, D), ("heads", "embed")),
        layer("self_attn.q_proj.bias", ("q_bias",), (NH,), ("heads",)),
        layer("self_attn.k_proj.weight", ("k_kernel",), (KH, D), ("kv", "embed")),
        layer("self_attn.k_proj.bias", ("k_bias",), (KH,), ("kv",)),
        layer("self_attn.v_proj.weight", ("v_kernel",), (KH, D), ("kv", "embed")),
        layer("self_attn.v_proj.bias", ("v_bias",), (KH,), ("kv",)),
        layer("self_attn.o_proj.weight", ("o_kernel",), (D, NH), ("embed", "heads")),
        layer("post_attention_layernorm.weight", ("mlp_norm",), (D,), ("embed",)),
        layer("mlp.gate_proj.weight", ("gate_kernel",), (F, D), ("mlp", "embed")),
        layer("mlp.up_proj.weight", ("up_kernel",), (F, D), ("mlp", "embed")),
        layer("mlp.down_proj.weight", ("down_kernel",), (D, F), ("embed", "mlp")),
        ParamSpec("model.norm.weight", ("text", "norm"), (D,), ("embed",)),
    ]
    if not cfg.tie_word_embeddings:
        table.append(ParamSpec("lm_head.weight", ("text", "lm_head"), (V, D), ("vocab", "embed")))
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
    for pattern, replacement in _ALIASES:
        name, n = pattern.subn(replacement, name)
        if n:
            return name
    return name


def init_params(cfg: Qwen2_5_VLConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random parameters with the table's shapes (norm weights 1, biases small) for tests/benchmarks."""
    table = param_table(cfg)
    keys = iter(jax.random.split(key, len(table)))

    def one(spec: ParamSpec):
        k = next(keys)
        if spec.path[-1] in ("attn_norm", "mlp_norm", "norm"):
            return jnp.ones(spec.shape, dtype)
        return (scale * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return map_table(table, one)
