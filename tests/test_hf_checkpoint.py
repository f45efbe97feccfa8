"""One loader for HF checkpoint directories (trainer, reward model, caspo rm, evals)."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from caspo_jax.data.pipeline import processor_resize_settings
from caspo_jax.hf_checkpoint import load_hf_checkpoint, stop_token_ids
from caspo_jax.models import save_pretrained
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from caspo_jax.tiny.tokenizer import (QWEN2_VL_CHAT_TEMPLATE, build_tiny_processor, build_tiny_tokenizer,
                                              save_tiny_processor, tokenizer_info)
from caspo_jax.loop.setup import tiny_hf_config


def test_directory_without_a_chat_template_loads_with_the_qwen2_vl_one(tmp_path):
    tokenizer = build_tiny_tokenizer()
    info = tokenizer_info(tokenizer)
    processor = build_tiny_processor(tokenizer)
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tiny_hf_config("test", info)))
    params = model.init(jax.random.PRNGKey(0), jnp.float32)
    save_pretrained(model, params, tmp_path)
    save_tiny_processor(processor, tmp_path)
    (tmp_path / "chat_template.jinja").unlink()  # a checkpoint whose tokenizer carries no template
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "chat_template"}))

    loaded, loaded_params, loaded_processor = load_hf_checkpoint(tmp_path, min_pixels=56 * 56, max_pixels=112 * 112)
    assert loaded.config == model.config
    for a, b in zip(jax.tree.leaves(loaded_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert loaded_processor.tokenizer.chat_template == QWEN2_VL_CHAT_TEMPLATE
    assert processor_resize_settings(loaded_processor)[1:] == (56 * 56, 112 * 112)
    assert stop_token_ids(loaded_processor.tokenizer) == tuple(sorted({info.im_end_id, info.eos_token_id}))
