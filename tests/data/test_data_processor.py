"""caspo_jax.data.processor.load_processor: patch size and limits from the checkpoint, not a family default."""

import json

import pytest

from caspo_jax.data.pipeline import processor_resize_settings
from caspo_jax.data.processor import load_processor
from caspo_jax.tiny.tokenizer import (TinyQwen2_5_VLProcessor, TinyQwen3VLProcessor, build_tiny_processor,
                                              build_tiny_tokenizer, save_tiny_processor)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _checkpoint(directory, tokenizer, family, vision):
    save_tiny_processor(build_tiny_processor(tokenizer, family=family, min_pixels=32 * 32, max_pixels=32 * 32 * 16),
                        directory)
    (directory / "config.json").write_text(json.dumps({"model_type": family, "vision_config": vision}))
    return directory


@pytest.mark.parametrize("family,patch,cls", [("qwen2_5_vl", 14, TinyQwen2_5_VLProcessor),
                                              ("qwen3_vl", 16, TinyQwen3VLProcessor)])
def test_reads_the_saved_preprocessor_config(tmp_path, tokenizer, family, patch, cls):
    # config.json claims patch 99: preprocessor_config.json wins where present
    processor = load_processor(_checkpoint(tmp_path, tokenizer, family, {"patch_size": 99}))
    assert isinstance(processor, cls)
    assert processor_resize_settings(processor) == (2 * patch, 32 * 32, 32 * 32 * 16)
    assert processor.tokenizer.chat_template == tokenizer.chat_template


def test_pixel_overrides_and_model_config_fallback(tmp_path, tokenizer):
    directory = _checkpoint(tmp_path, tokenizer, "qwen3_vl", {"patch_size": 16, "spatial_merge_size": 2})
    assert processor_resize_settings(load_processor(directory, min_pixels=64 * 64, max_pixels=64 * 64 * 4)) == (
        32, 64 * 64, 64 * 64 * 4)
    (directory / "preprocessor_config.json").unlink()
    processor = load_processor(directory, max_pixels=32 * 32 * 8)
    assert processor_resize_settings(processor) == (32, 56 * 56, 32 * 32 * 8)
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]


def test_missing_chat_template_and_vision_config_name_the_fix(tmp_path, tokenizer):
    directory = _checkpoint(tmp_path, tokenizer, "qwen2_5_vl", {})
    (directory / "chat_template.jinja").unlink()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="chat_template.jinja"):
        load_processor(directory)
    assert load_processor(directory, default_chat_template="{{ 'x' }}").tokenizer.chat_template == "{{ 'x' }}"
    (directory / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_processor(directory)
