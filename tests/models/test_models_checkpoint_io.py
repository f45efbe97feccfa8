"""Checkpoint I/O: transformers-written checkpoints in, HF-compatible checkpoints out."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jax
import jax.numpy as jnp

from caspo_jax.models import CheckpointError, load_pretrained, save_pretrained
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL
from caspo_jax.tiny import models as tm


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_text")
    tm.save_hf_checkpoint(path, "text", seed=2)
    return path


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return load_pretrained(hf_dir)


def assert_same_params(a, b):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_save_reload_in_transformers_identical(hf_dir, loaded, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, params = loaded
    save_pretrained(model, params, tmp_path)
    original = load_file(hf_dir / "model.safetensors")
    written = load_file(tmp_path / "model.safetensors")
    assert sorted(written) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(written[name], original[name], err_msg=name)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir)
    ref_state = reference.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    assert reloaded.config.to_dict()["text_config"]["rope_parameters"] == \
        reference.config.to_dict()["text_config"]["rope_parameters"]
    assert reloaded.config.vision_config.fullatt_block_indexes == reference.config.vision_config.fullatt_block_indexes


def test_sharded_checkpoints_both_directions(hf_dir, loaded, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, params = loaded
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir)
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="100KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    _, from_sharded = load_pretrained(tmp_path / "hf_sharded")
    assert_same_params(from_sharded, params)

    from caspo_jax.models.common.checkpoint import save_params
    save_params(params, model.param_table(), tmp_path / "ours_sharded", max_shard_bytes=100_000)
    shutil.copy(hf_dir / "config.json", tmp_path / "ours_sharded" / "config.json")
    index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ours_sharded")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, hf.state_dict()[name]), name


def test_transformers5_key_layout_and_flat_config(hf_dir, loaded, tmp_path):
    """``model.language_model.*`` / ``model.visual.*`` keys and a pre-v5 flat config.json."""
    _, params = loaded
    tensors = load_file(hf_dir / "model.safetensors")
    renamed = {}
    for name, array in tensors.items():
        if name.startswith("model."):
            name = "model.language_model." + name[len("model."):]
        elif name.startswith("visual."):
            name = "model." + name
        renamed[name] = array
    save_file(renamed, tmp_path / "model.safetensors")
    nested = json.loads((hf_dir / "config.json").read_text())
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    flat.update(text, rope_theta=rope["rope_theta"],
                rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]}, model_type="qwen2_5_vl")
    (tmp_path / "config.json").write_text(json.dumps(flat))
    model, params2 = load_pretrained(tmp_path)
    assert model.config.text.mrope_section == tuple(rope["mrope_section"])
    assert model.config == load_pretrained(hf_dir)[0].config
    assert_same_params(params2, params)


def _copy_with(hf_dir, tmp_path, mutate):
    tensors = load_file(hf_dir / "model.safetensors")
    mutate(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    return tmp_path


def test_missing_and_unexpected_keys_are_listed(hf_dir, tmp_path):
    def mutate(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.7.extra.weight"] = np.zeros(3, np.float32)

    path = _copy_with(hf_dir, tmp_path, mutate)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    message = str(err.value)
    assert str(path) in message
    assert "model.layers.1.mlp.up_proj.weight" in message and "model.layers.7.extra.weight" in message


def test_shape_mismatch_names_file_and_key(hf_dir, tmp_path):
    def mutate(t):
        t["model.norm.weight"] = np.ones(7, np.float32)

    path = _copy_with(hf_dir, tmp_path, mutate)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.norm\.weight.*\(7,\)"):
        load_pretrained(path)


def test_pickle_checkpoints_are_refused(hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        load_pretrained(tmp_path)


def test_tied_embeddings_roundtrip_and_forward(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = tm.hf_model("text", seed=4, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    model, params = load_pretrained(tmp_path / "hf")
    assert model.config.tie_word_embeddings and not hasattr(params.text, "lm_head")
    batch = tm.make_batch([[12], [5]], seed=1)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(batch.input_ids),
                      attention_mask=torch.tensor(batch.attention_mask)).logits.numpy()
    got = np.asarray(model.forward(params, batch.input_ids, batch.attention_mask))
    valid = batch.attention_mask.astype(bool)
    assert np.abs(got - expected)[valid].max() <= 1e-4
    save_pretrained(model, params, tmp_path / "ours")
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert reloaded.config.tie_word_embeddings
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, hf.state_dict()[name]), name


def test_dtype_and_random_init_follow_the_table(hf_dir, loaded):
    model, params = loaded
    _, bf16 = load_pretrained(hf_dir, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    init = jax.eval_shape(Qwen2_5_VL(model.config).init, jax.random.key(0))
    shapes = jax.tree.map(lambda x: x.shape, init)
    assert shapes == jax.tree.map(lambda x: x.shape, params)
    for spec in model.param_table():
        assert len(spec.axes) == len(spec.shape)


# -- directories that ask for their own code ----------------------------------------------------

def _with_custom_code(hf_dir, target, file="config.json", **keys):
    """A copy of the tiny export whose `file` declares custom code, with the module it names."""
    from caspo_jax.tiny.tokenizer import build_tiny_processor, save_tiny_processor

    shutil.copytree(hf_dir, target)
    save_tiny_processor(build_tiny_processor(), target)
    data = json.loads((target / file).read_text())
    (target / file).write_text(json.dumps({**data, **keys}))
    (target / "modeling_custom.py").write_text("raise SystemExit('a checkpoint ran its own code')\n")
    return target


def test_custom_code_declarations_name_file_and_key(hf_dir, tmp_path):
    from caspo_jax.models.common.checkpoint import custom_code_declarations

    assert custom_code_declarations(hf_dir) == []
    path = _with_custom_code(hf_dir, tmp_path / "a", auto_map={"AutoModel": "modeling_custom.M"},
                             trust_remote_code=False)  # an explicit "no" asks for nothing
    assert custom_code_declarations(path) == ["config.json: auto_map"]
    path = _with_custom_code(hf_dir, tmp_path / "b", "preprocessor_config.json", trust_remote_code=True)
    assert custom_code_declarations(path) == ["preprocessor_config.json: trust_remote_code"]


def test_load_hf_checkpoint_refuses_custom_code_unless_told_and_never_runs_it(hf_dir, tmp_path):
    from caspo_jax.errors import UserError
    from caspo_jax.hf_checkpoint import load_hf_checkpoint
    from caspo_jax.models.common.checkpoint import UntrustedCheckpointError

    path = _with_custom_code(hf_dir, tmp_path / "c", "tokenizer_config.json",
                             auto_map={"AutoTokenizer": ["modeling_custom.T", None]})
    with pytest.raises(UntrustedCheckpointError, match=r"tokenizer_config.json: auto_map.*modeling_custom.py.*"
                                                       r"--ignore-custom-code") as err:
        load_hf_checkpoint(path)
    assert isinstance(err.value, UserError) and isinstance(err.value, CheckpointError) and err.value.exit_code == 2
    model, params, processor = load_hf_checkpoint(path, ignore_custom_code=True)  # weights only; SystemExit if run
    assert model.config == load_pretrained(hf_dir)[0].config
    assert type(processor.tokenizer).__module__.startswith("transformers.")


def test_checkpoint_errors_are_user_errors_on_one_line(hf_dir, tmp_path):
    from caspo_jax.errors import UserError

    path = _copy_with(hf_dir, tmp_path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(UserError) as err:
        load_pretrained(path)
    assert "\n" not in str(err.value) and "model.norm.weight" in str(err.value)
