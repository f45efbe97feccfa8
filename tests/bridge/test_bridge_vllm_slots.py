"""Where each HF tensor lands in vLLM's fused parameters (pure; no vLLM needed)."""

from caspo_jax.bridge.verify import vllm_slots
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VLConfig
from caspo_jax.models.qwen2_5_vl.params import param_table
from caspo_jax.tiny import models as tm


def test_qkv_and_gate_up_rows_tile_the_fused_parameters():
    cfg = Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("vllm"))
    slots = vllm_slots(param_table(cfg))
    NH, KH, F = 128, 64, 256  # 4 heads x 32, 2 kv heads x 32, intermediate 256
    fused = "language_model.model.layers.1.self_attn.qkv_proj.weight"
    assert slots["model.layers.1.self_attn.q_proj.weight"] == (fused, 0, NH)
    assert slots["model.layers.1.self_attn.k_proj.weight"] == (fused, NH, NH + KH)
    assert slots["model.layers.1.self_attn.v_proj.weight"] == (fused, NH + KH, NH + 2 * KH)
    assert slots["model.layers.0.self_attn.v_proj.bias"] == (fused.replace("1", "0").replace("weight", "bias"),
                                                             NH + KH, NH + 2 * KH)
    assert slots["model.layers.0.mlp.up_proj.weight"] == ("language_model.model.layers.0.mlp.gate_up_proj.weight",
                                                          F, 2 * F)
    assert slots["visual.blocks.1.mlp.gate_proj.bias"] == ("visual.blocks.1.mlp.gate_up_proj.bias", 0, 128)
    assert slots["visual.blocks.1.attn.qkv.weight"] == ("visual.blocks.1.attn.qkv.weight", 0, 192)
    assert slots["lm_head.weight"] == ("language_model.lm_head.weight", 0, tm.VOCAB)
    assert slots["model.embed_tokens.weight"] == ("language_model.model.embed_tokens.weight", 0, tm.VOCAB)


def test_module_order_keeps_fused_pieces_in_one_bucket():
    import numpy as np

    from caspo_jax.bridge.hf_tensors import iter_buckets, iter_hf_arrays
    from caspo_jax.bridge.verify import vllm_module_order
    from caspo_jax.models.common import weights
    from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL

    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("vllm")))
    params = weights.build(model.param_table(), lambda spec: np.zeros(spec.shape, np.float32))
    order, module_of = vllm_module_order(model.param_table())
    assert sorted(order) == sorted(vllm_slots(model.param_table()))
    seen_modules = []
    for bucket in iter_buckets(iter_hf_arrays(params, model.param_table(), names=order), 16 * 1024,
                               group_of=module_of.get):
        modules = [module_of[name] for name, _ in bucket]
        assert not set(modules) & set(seen_modules)  # no module continues from an earlier bucket
        seen_modules += modules
        if len(set(modules)) > 1:  # only a whole module may push a bucket past the limit
            last = [a.nbytes for name, a in bucket if module_of[name] == modules[-1]]
            assert sum(a.nbytes for _, a in bucket) - sum(last) <= 16 * 1024
    qkv = [n for n in order if module_of[n] == "language_model.model.layers.0.self_attn.qkv_proj"]
    assert sorted(qkv) == sorted(f"model.layers.0.self_attn.{p}_proj.{w}" for w in ("weight", "bias") for p in "qkv")
    start = order.index(qkv[0])
    assert order[start:start + 6] == qkv  # adjacent
    assert len(np.unique([module_of[n] for n in order])) < len(order)
