"""The train step's log-probs (written against the Qwen2.5-VL API) run unchanged on Qwen3-VL:
``encode_images`` output gathered by rows carries the DeepStack maps along."""

import numpy as np

import jax

from caspo_jax.models import load_pretrained
from caspo_jax.tiny import qwen3_vl as tq
from caspo_jax.step import build_train_batch, compute_logprobs

TOL = 2e-5  # float32, padded batch vs unpadded single sequence


def test_compute_logprobs_equals_direct_forward(tmp_path):
    tq.save_hf_checkpoint(tmp_path, "vision", seed=2)
    model, params = load_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    grid, P, G, T = (1, 4, 4), 2, 2, 6
    rows = [rng.integers(0, 500, 2).tolist() + tq.image_tokens(grid) + rng.integers(0, 500, 3 + 2 * p).tolist()
            for p in range(P)]
    L = max(map(len, rows))
    ids, mask = np.zeros((P, L), np.int32), np.zeros((P, L), np.int32)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    patches = grid[1] * grid[2]
    pixels = rng.standard_normal((P * patches, tq.PATCH_DIM)).astype(np.float32)
    r_ids = rng.integers(0, 500, (P * G, T)).astype(np.int32)
    lengths = np.array([6, 3, 5, 6])
    r_mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    batch = build_train_batch(model, ids, mask, r_ids, r_mask, np.repeat(np.arange(P), G), pixel_values=pixels,
                              image_grid_thw=np.asarray([grid] * P))
    logp = np.asarray(compute_logprobs(model, params, batch)[0])
    for row in range(P * G):
        p, n = row // G, lengths[row]
        seq = np.concatenate([ids[p][mask[p] > 0], r_ids[row][:n]])
        logits = model.forward(params, seq[None], None, pixels[p * patches:(p + 1) * patches], np.asarray([grid]))
        direct = np.asarray(jax.nn.log_softmax(logits[0], -1))
        start = len(seq) - n
        expected = direct[start - 1 + np.arange(n), seq[start:]]
        np.testing.assert_allclose(logp[row, :n], expected, atol=TOL)
        assert np.all(logp[row, n:] == 0)
