"""The shared Qwen-VL decoder (``caspo_jax.models.common.decoder``): its family switches."""

from types import SimpleNamespace

import numpy as np

import jax.numpy as jnp

from caspo_jax.models.common import decoder
from caspo_jax.models.common import kv_cache
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from caspo_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
from caspo_jax.tiny import models as tm
from caspo_jax.tiny import qwen3_vl as tq


def test_contiguous_mrope_bands_by_hand():
    """Qwen2.5-VL's bands: section (1, 2, 1) over H/2 = 4 frequencies takes rows t, h, h, w; each
    angle is that row's position times 10000^(-2j/H)."""
    cfg = SimpleNamespace(head_dim=8, rope_theta=10000.0, mrope_section=(1, 2, 1), mrope_interleaved=False)
    np.testing.assert_array_equal(decoder.mrope_rows(cfg), [0, 1, 1, 2])
    position_ids = np.array([[[3]], [[5]], [[7]]])  # t, h, w for one token
    cos, sin = decoder.mrope_cos_sin(jnp.asarray(position_ids), cfg, jnp.float32)
    inv_freq = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    half = np.array([3, 5, 5, 7]) * inv_freq
    np.testing.assert_allclose(np.asarray(cos)[0, 0], np.cos(np.concatenate([half, half])), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sin)[0, 0], np.sin(np.concatenate([half, half])), rtol=1e-6)


def test_family_switches_and_their_parameters():
    """Each family's text config sets the decoder switches, and its parameter table holds exactly
    the leaves they read (q/k/v biases for Qwen2.5-VL; q/k norms, and all four biases only with
    ``attention_bias``, for Qwen3-VL). Both families run the one KV-cache module."""
    q25 = Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("vision"))
    q3 = Qwen3VLConfig.from_dict(tq.hf_config_dict("vision"))
    q3_bias = Qwen3VLConfig.from_dict(tq.hf_config_dict("vision", attention_bias=True))
    expected = {  # (qkv_bias, o_bias, qk_norm, mrope_interleaved)
        q25: (True, False, False, False), q3: (False, False, True, True), q3_bias: (True, True, True, True)}
    for cfg, switches in expected.items():
        t = cfg.text
        assert (t.qkv_bias, t.o_bias, t.qk_norm, t.mrope_interleaved) == switches
        model = (Qwen2_5_VL if cfg is q25 else Qwen3VL)(cfg)
        leaves = {spec.path[-1] for spec in model.param_table() if spec.path[:2] == ("text", "layers")}
        assert {"q_bias", "k_bias", "v_bias"} <= leaves if t.qkv_bias else not leaves & {"q_bias", "k_bias", "v_bias"}
        assert ("o_bias" in leaves) == t.o_bias
        assert ({"q_norm", "k_norm"} <= leaves) == t.qk_norm
        assert model.kv_cache is kv_cache
