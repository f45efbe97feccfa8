"""The tiny model builders every later test uses: shapes as documented, and the port matches them."""

import numpy as np
import pytest
import torch

from caspo_jax.models import load_pretrained
from caspo_jax.tiny import models as tm


@pytest.mark.parametrize("variant, head_dim, section", [("text", 16, (2, 3, 3)), ("vllm", 32, (4, 6, 6))])
def test_variants_shapes(variant, head_dim, section, tmp_path):
    tm.save_hf_checkpoint(tmp_path, variant)
    model, params = load_pretrained(tmp_path)
    assert model.config.text.head_dim == head_dim and model.config.text.mrope_section == section
    assert params.text.embed.shape == (tm.VOCAB, model.config.text.hidden_size)


def test_vllm_variant_matches_transformers_with_an_image(tmp_path):
    hf = tm.hf_model("vllm", seed=9)
    hf.save_pretrained(tmp_path)
    model, params = load_pretrained(tmp_path)
    assert (model.config.text.hidden_size, model.config.text.num_attention_heads) == (128, 4)
    batch = tm.make_batch([[3, (1, 4, 8), 2], [6]], seed=2)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(batch.input_ids), attention_mask=torch.tensor(batch.attention_mask),
                      pixel_values=torch.tensor(batch.pixel_values), image_grid_thw=torch.tensor(batch.image_grid_thw),
                      mm_token_type_ids=torch.tensor(batch.mm_token_type_ids)).logits.numpy()
    got = np.asarray(model.forward(params, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                   batch.image_grid_thw))
    valid = batch.attention_mask.astype(bool)
    assert np.abs(got - expected)[valid].max() <= 1e-4


def test_make_batch_layout():
    batch = tm.make_batch([[2, (1, 4, 6)], [3]], pad="left")
    assert batch.input_ids.shape == (2, 2 + 1 + 6 + 1)
    assert batch.attention_mask[1].tolist() == [0] * 7 + [1] * 3
    assert batch.pixel_values.shape == (24, 3 * 2 * 14 * 14)
    assert batch.image_grid_thw.tolist() == [[1, 4, 6]]
    assert int(batch.mm_token_type_ids.sum()) == 6
