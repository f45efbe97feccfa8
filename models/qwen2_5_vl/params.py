"""The one table mapping Qwen2.5-VL parameters to HF checkpoint names, layouts and axes.

Our typed weights (``models.common.weights``, generated from this table)::

    params.text: embed [V, D], layers.* (stacked [layers, ...]), norm [D], lm_head [V, D]
    params.vision: patch_embed [E, C*T*P*P], blocks.* (stacked [depth, ...]), merger.*

Linear kernels are stored [out, in], HF's own layout, so loading, saving and the
vLLM bridge hand tensors over as they are (no transposes; see BUILD_NOTES). ``lm_head`` is absent when
embeddings are tied. Names follow the layout transformers writes (``model.layers.*``,
``visual.*``); ``canonical_hf_name`` also accepts ``model.language_model.*`` /
``model.visual.*``.
"""

from __future__ import annotations

import re

from caspo_jax.models.common.checkpoint import ParamSpec
from caspo_jax.models.common.params import (linear_rows, rename, stacked_rows, text_param_table,
                                            vit_attention_rows)

from .config import Qwen2_5_VLConfig


def param_table(cfg: Qwen2_5_VLConfig) -> list[ParamSpec]:
    v = cfg.vision
    E, Fv, Lv, O = v.hidden_size, v.intermediate_size, v.depth, v.out_hidden_size
    U = E * v.spatial_merge_size**2

    block = stacked_rows("visual.blocks", ("vision", "blocks"), Lv)

    table = text_param_table(cfg, "model.")
    table += [
        ParamSpec("visual.patch_embed.proj.weight", ("vision", "patch_embed"), (E, v.patch_dim),
                  ("vision_embed", "patch"), "flatten_in",
                  hf_shape=(E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)),
        block("norm1.weight", "attn_norm", (E,), ("vision_embed",), "ones"),
        *vit_attention_rows(block, E),
        block("norm2.weight", "mlp_norm", (E,), ("vision_embed",), "ones"),
        *linear_rows(block, "mlp.gate_proj", "gate", (Fv, E), ("vision_mlp", "vision_embed")),
        *linear_rows(block, "mlp.up_proj", "up", (Fv, E), ("vision_mlp", "vision_embed")),
        *linear_rows(block, "mlp.down_proj", "down", (E, Fv), ("vision_embed", "vision_mlp")),
        ParamSpec("visual.merger.ln_q.weight", ("vision", "merger", "norm"), (E,), ("vision_embed",), init="ones"),
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

