"""Parameter-table pieces every Qwen-VL family shares: the text decoder's rows, random
initialisation, and HF name aliasing.

The text rows follow the decoder switches (``common.config.TextSwitches``): q/k/v biases
when ``qkv_bias``, the o bias when ``o_bias``, per-head q/k norms when ``qk_norm``. Our
paths are the same in every family (``("text", "layers", "q_kernel")``...); only the HF
name prefix differs. Linear kernels are stored [out, in], HF's own layout, so loading,
saving and the vLLM bridge hand tensors over as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caspo_jax.models.common.checkpoint import ParamSpec, map_table

# Leaves initialised to one by ``init_params`` (norm scales); every other leaf is random.
UNIT_LEAVES = ("attn_norm", "mlp_norm", "norm", "q_norm", "k_norm", "norm_scale")


def text_param_table(cfg, prefix: str) -> list[ParamSpec]:
    """The text decoder's rows for a family config ``cfg``, ``lm_head`` last (absent when
    embeddings are tied); HF names start with ``prefix`` (e.g. ``"model."``)."""
    t = cfg.text
    D, F, V, Lt, H = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_hidden_layers, t.head_dim
    NH, KH = t.num_attention_heads * H, t.num_key_value_heads * H

    def layer(hf, name, shape, axes):
        return ParamSpec(f"{prefix}layers.{{i}}.{hf}", ("text", "layers", name), (Lt, *shape), ("layers", *axes),
                         num_layers=Lt)

    def projection(name, kernel_shape, axes, bias: bool):
        rows = [layer(f"self_attn.{name}_proj.weight", f"{name}_kernel", kernel_shape, axes)]
        if bias:
            rows.append(layer(f"self_attn.{name}_proj.bias", f"{name}_bias", kernel_shape[:1], axes[:1]))
        return rows

    table = [
        ParamSpec(f"{prefix}embed_tokens.weight", ("text", "embed"), (V, D), ("vocab", "embed")),
        layer("input_layernorm.weight", "attn_norm", (D,), ("embed",)),
        *projection("q", (NH, D), ("heads", "embed"), t.qkv_bias),
        *projection("k", (KH, D), ("kv", "embed"), t.qkv_bias),
        *projection("v", (KH, D), ("kv", "embed"), t.qkv_bias),
        *projection("o", (D, NH), ("embed", "heads"), t.o_bias),
    ]
    if t.qk_norm:
        table += [layer("self_attn.q_norm.weight", "q_norm", (H,), (None,)),
                  layer("self_attn.k_norm.weight", "k_norm", (H,), (None,))]
    table += [
        layer("post_attention_layernorm.weight", "mlp_norm", (D,), ("embed",)),
        layer("mlp.gate_proj.weight", "gate_kernel", (F, D), ("mlp", "embed")),
        layer("mlp.up_proj.weight", "up_kernel", (F, D), ("mlp", "embed")),
        layer("mlp.down_proj.weight", "down_kernel", (D, F), ("embed", "mlp")),
        ParamSpec(f"{prefix}norm.weight", ("text", "norm"), (D,), ("embed",)),
    ]
    if not cfg.tie_word_embeddings:
        table.append(ParamSpec("lm_head.weight", ("text", "lm_head"), (V, D), ("vocab", "embed")))
    return table


def init_params(table: list[ParamSpec], key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random parameters with the table's shapes (norm scales 1, every other leaf N(0, scale)),
    one key per row in table order, for tests and benchmarks."""
    keys = iter(jax.random.split(key, len(table)))

    def one(spec: ParamSpec):
        k = next(keys)
        if spec.path[-1] in UNIT_LEAVES:
            return jnp.ones(spec.shape, dtype)
        return (scale * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return map_table(table, one)


def rename(name: str, aliases) -> str:
    """``name`` with the first matching (pattern, replacement) of ``aliases`` applied once."""
    for pattern, replacement in aliases:
        name, n = pattern.subn(replacement, name)
        if n:
            return name
    return name
