"""The trainer's side of bad input: data.max_bad_fraction reaches the loaders, and a damaged
checkpoint's fallback warning names what is damaged."""

import logging
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from caspo_jax.demo.task import make_split, write_split
from caspo_jax.tiny.tokenizer import build_tiny_processor
from caspo_jax.loop.checkpoint import RunCheckpointer
from caspo_jax.loop.config import load_config
from caspo_jax.loop.data import DataFiles, encode_exchanges, prompt_dataset


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(make_split(9, 0, "train"), tmp_path_factory.mktemp("data"), "train")


def with_bad_line(path: Path, name: str) -> Path:
    lines = path.read_text().splitlines()
    bad = path.with_name(name)
    bad.write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    return bad


def test_data_max_bad_fraction_reaches_the_prompt_loader(split, caplog):
    bad = with_bad_line(split["records"], "one_bad.jsonl")
    files = DataFiles(bad, None, None, None, split["constitutions"], False)
    processor = build_tiny_processor()
    strict = load_config(preset="tiny-cpu", overrides=["algo.prompts_per_step=4"])
    with pytest.raises(ValueError, match=r"one_bad.jsonl:3: not valid JSON"):
        prompt_dataset(strict, files, processor)
    lenient = load_config(preset="tiny-cpu", overrides=["algo.prompts_per_step=4", "data.max_bad_fraction=0.1"])
    with caplog.at_level(logging.WARNING):
        dataset, _ = prompt_dataset(lenient, files, processor)
    assert len(dataset) == 9 and dataset.config.max_bad_fraction == 0.1
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "skipped 1 of 10 invalid records" in skipped[0]


def test_max_bad_fraction_reaches_the_exchange_loader(split):
    bad = with_bad_line(split["sft"], "sft_one_bad.jsonl")
    processor = build_tiny_processor()
    kwargs = dict(constitutions_path=split["constitutions"], with_constitution=True, pairs=False,
                  max_prompt_len=256, max_response_len=16)
    with pytest.raises(ValueError, match=r"sft_one_bad.jsonl:3: not valid JSON"):
        encode_exchanges(bad, processor, **kwargs)
    n_good = len(split["sft"].read_text().splitlines())
    assert len(encode_exchanges(bad, processor, max_bad_fraction=0.2, **kwargs)) == n_good


def _saved_run(directory: Path):
    checkpointer = RunCheckpointer(directory, keep_last=3)
    state = {"w": jnp.arange(1000.0), "b": jnp.ones(3)}
    for step in (1, 2):
        checkpointer.save(step, {"w": state["w"] * step, "b": state["b"]}, {"step": step})
    checkpointer.wait()
    return checkpointer, state


def _fallback_warning(checkpointer, state) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, restored, _ = checkpointer.restore_latest(state)
    assert step == 1
    np.testing.assert_array_equal(restored["w"], np.arange(1000.0))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    return messages[0]


def test_fallback_warning_names_the_damaged_metadata_file(tmp_path):
    checkpointer, state = _saved_run(tmp_path / "c")
    damaged = tmp_path / "c" / "2" / "extras" / "metadata"
    damaged.write_text('{"step": ')
    message = _fallback_warning(checkpointer, state)
    assert f"damaged file {damaged} (not valid JSON)" in message and "falling back" in message
    checkpointer.close()


def test_fallback_warning_names_the_damaged_array_not_tensorstore_spec(tmp_path):
    checkpointer, state = _saved_run(tmp_path / "c")
    data_files = [p for p in (tmp_path / "c" / "2" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(data_files, key=lambda p: p.stat().st_size)  # the 1000-float array's chunk
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    message = _fallback_warning(checkpointer, state)
    assert f"array 'w' in {tmp_path / 'c' / '2' / 'state'} is damaged" in message
    assert "TensorStore" not in message and "driver" not in message and len(message) < 600
    checkpointer.close()
