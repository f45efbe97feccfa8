"""Qwen3-VL: rope index and rotary tables vs transformers, checkpoint round trips, 8-device mesh."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from caspo_jax.models import load_pretrained, save_pretrained
from caspo_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig, canonical_hf_name, vision_metadata
from caspo_jax.models.common import decoder
from caspo_jax.sharding import make_mesh, named_sharding
from caspo_jax.tiny import qwen3_vl as tq


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("q3_text")
    tq.save_hf_checkpoint(path, "text", seed=2)
    return path


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return load_pretrained(hf_dir)


ROPE_CASES = {
    "images_left_padded": ([[2, (1, 4, 6), 3], [9], [1, (1, 8, 4), 1, (1, 4, 4), 2]], "left", True),
    "video_frames_and_image": ([[2, ("video", 3, 4, 6), 3, (1, 4, 4), 1], [5, ("video", 1, 6, 2)]], "right", True),
    "no_mask": ([[1, (1, 6, 4), 2, (1, 2, 8)]], "left", False),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_index_equals_transformers(loaded, hf_dir, case):
    from transformers import Qwen3VLForConditionalGeneration

    model, _ = loaded
    samples, pad, with_mask = ROPE_CASES[case]
    hf = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir)
    batch = tq.make_batch(samples, pad=pad, seed=4)
    mask = batch.attention_mask if with_mask else None
    grid = lambda g: None if g is None else torch.tensor(g)  # noqa: E731
    expected_pos, expected_delta = hf.model.get_rope_index(
        torch.tensor(batch.input_ids), torch.tensor(batch.mm_token_type_ids), grid(batch.image_grid_thw),
        grid(batch.video_grid_thw), None if mask is None else torch.tensor(mask))
    pos, delta = model.get_rope_index(batch.input_ids, batch.image_grid_thw, mask, batch.video_grid_thw)
    np.testing.assert_array_equal(pos, expected_pos.numpy())
    np.testing.assert_array_equal(delta, expected_delta.numpy())


def test_interleaved_mrope_layout_and_tables_equal_transformers():
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    cfg = Qwen3VLConfig.from_dict(tq.hf_config_dict("vision"))
    # head_dim 16, section [4, 2, 2]: t h w t h w t t (hand-derived from transformers' slices).
    np.testing.assert_array_equal(decoder.mrope_rows(cfg.text), [0, 1, 2, 0, 1, 2, 0, 0])
    big = Qwen3VLConfig.from_dict({"text_config": {"head_dim": 128, "rope_parameters": {"mrope_section": [24, 20, 20]}},
                                   "vision_config": {"out_hidden_size": 4096}})
    rows = decoder.mrope_rows(big.text)
    assert rows.tolist()[:6] == [0, 1, 2, 0, 1, 2] and rows.tolist()[57:] == [0, 1, 2, 0, 0, 0, 0]
    assert np.bincount(rows).tolist() == [24, 20, 20]

    hf_rope = Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(**tq.hf_config_dict("vision")["text_config"]))
    positions = np.random.default_rng(0).integers(0, 3000, (3, 2, 9))
    cos_ref, sin_ref = hf_rope(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
    cos, sin = decoder.mrope_cos_sin(positions, cfg.text, jnp.float32)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=1e-6)


def test_vision_metadata_equals_transformers_helpers():
    from transformers.vision_utils import (get_vision_cu_seqlens, get_vision_interpolation_indices_and_weights,
                                           get_vision_position_ids)

    grids = np.array([[1, 6, 8], [2, 4, 4], [1, 2, 10]])
    meta = vision_metadata(grids, 2, 4)
    index, weight = get_vision_interpolation_indices_and_weights(torch.tensor(grids), num_grid_per_side=4,
                                                                 mode="bilinear", align_corners=True,
                                                                 spatial_merge_size=2)
    np.testing.assert_array_equal(meta.interp_index_Px4, index.numpy())
    np.testing.assert_array_equal(meta.interp_weight_Px4, weight.numpy())
    np.testing.assert_array_equal(meta.positions_Px2, get_vision_position_ids(torch.tensor(grids), 2).numpy())
    cu = get_vision_cu_seqlens(torch.tensor(grids)).numpy()
    np.testing.assert_array_equal(np.bincount(meta.segment_P), np.diff(cu))  # one segment per frame
    assert meta.interp_weight_Px4.sum(axis=1) == pytest.approx(1.0)


def test_load_save_reload_in_transformers_identical(hf_dir, loaded, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    model, params = loaded
    assert isinstance(model, Qwen3VL) and model.config.num_deepstack == 1
    assert "model.language_model.layers.0.self_attn.q_norm.weight" in {s.hf_names[0] for s in model.param_table()}
    save_pretrained(model, params, tmp_path)
    original = load_file(hf_dir / "model.safetensors")
    written = load_file(tmp_path / "model.safetensors")
    assert sorted(written) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(written[name], original[name], err_msg=name)
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path)
    reference = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir)
    ref_state = reference.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(ref_state)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    for sub in ("text_config", "vision_config"):
        ours_cfg, ref_cfg = reloaded.config.to_dict()[sub], reference.config.to_dict()[sub]
        for key in ("rope_parameters", "head_dim", "deepstack_visual_indexes", "num_position_embeddings",
                    "num_hidden_layers", "depth", "hidden_act"):
            assert ours_cfg.get(key) == ref_cfg.get(key), (sub, key)
    assert load_pretrained(tmp_path)[0].config == model.config


def test_older_flat_key_layout_loads(hf_dir, loaded):
    """``model.layers.*`` / ``visual.*`` names map onto the transformers-5 layout."""
    assert canonical_hf_name("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert canonical_hf_name("visual.blocks.0.norm1.bias") == "model.visual.blocks.0.norm1.bias"
    assert canonical_hf_name("model.visual.pos_embed.weight") == "model.visual.pos_embed.weight"
    assert canonical_hf_name("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("variant", ["tied", "attention_bias"])
def test_tied_embeddings_and_attention_bias_forward_and_roundtrip(tmp_path, variant):
    from transformers import Qwen3VLForConditionalGeneration

    hf = tq.hf_model("text", seed=4, tie_word_embeddings=variant == "tied", attention_bias=variant != "tied")
    hf.save_pretrained(tmp_path / "hf")
    model, params = load_pretrained(tmp_path / "hf")
    if variant == "tied":
        assert model.config.tie_word_embeddings and not hasattr(params.text, "lm_head")
    else:
        assert model.config.text.attention_bias and hasattr(params.text.layers, "o_bias")
    batch = tq.make_batch([[3, (1, 4, 4), 5], [6]], seed=1)
    hf.model.rope_deltas = None
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(batch.input_ids), attention_mask=torch.tensor(batch.attention_mask),
                      pixel_values=torch.tensor(batch.pixel_values), image_grid_thw=torch.tensor(batch.image_grid_thw),
                      mm_token_type_ids=torch.tensor(batch.mm_token_type_ids)).logits.numpy()
    got = np.asarray(model.forward(params, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                   batch.image_grid_thw))
    assert np.abs(got - expected)[batch.attention_mask.astype(bool)].max() <= 1e-4
    save_pretrained(model, params, tmp_path / "ours")
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert reloaded.config.tie_word_embeddings == (variant == "tied")
    assert reloaded.config.text_config.attention_bias == (variant != "tied")
    assert sorted(reloaded.state_dict()) == sorted(hf.state_dict())
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, hf.state_dict()[name]), name


def test_dtype_and_random_init_follow_the_table(hf_dir, loaded):
    model, params = loaded
    _, bf16 = load_pretrained(hf_dir, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    init = jax.eval_shape(Qwen3VL(model.config).init, jax.random.key(0))
    assert jax.tree.map(lambda x: x.shape, init) == jax.tree.map(lambda x: x.shape, params)
    for spec in model.param_table():
        assert len(spec.axes) == len(spec.shape)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["vision_config"].update(num_position_embeddings=15), "perfect square"),
    (lambda d: d["text_config"]["rope_parameters"].update(mrope_section=[4, 2, 3]), "mrope_section"),
    (lambda d: d["vision_config"].update(deepstack_visual_indexes=[0, 5]), "deepstack_visual_indexes"),
    (lambda d: d["text_config"]["rope_parameters"].update(rope_type="yarn"), "not ported|only default"),
    (lambda d: d.update(model_type="qwen2_5_vl"), "expected 'qwen3_vl'"),
])
def test_bad_config_fields_are_named(mutate, message, tmp_path):
    raw = tq.hf_config_dict("vision")
    mutate(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises((ValueError, NotImplementedError), match=message) as err:
        Qwen3VLConfig.from_json_file(tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(err.value)


def test_mesh_forward_equals_single_device(tmp_path):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 host devices"
    tq.save_hf_checkpoint(tmp_path, "vision", seed=3)
    model, params = load_pretrained(tmp_path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded_model, sharded = load_pretrained(tmp_path, mesh=mesh)
    q = sharded.text.layers.q_kernel
    assert q.sharding.spec == P(None, "tensor", "fsdp") and len(q.sharding.device_set) == 8
    assert sharded.vision.deepstack.fc1_kernel.sharding.spec == P(None, "tensor", None)

    batch = tq.make_batch([[2, (1, 4, 6), 3], [9], [1, (1, 8, 4), 1], [4, (1, 4, 4)]], seed=17)
    expected = np.asarray(model.forward(params, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                        batch.image_grid_thw))
    batch_sharding = named_sharding(mesh, ("batch", None), batch.input_ids.shape)
    ids = jax.device_put(batch.input_ids, batch_sharding)
    mask = jax.device_put(batch.attention_mask, batch_sharding)
    pixels = jax.device_put(batch.pixel_values, NamedSharding(mesh, P()))
    got = sharded_model.forward(sharded, ids, mask, pixels, batch.image_grid_thw)
    assert len(got.sharding.device_set) == 8
    assert np.abs(np.asarray(got) - expected)[batch.attention_mask.astype(bool)].max() <= 1e-5


# Qwen/Qwen3-VL-4B-Instruct's config.json (the fields that shape the parameters).
QWEN3_VL_4B = {
    "model_type": "qwen3_vl", "tie_word_embeddings": True,
    "text_config": {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": True,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000, "mrope_section": [24, 20, 20],
                                        "mrope_interleaved": True}},
    "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                      "out_hidden_size": 2560, "num_position_embeddings": 2304, "patch_size": 16,
                      "deepstack_visual_indexes": [5, 11, 17]},
}


def test_full_size_4b_table_matches_transformers_parameters_at_zero_memory():
    from transformers import Qwen3VLConfig as HFConfig, Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        hf = Qwen3VLForConditionalGeneration(HFConfig(**QWEN3_VL_4B))
    hf_shapes = {name: tuple(p.shape) for name, p in hf.state_dict().items() if name != "lm_head.weight"}
    model = Qwen3VL(Qwen3VLConfig.from_dict(QWEN3_VL_4B))
    ours = {name: spec.expected_hf_shape() for spec in model.param_table() for name in spec.hf_names}
    assert ours == hf_shapes
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n_params == sum(int(np.prod(s)) for s in hf_shapes.values())
    assert 4.0e9 < n_params < 5.0e9
