"""attn_implementation="auto": the kernel decisions (pure, made-up platforms and shapes), the
log, and that on CPU "auto" compiles exactly the program of the old default (None)."""

import dataclasses
import functools
import logging

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from caspo_jax.models.common import attention as attn
from caspo_jax.models.common import decoder
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from caspo_jax.tiny import models as tm

BF16, F32 = jnp.bfloat16, jnp.float32


def choose(platform, mask_kind="causal", dtype=BF16, head_dim=128, q_len=1024, kv_len=1024, has_mask=True,
           requested="auto"):
    return attn.choose_attention(requested, platform=platform, mask_kind=mask_kind, dtype=dtype, head_dim=head_dim,
                                 q_len=q_len, kv_len=kv_len, has_mask=has_mask)


@pytest.mark.parametrize("kwargs, implementation, words", [
    # GPU: cuDNN for bf16/fp16 text (causal + padding), ViT segments (head dim 80) and dense masks
    (dict(platform="gpu"), "cudnn", ["cuDNN", "causal"]),
    (dict(platform="cuda", dtype=jnp.float16), "cudnn", ["cuDNN"]),
    (dict(platform="gpu", mask_kind="segment", head_dim=80, q_len=64, kv_len=64), "cudnn", ["segment"]),
    (dict(platform="gpu", mask_kind="dense"), "cudnn", ["dense"]),
    (dict(platform="gpu", dtype=F32), "xla", ["bf16/fp16", "float32"]),
    (dict(platform="gpu", head_dim=160), "xla", ["head dim", "160"]),
    (dict(platform="gpu", head_dim=68), "xla", ["multiple of 8", "68"]),
    (dict(platform="gpu", q_len=63, kv_len=63), "xla", ["even lengths", "63x63"]),
    (dict(platform="gpu", mask_kind="segment", q_len=63, kv_len=63, has_mask=False), "cudnn", ["segment"]),
    # TPU: Pallas flash for causal text at multiples of 128, XLA otherwise (with the reason)
    (dict(platform="tpu"), "pallas_flash", ["Pallas", "segment ids"]),
    (dict(platform="tpu", head_dim=256), "pallas_flash", ["Pallas"]),
    (dict(platform="tpu", q_len=1000, kv_len=1000), "xla", ["multiples of 128", "1000x1000"]),
    (dict(platform="tpu", head_dim=192), "xla", ["head dim", "192"]),
    (dict(platform="tpu", mask_kind="segment"), "xla", ["causal text attention only", "segment"]),
    (dict(platform="tpu", mask_kind="dense"), "xla", ["dense mask stays on XLA"]),
    # CPU: JAX's default, so programs stay as they were
    (dict(platform="cpu"), None, ["XLA on cpu"]),
    # explicit requests are not second-guessed
    (dict(platform="cpu", requested="cudnn"), "cudnn", ["explicitly"]),
    (dict(platform="gpu", requested=None), None, ["explicitly"]),
])
def test_choose_attention(kwargs, implementation, words):
    choice = choose(**kwargs)
    assert choice.implementation == implementation
    for word in words:
        assert word in choice.reason


def test_choose_attention_rejects_unknown_mask_kind():
    with pytest.raises(ValueError, match="mask_kind='window'"):
        choose("gpu", mask_kind="window")


def test_resolve_logs_each_decision_once_and_rejects_unknown_names(caplog, monkeypatch):
    monkeypatch.setattr(attn, "_logged", set())
    q = jnp.zeros((1, 256, 4, 16), F32)
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        assert attn.resolve("auto", "causal", q, q) is None
        assert attn.resolve("auto", "causal", q, q) is None
        assert attn.resolve("xla", "causal", q, q) == "xla"
    records = [r.getMessage() for r in caplog.records if r.name == attn.__name__]
    assert records == ["attention (auto, causal): JAX default -- XLA on cpu (JAX's default; no fused kernel here)"]
    with pytest.raises(ValueError, match="attn_implementation='flash'"):
        attn.resolve("flash", "causal", q, q)


@pytest.mark.parametrize("pad", ["left", "right"])
def test_key_segments_rebuild_the_causal_padding_mask_for_real_queries(pad):
    """What the Pallas kernel receives (segment ids: padding 0, tokens 1, plus causal)
    allows exactly what the boolean mask allows, for every real query."""
    valid_BxL = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]] if pad == "left" else
                         [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    mask = np.asarray(decoder.causal_mask(jnp.asarray(valid_BxL)))
    seg = np.asarray(attn.key_segments(jnp.asarray(mask)))
    np.testing.assert_array_equal(seg, valid_BxL.astype(np.int32))
    L = valid_BxL.shape[1]
    rebuilt = np.tril(np.ones((L, L), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    for b in range(2):
        real = valid_BxL[b]
        np.testing.assert_array_equal(rebuilt[b][real], mask[b, 0][real])


@functools.partial(jax.jit, static_argnums=(0, 6))
def _hidden(model, params, ids, mask, pixels, positions, grids):
    return model.hidden_states(params, ids, mask, pixels, grids, position_ids=positions)


def test_auto_on_cpu_compiles_the_program_of_the_old_default():
    """Text longer than one attention block (the blocked causal path) and an image (the ViT's
    window and full-attention segments), left padding: identical StableHLO and outputs."""
    cfg = tm.hf_config_dict("vision")
    old = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(cfg), attn_implementation=None)
    auto = dataclasses.replace(old, attn_implementation="auto")
    params = old.init(jax.random.PRNGKey(0))
    batch = tm.make_batch([[150, (1, 8, 8), 20], [120]], pad="left")
    positions, _ = old.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask)
    grids = tuple(map(tuple, np.asarray(batch.image_grid_thw).tolist()))
    args = (params, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), jnp.asarray(batch.pixel_values),
            jnp.asarray(positions))
    assert batch.input_ids.shape[1] > old.attn_block
    texts = [_hidden.lower(m, *args, grids).as_text() for m in (old, auto)]
    assert texts[0] == texts[1]
    np.testing.assert_array_equal(np.asarray(_hidden(old, *args, grids)), np.asarray(_hidden(auto, *args, grids)))
