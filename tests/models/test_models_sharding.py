"""The forward under an 8-device CPU mesh equals the 1-device forward; sharding rules are data."""

import numpy as np
import pytest

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from caspo_jax.models import load_pretrained
from caspo_jax.sharding import LogicalRules, make_mesh, named_sharding, param_shardings
from caspo_jax.tiny import models as tm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_mesh")
    tm.save_hf_checkpoint(path, "vision", seed=3)
    return path


def test_mesh_forward_equals_single_device(checkpoint):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 host devices"
    model, params = load_pretrained(checkpoint)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded_model, sharded = load_pretrained(checkpoint, mesh=mesh)
    q = sharded.text.layers.q_kernel
    assert q.sharding.spec == P(None, "tensor", "fsdp") and len(q.sharding.device_set) == 8
    assert sharded.text.embed.sharding.spec == P("tensor", "fsdp")

    batch = tm.make_batch([[2, (1, 4, 6), 3], [9], [1, (1, 8, 4), 1], [4, (1, 4, 4)]], seed=17)
    expected = np.asarray(model.forward(params, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                        batch.image_grid_thw))
    batch_sharding = named_sharding(mesh, ("batch", None), batch.input_ids.shape)
    assert batch_sharding.spec == P(("data", "fsdp"), None)
    ids = jax.device_put(batch.input_ids, batch_sharding)
    mask = jax.device_put(batch.attention_mask, batch_sharding)
    pixels = jax.device_put(batch.pixel_values, NamedSharding(mesh, P()))
    got = sharded_model.forward(sharded, ids, mask, pixels, batch.image_grid_thw)
    assert len(got.sharding.device_set) == 8
    valid = batch.attention_mask.astype(bool)
    assert np.abs(np.asarray(got) - expected)[valid].max() <= 1e-5


def test_rules_are_overridable_and_skip_indivisible_dims(checkpoint):
    model, _ = load_pretrained(checkpoint)
    mesh = make_mesh(fsdp=8)
    rules = LogicalRules().replace(embed=None, vocab="fsdp")
    shardings = param_shardings(model.param_table(), mesh, rules)
    assert shardings.text.embed.spec == P("fsdp", None)  # vocab 512 / 8
    # vision_qkv (3 * 32 = 96) divides by 8, the ViT width (32) too; a bias of 3 would not.
    assert LogicalRules().spec(("embed",), (3,), mesh) == P(None)
    with pytest.raises(KeyError, match="no rule"):
        LogicalRules().spec(("unknown_axis",))
    with pytest.raises(ValueError, match="8 devices"):
        make_mesh(data=3)
