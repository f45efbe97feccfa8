"""The one table mapping Qwen3-VL parameters to HF checkpoint names, layouts and axes.

Our typed weights (``models.common.weights``, generated from this table)::

    params.text: embed [V, D], layers.* (stacked [layers, ...]), norm [D], lm_head [V, D]
    params.vision: patch_embed [E, C*T*P*P], patch_bias [E], pos_embed [G*G, E],
        blocks.* (stacked [depth, ...]), merger.*, deepstack.* (the DeepStack mergers
        stacked [num_deepstack, ...])

Linear kernels are stored [out, in], HF's own layout, so loading, saving and the
vLLM bridge hand tensors over as they are (no transposes; see BUILD_NOTES). ``lm_head`` is absent when
embeddings are tied. Names follow the layout transformers writes for Qwen3-VL
(``model.language_model.*``, ``model.visual.*``, ``lm_head.*``).
"""

from __future__ import annotations

import re

from caspo_jax.models.common.checkpoint import ParamSpec
from caspo_jax.models.common.params import (linear_rows, rename, stacked_rows, text_param_table,
                                            vit_attention_rows)

from .config import Qwen3VLConfig

TEXT_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."


def param_table(cfg: Qwen3VLConfig) -> list[ParamSpec]:
    v = cfg.vision
    E, Fv, Lv, O = v.hidden_size, v.intermediate_size, v.depth, v.out_hidden_size
    U = E * v.spatial_merge_size**2
    Nd = cfg.num_deepstack

    block = stacked_rows(f"{VISION_PREFIX}blocks", ("vision", "blocks"), Lv)

    def merger(hf_prefix, path, norm_width, stacked):
        """A patch merger: LayerNorm (over E, or over the m*m*E concatenation for DeepStack),
        then fc1 [U, U], exact GELU, fc2 [U, O]."""
        lead = (Nd,) if stacked else ()
        lead_axes = ("layers",) if stacked else ()
        name = (lambda s: f"{hf_prefix}.{{i}}.{s}") if stacked else (lambda s: f"{hf_prefix}.{s}")
        n = Nd if stacked else None
        rows = [
            ("norm.weight", "norm_scale", (norm_width,), ("vision_embed" if not stacked else None,), "ones"),
            ("norm.bias", "norm_bias", (norm_width,), ("vision_embed" if not stacked else None,), "normal"),
            ("linear_fc1.weight", "fc1_kernel", (U, U), ("vision_mlp", None), "normal"),
            ("linear_fc1.bias", "fc1_bias", (U,), ("vision_mlp",), "normal"),
            ("linear_fc2.weight", "fc2_kernel", (O, U), ("embed", "vision_mlp"), "normal"),
            ("linear_fc2.bias", "fc2_bias", (O,), ("embed",), "normal"),
        ]
        return [ParamSpec(name(hf), ("vision", path, ours), (*lead, *shape), (*lead_axes, *axes), num_layers=n,
                          init=init)
                for hf, ours, shape, axes, init in rows]

    table = text_param_table(cfg, TEXT_PREFIX)
    table += [
        ParamSpec(f"{VISION_PREFIX}patch_embed.proj.weight", ("vision", "patch_embed"), (E, v.patch_dim),
                  ("vision_embed", "patch"), "flatten_in",
                  hf_shape=(E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)),
        ParamSpec(f"{VISION_PREFIX}patch_embed.proj.bias", ("vision", "patch_bias"), (E,), ("vision_embed",)),
        ParamSpec(f"{VISION_PREFIX}pos_embed.weight", ("vision", "pos_embed"), (v.num_position_embeddings, E),
                  (None, "vision_embed")),
        block("norm1.weight", "attn_norm", (E,), ("vision_embed",), "ones"),
        block("norm1.bias", "attn_norm_bias", (E,), ("vision_embed",)),
        *vit_attention_rows(block, E),
        block("norm2.weight", "mlp_norm", (E,), ("vision_embed",), "ones"),
        block("norm2.bias", "mlp_norm_bias", (E,), ("vision_embed",)),
        *linear_rows(block, "mlp.linear_fc1", "fc1", (Fv, E), ("vision_mlp", "vision_embed")),
        *linear_rows(block, "mlp.linear_fc2", "fc2", (E, Fv), ("vision_embed", "vision_mlp")),
        *merger(f"{VISION_PREFIX}merger", "merger", E, stacked=False),
    ]
    if Nd:
        table += merger(f"{VISION_PREFIX}deepstack_merger_list", "deepstack", U, stacked=True)
    return table


_ALIASES = (
    (re.compile(r"^model\.(?!language_model\.|visual\.)"), TEXT_PREFIX),
    (re.compile(r"^visual\."), VISION_PREFIX),
)


def canonical_hf_name(name: str) -> str:
    """Map the older flat layout (``model.layers.*``, ``visual.*``) to the transformers-5 layout
    (``model.language_model.*``, ``model.visual.*``) the table uses; other names are unchanged."""
    return rename(name, _ALIASES)

