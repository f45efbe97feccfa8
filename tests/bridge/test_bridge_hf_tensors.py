"""The bridge's name/layout table, without vLLM: round trips into unmodified transformers.

Exactness: tensors from a loaded checkpoint equal transformers' own state dict bit for
bit; a transformers model filled from the bridge gives our logits (float32, <= 2e-5,
the models' parity tolerance).
"""


import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from caspo_jax.bridge.hf_tensors import (hf_tensor_refs, iter_buckets, iter_hf_arrays, iter_torch_tensors,
                                         state_dict_bytes)
from caspo_jax.bridge.transport import decode_safetensors, encode_safetensors
from caspo_jax.models import load_pretrained
from caspo_jax.models.common import weights
from caspo_jax.models.qwen2_5_vl import canonical_hf_name
from caspo_jax.tiny import models as tm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = tm.hf_model("vision", seed=0)
    path = tm.Path(tmp_path_factory.mktemp("bridge"))
    hf.save_pretrained(path)
    model, params = load_pretrained(path)
    return hf, model, params


def _in_memory_names(hf) -> dict:
    """Checkpoint name -> transformers' in-memory parameter name."""
    return {canonical_hf_name(name): name for name in hf.state_dict()}


def test_loaded_params_convert_back_to_transformers_state_dict_exactly(tiny):
    hf, model, params = tiny
    names = _in_memory_names(hf)
    reference = hf.state_dict()
    converted = dict(iter_torch_tensors(params, model.param_table()))
    assert set(names) == set(converted)  # every tensor, no extras
    for name, tensor in converted.items():
        expected = reference[names[name]]
        assert tensor.shape == expected.shape, name
        assert torch.equal(tensor, expected), name


def test_pushed_params_give_identical_logits_in_transformers(tiny):
    hf, model, params = tiny
    trained = model.init(jax.random.PRNGKey(3), jnp.float32)  # a different parameter set
    fresh = tm.hf_model("vision", seed=5)
    names = _in_memory_names(fresh)
    state = {names[name]: tensor for name, tensor in iter_torch_tensors(trained, model.param_table())}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and not missing
    batch = tm.make_batch([[4, (1, 4, 4), 5], [9]], seed=3)
    fresh.model.rope_deltas = None
    with torch.no_grad():
        ref = fresh(input_ids=torch.tensor(batch.input_ids), attention_mask=torch.tensor(batch.attention_mask),
                    pixel_values=torch.tensor(batch.pixel_values), image_grid_thw=torch.tensor(batch.image_grid_thw),
                    mm_token_type_ids=torch.tensor(batch.mm_token_type_ids)).logits.numpy()
    ours = np.asarray(model.forward(trained, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                    batch.image_grid_thw))
    mask = batch.attention_mask.astype(bool)
    np.testing.assert_allclose(ours[mask], ref[mask], atol=2e-5, rtol=0)


def test_dlpack_views_and_sharded_gather_equal_host_path(tiny):
    from caspo_jax.sharding import make_mesh, param_shardings

    _, model, params = tiny
    table = model.param_table()
    host = dict(iter_hf_arrays(params, table))
    for name, tensor in iter_torch_tensors(params, table, dlpack=True):
        np.testing.assert_array_equal(tensor.numpy(), host[name], err_msg=name)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(params, param_shardings(table, mesh))
    assert len(sharded.text.layers.gate_kernel.sharding.device_set) == 8
    for name, tensor in iter_torch_tensors(sharded, table, dlpack=True):
        np.testing.assert_array_equal(tensor.numpy(), host[name], err_msg=name)


def test_dlpack_gathers_sharded_layers_on_device_not_through_the_host(tiny):
    """A layer sharded over the local devices reaches torch joined on the engine's device,
    device to device, then DLPack: with host transfers disallowed (`jax.device_put` of a
    sharded array onto one device, the first version, copies through the host and fails
    here), every tensor arrives, equal to the host path."""
    from caspo_jax.sharding import make_mesh, param_shardings

    _, model, params = tiny
    table = model.param_table()
    host = dict(iter_hf_arrays(params, table))
    sharded = jax.device_put(params, param_shardings(table, make_mesh(data=2, fsdp=2, tensor=2)))
    target = jax.devices()[3]
    with jax.transfer_guard_host_to_device("disallow_explicit"), jax.transfer_guard_device_to_host("disallow_explicit"):
        got = dict(iter_torch_tensors(sharded, table, dlpack=True, device=target))
    assert set(got) == set(host)
    for name, tensor in got.items():
        np.testing.assert_array_equal(tensor.numpy(), host[name], err_msg=name)


def test_bfloat16_is_shared_through_a_view(tiny):
    _, model, params = tiny
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    for (name, tensor), (_, array) in zip(iter_torch_tensors(bf16, model.param_table()),
                                         iter_hf_arrays(bf16, model.param_table())):
        assert tensor.dtype == torch.bfloat16 and array.dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(tensor.view(torch.uint16).numpy(), array.view(np.uint16))


def test_buckets_are_bounded_and_safetensors_bytes_round_trip(tiny):
    _, model, params = tiny
    table = model.param_table()
    limit = 64 * 1024
    total, count = 0, 0
    largest = max(int(np.prod(r.hf_shape)) * 4 for r in hf_tensor_refs(table))
    for bucket in iter_buckets(iter_hf_arrays(params, table), bucket_bytes=limit):
        size = sum(a.nbytes for _, a in bucket)
        assert size <= max(limit, largest)
        assert len(bucket) == 1 or size <= limit
        decoded = decode_safetensors(encode_safetensors(bucket))
        assert sorted(decoded) == sorted(name for name, _ in bucket)
        for name, array in bucket:
            np.testing.assert_array_equal(decoded[name].numpy(), array)
        total += size
        count += len(bucket)
    assert total == state_dict_bytes(params, table)
    assert count == len(hf_tensor_refs(table)) and count > 10


def test_cpu_tensors_are_contiguous_views_of_the_parameter_buffers(tiny):
    """Our leaves are stored in HF's layouts, so the push copies nothing: every tensor is a
    contiguous view of its layer of the JAX buffer (what vLLM's loader needs to copy at
    memcpy speed instead of transposing)."""
    _, model, params = tiny
    table = model.param_table()
    refs = {ref.name: ref for ref in hf_tensor_refs(table)}
    for name, tensor in iter_torch_tensors(params, table):
        ref = refs[name]
        leaf = np.asarray(weights.leaf(params, ref.spec.path))
        layer = leaf if ref.layer is None else leaf[ref.layer]
        assert tensor.is_contiguous(), name
        assert tensor.data_ptr() == layer.__array_interface__["data"][0], name
