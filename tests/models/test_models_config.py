"""Config parsing and the parameter table at full size (Qwen2.5-VL-7B shapes, zero memory)."""

import numpy as np
import pytest
import torch

from caspo_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, canonical_hf_name, param_table

# The field layout of the released Qwen2.5-VL-7B-Instruct config.json (pre-transformers-5 flat
# layout, rope_scaling of type "mrope", ``in_chans`` instead of ``in_channels``).
FLAT_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "hidden_size": 3584, "image_token_id": 151655, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 128000, "max_window_layers": 28, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "video_token_id": 151656, "vision_end_token_id": 151653,
    "vision_start_token_id": 151652, "vision_token_id": 151654, "vocab_size": 152064,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}


def test_flat_7b_config_reads_like_transformers():
    from transformers import Qwen2_5_VLConfig as HFConfig

    ours = Qwen2_5_VLConfig.from_dict(FLAT_7B)
    hf = HFConfig(**FLAT_7B)
    t = hf.text_config
    assert (ours.text.hidden_size, ours.text.num_hidden_layers, ours.text.num_key_value_heads) == \
        (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads)
    assert ours.text.rope_theta == t.rope_parameters["rope_theta"]
    assert list(ours.text.mrope_section) == t.rope_parameters["mrope_section"]
    assert ours.text.rms_norm_eps == t.rms_norm_eps
    v = hf.vision_config
    assert ours.vision.fullatt_block_indexes == tuple(v.fullatt_block_indexes)
    assert (ours.vision.window_size, ours.vision.tokens_per_second, ours.vision.in_channels) == \
        (v.window_size, v.tokens_per_second, v.in_channels)
    assert ours.vision.rope_theta == v.rope_parameters["rope_theta"]
    # Round trip through our nested writer reads back equal, in ours and in transformers.
    again = Qwen2_5_VLConfig.from_dict(ours.to_dict())
    assert again == ours
    assert HFConfig(**ours.to_dict()).text_config.num_hidden_layers == 28


def test_full_size_table_matches_transformers_parameters():
    """Every HF parameter of the 7B model appears once in the table with the same shape."""
    from transformers import Qwen2_5_VLConfig as HFConfig
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(HFConfig(**FLAT_7B))
    hf_shapes = {canonical_hf_name(n): tuple(p.shape) for n, p in hf.named_parameters()}
    table = param_table(Qwen2_5_VLConfig.from_dict(FLAT_7B))
    ours = {name: spec.expected_hf_shape() for spec in table for name in spec.hf_names}
    assert ours == hf_shapes
    n_params = sum(int(np.prod(spec.shape)) for spec in table)
    assert n_params == sum(p.numel() for p in hf.parameters())
    assert 8.2e9 < n_params < 8.4e9


def test_bad_configs_name_the_field():
    bad = dict(FLAT_7B, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 20]})
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2_5_VLConfig.from_dict(bad, source="x/config.json")
    with pytest.raises(ValueError, match="model_type"):
        Qwen2_5_VLConfig.from_dict(dict(FLAT_7B, model_type="qwen3_vl"))
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        Qwen2_5_VLConfig.from_dict(dict(FLAT_7B, use_sliding_window=True))
