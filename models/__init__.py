"""Functional Flax ports of Qwen-VL models (imported as ``caspo_jax.models``): pure functions
over ``flax.struct`` weight trees generated from one parameter table per family
(``common.weights``; ``params.text.layers.q_kernel``).

    from caspo_jax.models import load_pretrained, save_pretrained
    model, params = load_pretrained(path, dtype=jnp.float32)      # dispatches on model_type
    logits = model.forward(params, input_ids=..., attention_mask=..., pixel_values=None, image_grid_thw=None)
    save_pretrained(model, params, out_dir)                        # transformers loads it unchanged
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp

from caspo_jax.models import qwen2_5_vl, qwen3_vl
from caspo_jax.models.common.checkpoint import CheckpointError, load_params, save_params
from caspo_jax.sharding import LogicalRules, param_shardings


# model_type -> (config class, model class, HF-name canonicaliser)
FAMILIES = {
    "qwen2_5_vl": (qwen2_5_vl.Qwen2_5_VLConfig, qwen2_5_vl.Qwen2_5_VL, qwen2_5_vl.canonical_hf_name),
    "qwen3_vl": (qwen3_vl.Qwen3VLConfig, qwen3_vl.Qwen3VL, qwen3_vl.canonical_hf_name),
}


def load_pretrained(path, dtype=jnp.float32, mesh=None, rules=None, attn_implementation="auto", remat=False,
                    progress=True):
    """(model, params) from an HF directory: ``config.json`` + safetensors (single or sharded).

    With ``mesh`` (see ``caspo_jax.sharding.make_mesh``), every tensor is placed straight onto
    the NamedSharding its logical axes map to under ``rules`` (default ``LogicalRules()``).
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: load_pretrained expects an HF model directory")
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise NotImplementedError(f"{config_file}: model_type={model_type!r} is not ported; known: {sorted(FAMILIES)}")
    config_cls, model_cls, rename = FAMILIES[model_type]
    model = model_cls(config_cls.from_dict(raw, source=str(config_file)), attn_implementation=attn_implementation,
                      remat=remat)
    table = model.param_table()
    shardings = None
    if mesh is not None:
        shardings = param_shardings(table, mesh, rules or LogicalRules())
    tied = model.config.tie_word_embeddings
    params = load_params(path, table, dtype=dtype, rename=rename, shardings=shardings, progress=progress,
                         ignore=lambda name: tied and name == "lm_head.weight")
    return model, params


def save_pretrained(model, params, out_dir, dtype=None) -> Path:
    """Write ``config.json`` and safetensors in the layout transformers writes and loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_params(params, model.param_table(), out_dir, dtype=dtype)
    config = model.config.to_dict()
    leaf = params.text.embed if dtype is None else jnp.zeros((), dtype)
    config["dtype"] = str(jnp.dtype(leaf.dtype))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


__all__ = ["CheckpointError", "load_pretrained", "save_pretrained"]
