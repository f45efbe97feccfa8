"""Typed weights generated from the parameter table: classes, initializers, misspellings, bytes on disk."""

import hashlib
import pickle

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from caspo_jax.models.common import weights
from caspo_jax.models.common.checkpoint import SINGLE_FILE, ParamSpec, save_params
from caspo_jax.models.common.params import init_params
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from caspo_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
from caspo_jax.tiny import models as tm
from caspo_jax.tiny import qwen3_vl as tq

# The initialisation rule before the table carried initializers (frozen copy): norm scales
# named here were ones, every other leaf N(0, scale), one key per row in table order, into
# nested dicts keyed by the path.
OLD_UNIT_LEAVES = ("attn_norm", "mlp_norm", "norm", "q_norm", "k_norm", "norm_scale")


def old_init_params(table, key, dtype=jnp.float32, scale=0.02) -> dict:
    keys = iter(jax.random.split(key, len(table)))
    out: dict = {}
    for spec in table:
        k = next(keys)
        if spec.path[-1] in OLD_UNIT_LEAVES:
            leaf = jnp.ones(spec.shape, dtype)
        else:
            leaf = (scale * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)
        node = out
        for name in spec.path[:-1]:
            node = node.setdefault(name, {})
        node[spec.path[-1]] = leaf
    return out


MODELS = {
    "qwen2_5_vl": lambda **kw: Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("vision", **kw))),
    "qwen3_vl": lambda **kw: Qwen3VL(Qwen3VLConfig.from_dict(tq.hf_config_dict("vision", **kw))),
    "qwen3_vl_bias_tied": lambda **kw: Qwen3VL(Qwen3VLConfig.from_dict(
        tq.hf_config_dict("vision", attention_bias=True, tie_word_embeddings=True, **kw))),
}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_init_is_bit_identical_to_the_rule_by_leaf_name(family):
    """Same key, same split, one key per row: every leaf equals the old rule's, bit for bit,
    and the leaves flatten in the old nested dicts' order (so tree reductions sum alike)."""
    table = MODELS[family]().param_table()
    key = jax.random.PRNGKey(7)
    new = jax.jit(lambda k: init_params(table, k, jnp.bfloat16))(key)
    old = jax.jit(lambda k: old_init_params(table, k, jnp.bfloat16))(key)
    assert {spec.init for spec in table} == {"normal", "ones"}
    new_leaves, old_leaves = jax.tree.leaves(new), jax.tree.leaves(old)
    assert len(new_leaves) == len(old_leaves) == len(table)
    for a, b in zip(new_leaves, old_leaves):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
    assert jax.tree.structure(flax.serialization.to_state_dict(new)) == jax.tree.structure(old)


def test_same_table_same_classes_absent_rows_are_not_fields():
    a, b = MODELS["qwen3_vl"]().param_table(), MODELS["qwen3_vl"]().param_table()
    tree_a = weights.build(a, lambda spec: 0)
    assert type(tree_a) is type(weights.build(b, lambda spec: None))
    assert jax.tree.structure(tree_a) == jax.tree.structure(weights.build(b, lambda spec: 1))
    assert type(tree_a.text.layers).__name__ == "TextLayers" and type(tree_a.vision.deepstack).__name__ == \
        "VisionDeepstack"
    assert list(tree_a.text.__dataclass_fields__) == ["embed", "layers", "lm_head", "norm"]  # sorted
    assert "q_bias" not in tree_a.text.layers.__dataclass_fields__
    tied = weights.build(MODELS["qwen3_vl_bias_tied"]().param_table(), lambda spec: 0)
    assert not hasattr(tied.text, "lm_head") and hasattr(tied.text.layers, "o_bias")
    assert type(tied.text) is not type(tree_a.text)
    assert jax.tree.structure(tied) != jax.tree.structure(tree_a)


def test_misspelt_weight_fails_at_trace_time_naming_the_class_and_its_fields():
    params = weights.build(MODELS["qwen2_5_vl"]().param_table(), lambda spec: jnp.zeros(spec.shape[:1]))
    with pytest.raises(AttributeError, match=r"TextLayers has no weight 'q_kernl'; its weights: .*q_kernel"):
        jax.jit(lambda p: p.text.layers.q_kernl)(params)
    assert jax.jit(lambda p: p.text.layers.q_kernel)(params).shape == (2,)


def test_state_dict_order_pickle_and_extra_fields():
    table = [ParamSpec("a", ("text", "embed"), (2,), (None,)), ParamSpec("b", ("vision", "x"), (1,), (None,))]
    tree = weights.build(table, lambda spec: np.full(spec.shape, len(spec.hf_name)))
    nested = flax.serialization.to_state_dict(tree)
    assert list(nested) == ["text", "vision"] and list(nested["text"]) == ["embed"]
    loaded = pickle.loads(pickle.dumps(tree))
    assert type(loaded) is type(tree) and type(loaded.text) is type(tree.text)
    wider = weights.with_fields(tree, head=np.zeros(3))
    assert list(wider.__dataclass_fields__) == ["head", "text", "vision"]
    assert type(weights.without_fields(wider, "head")) is type(tree)
    with pytest.raises(ValueError, match="already has fields"):
        weights.with_fields(tree, text=0)
    with pytest.raises(ValueError, match="appears twice"):
        weights.build(table + table[:1], lambda spec: 0)
    with pytest.raises(ValueError, match=r"\('text', 'embed'\): init='uniform'; use one of \['normal', 'ones'"):
        ParamSpec("a", ("text", "embed"), (2,), (None,), init="uniform")


def _old_save_file(nested: dict, table, path):
    """The safetensors file save_params wrote from nested dicts (frozen copy, one shard)."""
    tensors = {}
    for spec in table:
        host = nested
        for name in spec.path:
            host = host[name]
        host = np.asarray(host)
        layers = [host] if spec.num_layers is None else list(host)
        for name, layer in zip(spec.hf_names, layers):
            tensors[name] = np.ascontiguousarray(spec.to_hf(layer))
    save_file({name: tensors[name] for name in sorted(tensors)}, path, metadata={"format": "pt"})


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_save_params_writes_the_same_bytes_as_the_nested_dict_path(tmp_path, family):
    table = MODELS[family]().param_table()
    params = jax.jit(lambda k: init_params(table, k))(jax.random.PRNGKey(3))
    (written,) = save_params(params, table, tmp_path / "new")
    _old_save_file(flax.serialization.to_state_dict(params), table, tmp_path / "old.safetensors")
    assert written.name == SINGLE_FILE
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (written, tmp_path / "old.safetensors")]
    assert digest[0] == digest[1]
