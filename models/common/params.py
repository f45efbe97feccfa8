"""Parameter-table pieces every Qwen-VL family shares: the text decoder's rows, random
initialisation (each row names its initializer), and HF name aliasing.

The text rows follow the decoder switches (``common.config.TextSwitches``): q/k/v biases
when ``qkv_bias``, the o bias when ``o_bias``, per-head q/k norms when ``qk_norm``. Our
paths are the same in every family (``("text", "layers", "q_kernel")``...); only the HF
name prefix differs. Linear kernels are stored [out, in], HF's own layout, so loading,
saving and the vLLM bridge hand tensors over as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from caspo_jax.models.common import weights
from caspo_jax.models.common.checkpoint import INITIALIZERS, ParamSpec


def stacked_rows(hf_prefix: str, path_prefix: tuple[str, ...], n: int):
    """A row maker for a stack of ``n`` identical layers: ``row(hf, name, shape, axes, init)`` is
    the ParamSpec of HF ``{hf_prefix}.{i}.{hf}`` at our path ``(*path_prefix, name)``, stacked
    [n, *shape] on the ``layers`` axis."""
    def row(hf: str, name: str, shape: tuple, axes: tuple, init: str = "normal") -> ParamSpec:
        return ParamSpec(f"{hf_prefix}.{{i}}.{hf}", (*path_prefix, name), (n, *shape), ("layers", *axes),
                         num_layers=n, init=init)

    return row


def linear_rows(row, hf_module: str, name: str, kernel_shape: tuple, axes: tuple, bias: bool = True) -> list:
    """A linear layer's rows: HF ``{hf_module}.weight`` as our ``{name}_kernel`` [out, in] and,
    when ``bias``, ``{hf_module}.bias`` as ``{name}_bias`` [out] (``row``: a ``stacked_rows`` maker)."""
    rows = [row(f"{hf_module}.weight", f"{name}_kernel", kernel_shape, axes)]
    if bias:
        rows.append(row(f"{hf_module}.bias", f"{name}_bias", kernel_shape[:1], axes[:1]))
    return rows


def vit_attention_rows(block, E: int) -> list[ParamSpec]:
    """The ViT attention's rows, the same in every family: the fused qkv projection and the
    output projection, both biased (``block``: a ``stacked_rows`` maker over the blocks, E the ViT width)."""
    return [*linear_rows(block, "attn.qkv", "qkv", (3 * E, E), ("vision_qkv", "vision_embed")),
            *linear_rows(block, "attn.proj", "proj", (E, E), ("vision_embed", "vision_heads"))]


def text_param_table(cfg, prefix: str) -> list[ParamSpec]:
    """The text decoder's rows for a family config ``cfg``, ``lm_head`` last (absent when
    embeddings are tied); HF names start with ``prefix`` (e.g. ``"model."``)."""
    t = cfg.text
    D, F, V, Lt, H = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_hidden_layers, t.head_dim
    NH, KH = t.num_attention_heads * H, t.num_key_value_heads * H

    layer = stacked_rows(f"{prefix}layers", ("text", "layers"), Lt)

    def projection(name, kernel_shape, axes, bias: bool):
        return linear_rows(layer, f"self_attn.{name}_proj", name, kernel_shape, axes, bias)

    table = [
        ParamSpec(f"{prefix}embed_tokens.weight", ("text", "embed"), (V, D), ("vocab", "embed")),
        layer("input_layernorm.weight", "attn_norm", (D,), ("embed",), "ones"),
        *projection("q", (NH, D), ("heads", "embed"), t.qkv_bias),
        *projection("k", (KH, D), ("kv", "embed"), t.qkv_bias),
        *projection("v", (KH, D), ("kv", "embed"), t.qkv_bias),
        *projection("o", (D, NH), ("embed", "heads"), t.o_bias),
    ]
    if t.qk_norm:
        table += [layer("self_attn.q_norm.weight", "q_norm", (H,), (None,), "ones"),
                  layer("self_attn.k_norm.weight", "k_norm", (H,), (None,), "ones")]
    table += [
        layer("post_attention_layernorm.weight", "mlp_norm", (D,), ("embed",), "ones"),
        layer("mlp.gate_proj.weight", "gate_kernel", (F, D), ("mlp", "embed")),
        layer("mlp.up_proj.weight", "up_kernel", (F, D), ("mlp", "embed")),
        layer("mlp.down_proj.weight", "down_kernel", (D, F), ("embed", "mlp")),
        ParamSpec(f"{prefix}norm.weight", ("text", "norm"), (D,), ("embed",), init="ones"),
    ]
    if not cfg.tie_word_embeddings:
        table.append(ParamSpec("lm_head.weight", ("text", "lm_head"), (V, D), ("vocab", "embed")))
    return table


def init_params(table: list[ParamSpec], key: jax.Array, dtype=jnp.float32, scale: float = 0.02):
    """Random typed weights with the table's shapes, each row drawn by its ``init``
    (``INITIALIZERS``: norm scales 1, the rest N(0, scale)), one key per row in table order
    (rows that need none still take theirs, so a row's key never depends on the others'
    initializers), for tests and benchmarks."""
    keys = iter(jax.random.split(key, len(table)))
    return weights.build(table, lambda spec: INITIALIZERS[spec.init](next(keys), spec.shape, dtype, scale))


def rename(name: str, aliases) -> str:
    """``name`` with the first matching (pattern, replacement) of ``aliases`` applied once."""
    for pattern, replacement in aliases:
        name, n = pattern.subn(replacement, name)
        if n:
            return name
    return name
