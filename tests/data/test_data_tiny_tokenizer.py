"""The offline tiny Qwen tokenizer/processor, and our smart_resize against transformers'."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from caspo_jax.data.images import ImageError, resize_image, smart_resize
from caspo_jax.tiny.tokenizer import (
    QWEN_SPECIAL_TOKENS,
    build_tiny_processor,
    build_tiny_tokenizer,
    save_tiny_processor,
    tokenizer_info,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_vocab_size_and_special_ids_are_queryable(tokenizer):
    info = tokenizer_info(tokenizer)
    assert info.vocab_size == len(tokenizer) == 512
    specials = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    assert specials == list(range(512 - len(QWEN_SPECIAL_TOKENS), 512))  # Qwen's order, at the end
    assert info.eos_token_id == info.pad_token_id == specials[0]
    assert (info.im_start_id, info.im_end_id) == (specials[1], specials[2])
    assert info.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert info.padded_vocab_size(128) == 512 and info.padded_vocab_size(100) == 600
    assert len(build_tiny_tokenizer(300)) == 300
    with pytest.raises(ValueError, match="too small"):
        build_tiny_tokenizer(200)


@pytest.mark.parametrize(
    "text",
    ["Is the heater safe next to the curtains?", "naïve café, 漢字 and emoji 🔥\n\ttabs",
     "  leading and trailing  ", "x" * 300, "<|im_start|>user\nhi<|im_end|>"],
)
def test_encode_decode_roundtrip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < len(tokenizer)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids_and_bpe_compresses(tokenizer):
    ids = tokenizer("<|vision_start|><|image_pad|><|image_pad|><|vision_end|>")["input_ids"]
    info = tokenizer_info(tokenizer)
    assert ids == [info.vision_start_token_id, info.image_token_id, info.image_token_id,
                   info.vision_end_token_id]
    sentence = "Before answering, look at the whole scene"
    assert len(tokenizer(sentence)["input_ids"]) < len(sentence.encode()) / 2


def test_chat_template_matches_qwen2_vl_format(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A stove."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA stove.<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Rules."}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nRules.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("family, factor", [("qwen2_5_vl", 28), ("qwen3_vl", 32)])
def test_processor_expands_image_tokens_to_the_grid(tokenizer, family, factor):
    processor = build_tiny_processor(tokenizer, family=family)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", (333, 150), (10, 200, 30))
    out = processor(text=[text], images=[image], return_tensors="np", return_mm_token_type_ids=True)
    t, h, w = out["image_grid_thw"][0]
    assert (h * factor // 2, w * factor // 2) == smart_resize(150, 333, factor, 56 * 56, 28 * 28 * 64)
    n_image_tokens = int((out["input_ids"][0] == tokenizer_info(tokenizer).image_token_id).sum())
    assert n_image_tokens == t * h * w // 4
    assert int(out["mm_token_type_ids"].sum()) == n_image_tokens


def test_save_and_reload(tokenizer, tmp_path):
    processor = build_tiny_processor(tokenizer)
    save_tiny_processor(processor, tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nIs it safe? 🔥<|im_end|>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert image_processor.size["longest_edge"] == 28 * 28 * 64


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 4000),
    width=st.integers(1, 4000),
    factor=st.sampled_from([28, 32]),
    min_pixels=st.sampled_from([56 * 56, 128 * 28 * 28, 4 * 28 * 28]),
    max_pixels=st.sampled_from([28 * 28 * 64, 28 * 28 * 1280, 16384 * 28 * 28]),
)
def test_smart_resize_equals_transformers(height, width, factor, min_pixels, max_pixels):
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ImageError, match="aspect ratio"):
            smart_resize(height, width, factor, min_pixels, max_pixels)
        return
    ours = smart_resize(height, width, factor, min_pixels, max_pixels)
    assert ours == hf_smart_resize(height, width, factor, min_pixels, max_pixels)


@pytest.mark.parametrize("size", [(333, 150), (28, 28), (1000, 37), (57, 911), (640, 480)])
def test_resize_agrees_with_image_processor_grid(size):
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 256)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    grid = processor(images=[image], return_tensors="np")["image_grid_thw"][0]
    resized = resize_image(image, 28, 56 * 56, 28 * 28 * 256)
    assert (resized.height, resized.width) == (grid[1] * 14, grid[2] * 14)
    # resizing first is idempotent for the processor: it sees the same grid
    again = processor(images=[resized], return_tensors="np")["image_grid_thw"][0]
    assert list(again) == list(grid)
