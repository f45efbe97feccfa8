"""The grain prompt pipeline: exact lengths, processor parity, constitution placement,
deterministic shuffling, exact resume mid-epoch, length filtering, buckets, bad images."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from caspo_jax.data import SafetyRecord, load_constitutions, load_image
from caspo_jax.data.images import ImageError
from caspo_jax.data.pipeline import (
    DataError, PipelineConfig, PromptDataset, epoch_permutation, image_size, pick_bucket,
)
from caspo_jax.data.prompts import PromptConfig, build_messages, render_prompt
from caspo_jax.tiny.tokenizer import build_tiny_processor

SIZES = [(40, 60), (100, 30), (64, 64), (200, 120), (30, 300), (90, 90), (57, 81), (120, 40), (33, 33), (75, 150)]
CATS = ["violent", "illegal", "hate", "sexual", "privacy", "self_harm"]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture(scope="module")
def constitutions():
    return load_constitutions(overrides={c: f"Short rule for {c}: look, think, warn, help." for c in CATS})


@pytest.fixture
def records(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate(SIZES):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        out.append(SafetyRecord(f"r{i}", (path,), f"Question number {i}: is this safe?" + " more" * i,
                                CATS[i % 6]))
    return out


def ids_of(batches):
    return [[r.id for r in b.records] for b in batches]


def test_batches_have_exact_lengths_and_match_the_processor(records, processor, constitutions):
    config = PipelineConfig(batch_size=4, max_prompt_len=512, pad_buckets=(64, 128, 256), shuffle=False,
                            drop_remainder=False)
    dataset = PromptDataset(records, processor, constitutions, config)
    batches = list(dataset)
    assert [len(b.records) for b in batches] == [4, 4, 2]
    first = batches[0]
    assert first.input_ids.dtype == np.int32 and first.input_ids.shape[1] in config.buckets
    assert first.input_ids.shape[1] == pick_bucket(int(first.attention_mask.sum(1).max()), config.buckets)
    for row, record in enumerate(first.records):
        index = int(record.id[1:])
        student_len, teacher_len = dataset.lengths[index]
        assert first.attention_mask[row].sum() == student_len  # precomputed length is exact
        assert first.teacher_attention_mask[row].sum() == teacher_len
        # left padding: generation continues at the right edge
        assert first.attention_mask[row, -1] == 1
        # the processor on the ORIGINAL image gives the same ids and pixels
        text = render_prompt(processor.tokenizer, build_messages(record))
        reference = processor(text=[text], images=[Image.open(record.images[0])], return_tensors="np")
        np.testing.assert_array_equal(first.input_ids[row][first.attention_mask[row] == 1], reference["input_ids"][0])
    reference_pixels = processor.image_processor(images=[Image.open(r.images[0]) for r in first.records], return_tensors="np")
    np.testing.assert_allclose(first.pixel_values, reference_pixels["pixel_values"], atol=1e-6)
    np.testing.assert_array_equal(first.image_grid_thw, reference_pixels["image_grid_thw"])
    assert [im.size for im in first.images[0]] == [(first.image_grid_thw[0, 2] * 14, first.image_grid_thw[0, 1] * 14)]


def test_constitution_placement(records, processor, constitutions):
    tok = processor.tokenizer
    record = records[1]
    rule = constitutions[record.category]
    student = render_prompt(tok, build_messages(record))
    system = render_prompt(tok, build_messages(record, constitution=rule))
    user = render_prompt(tok, build_messages(record, constitution=rule, config=PromptConfig(constitution_placement="user")))
    assert rule not in student
    assert f"<|im_start|>system\nYou are a helpful assistant.\n\n{rule}<|im_end|>" in system
    assert f"<|vision_end|>{rule}\n\n{record.query}<|im_end|>" in user
    # the two prompts differ only by the constitution
    assert system.replace(f"\n\n{rule}", "") == student
    bare = render_prompt(tok, build_messages(record, constitution=rule, config=PromptConfig(system_prompt=None)))
    assert bare.startswith(f"<|im_start|>system\n{rule}<|im_end|>")
    with pytest.raises(ValueError, match="constitution_placement"):
        PromptConfig(constitution_placement="assistant")


def test_shuffling_is_deterministic_and_per_epoch(records, processor, constitutions):
    def order(seed):
        config = PipelineConfig(batch_size=5, max_prompt_len=512, seed=seed, num_epochs=2)
        return ids_of(PromptDataset(records, processor, constitutions, config))

    a, b, c = order(3), order(3), order(4)
    assert a == b and a != c
    epoch0, epoch1 = sum(a[:2], []), sum(a[2:], [])
    assert sorted(epoch0) == sorted(epoch1) == sorted(r.id for r in records)
    assert epoch0 != epoch1
    assert list(epoch_permutation(10, 3, 0)) == [int(x[1:]) for x in epoch0]


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(records, processor, constitutions):
    config = PipelineConfig(batch_size=3, max_prompt_len=512, seed=7, num_epochs=2)
    dataset = PromptDataset(records, processor, constitutions, config)
    full = list(dataset.iterator())
    iterator = dataset.iterator()
    consumed = [next(iterator) for _ in range(2)]
    state = json.loads(json.dumps(iterator.get_state()))  # survives a JSON checkpoint
    restored = PromptDataset(records, processor, constitutions, config).iterator()
    restored.set_state(state)
    rest = list(restored)
    assert ids_of(consumed) + ids_of(rest) == ids_of(full)
    np.testing.assert_array_equal(rest[0].input_ids, full[2].input_ids)
    np.testing.assert_array_equal(rest[-1].pixel_values, full[-1].pixel_values)


def test_length_filter_counts_and_buckets(records, processor, constitutions):
    lengths = PromptDataset(records, processor, constitutions, PipelineConfig(batch_size=1, max_prompt_len=4096)).lengths
    limit = sorted(max(l) for l in lengths)[6]
    config = PipelineConfig(batch_size=2, max_prompt_len=limit, drop_remainder=False)
    dataset = PromptDataset(records, processor, constitutions, config)
    assert dataset.stats == {"records": 10, "bad_images": 0, "too_long": 3, "kept": 7}
    assert all(max(l) <= limit for l in dataset.lengths)
    assert all(b.input_ids.shape[1] == limit for b in dataset)  # no buckets: pad to the limit
    shortest = min(max(l) for l in lengths)  # the error names the knob and the value that keeps one prompt
    with pytest.raises(DataError, match=rf"all 10 usable prompts are longer than max_prompt_len=8 .*has {shortest}\); "
                                        rf"raise data.max_prompt_len \(--set data.max_prompt_len={shortest}\)"):
        PromptDataset(records, processor, constitutions, PipelineConfig(batch_size=1, max_prompt_len=8))
    with pytest.raises(ValueError, match="pad_buckets"):
        PipelineConfig(batch_size=1, max_prompt_len=64, pad_buckets=(128,))


def test_bad_images_are_skipped_counted_and_bounded(records, processor, constitutions, tmp_path):
    broken = records[2].images[0]
    broken.write_bytes(broken.read_bytes()[:200])  # header fine, pixels truncated
    missing = SafetyRecord("gone", (tmp_path / "nope.png",), "q", "hate")
    lenient = PipelineConfig(batch_size=2, max_prompt_len=512, shuffle=False, drop_remainder=False,
                             max_bad_fraction=0.2)
    dataset = PromptDataset(records + [missing], processor, constitutions, lenient)
    assert dataset.stats["bad_images"] == 1 and dataset.stats["kept"] == 10
    iterator = dataset.iterator()
    seen = sum(ids_of(iterator), [])
    assert "r2" not in seen and len(seen) == 9 and iterator.bad_images_seen == 1
    strict = PipelineConfig(batch_size=2, max_prompt_len=512, max_bad_fraction=0.05)
    with pytest.raises(DataError, match=r"1 of 11 records have bad images"):
        PromptDataset(records + [missing], processor, constitutions, strict)
    # construction passes (headers are fine) but decoding during the epoch exceeds the rate
    mid = PipelineConfig(batch_size=2, max_prompt_len=512, shuffle=False, max_bad_fraction=0.05)
    with pytest.raises(DataError, match="max_bad_fraction"):
        list(PromptDataset(records, processor, constitutions, mid))


def test_process_shards_partition_every_epoch(records, processor, constitutions):
    shards = []
    for index in range(2):
        config = PipelineConfig(batch_size=5, max_prompt_len=512, seed=1, process_index=index, process_count=2)
        shards.append(sum(ids_of(PromptDataset(records, processor, constitutions, config)), []))
    assert set(shards[0]).isdisjoint(shards[1]) and len(shards[0] + shards[1]) == 10


def test_image_loading_modes_and_exif(tmp_path):
    palette = Image.new("P", (3, 2))
    palette.putpalette([255, 0, 0] * 256)
    assert load_image(palette).getpixel((0, 0)) == (255, 0, 0)
    gray = Image.new("L", (3, 2), 128)
    assert load_image(gray).getpixel((1, 1)) == (128, 128, 128)
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    assert [load_image(deep).getpixel(xy) for xy in [(0, 0), (1, 1)]] == [(0, 0, 0), (255, 255, 255)]
    assert load_image(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (40, 10)).save(tmp_path / "r.jpg", exif=exif)
    assert image_size(tmp_path / "r.jpg") == (40, 10)  # (height, width) as displayed
    assert load_image(tmp_path / "r.jpg").size == (10, 40)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(ImageError, match="cannot read image header"):
        image_size(tmp_path / "junk.png")


@pytest.mark.parametrize("response", ["It is not safe: the heater can ignite the curtain.", "  spaced\n\nlines 42 🔥", "ok"])
def test_encode_exchange_equals_whole_conversation(records, processor, constitutions, response):
    from caspo_jax.data.prompts import encode_exchange

    record = records[3]
    image = load_image(record.images[0])
    rule = constitutions[record.category]
    for constitution in (None, rule):
        exchange = encode_exchange(processor, record, [image], response, constitution=constitution)
        messages = build_messages(record, constitution=constitution) + [{"role": "assistant", "content": response}]
        text = processor.apply_chat_template(messages, tokenize=False)
        whole = processor(text=[text], images=[image], return_tensors="np")["input_ids"][0]
        np.testing.assert_array_equal(exchange.input_ids, whole)
        target = exchange.input_ids[exchange.loss_mask == 1]
        assert processor.tokenizer.decode(target) == response + "<|im_end|>"
        assert exchange.loss_mask[: exchange.prompt_length].sum() == 0


def test_an_image_failing_every_epoch_is_warned_and_counted_once(records, processor, constitutions, caplog):
    broken = records[4].images[0]
    broken.write_bytes(broken.read_bytes()[:200])  # header fine, pixels truncated
    config = PipelineConfig(batch_size=3, max_prompt_len=512, shuffle=False, drop_remainder=False, num_epochs=3,
                            max_bad_fraction=0.2)
    iterator = PromptDataset(records, processor, constitutions, config, source="prompts.jsonl").iterator()
    with caplog.at_level(logging.WARNING, logger="caspo_jax.data.pipeline"):
        seen = sum(ids_of(iterator), [])
    assert len(seen) == 3 * 9 and "r4" not in seen
    assert iterator.bad_images_seen == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("prompts.jsonl: skipping 1 of 10 records with bad images; first: record 'r4'")
    # the count survives a checkpoint of the iterator's position
    restored = PromptDataset(records, processor, constitutions, config).iterator()
    restored.set_state(json.loads(json.dumps(iterator.get_state())))
    assert restored.bad_images_seen == 1
