"""The TPU path of ``attn_implementation="auto"`` on this CPU: the Pallas TPU flash kernel
run in Pallas's TPU interpret mode (``force_tpu_interpret_mode``: the same kernel body,
block specs and custom backward, executed by the interpreter) against XLA's masked
attention, for causal attention with left padding (the rollout and train batches' layout)
given to the kernel as segment ids, and grouped KV heads. Values and gradients of the
valid rows, float32: within 1e-5 and 1e-4 (measured 4.8e-7 and 7.6e-6; the kernel's
blockwise online softmax sums in another order)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from caspo_jax.models.common.attention import TPU_BLOCK, pallas_flash_causal
from caspo_jax.models.common.layers import attention


def test_pallas_flash_causal_with_padding_equals_xla_in_interpret_mode():
    B, L, N, K, H = 2, 2 * TPU_BLOCK, 4, 2, 64
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, L, heads, H)), jnp.float32) for heads in (N, K, K))
    valid = np.ones((B, L), bool)
    valid[1, :37] = False  # left padding across a block boundary's worth of keys
    mask = jnp.asarray(np.tril(np.ones((L, L), bool))[None, None] & valid[:, None, None, :])
    weight = jnp.asarray(valid[:, :, None, None], jnp.float32)  # padding rows are meaningless in both

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * weight).sum()

    def flash(q, k, v):
        return pallas_flash_causal(q, k, v, mask)

    def xla(q, k, v):
        return attention(q, k, v, mask, None, "causal")

    with pltpu.force_tpu_interpret_mode():
        got = flash(q, k, v)
        got_grads = jax.grad(loss(flash), argnums=(0, 1, 2))(q, k, v)
    want = xla(q, k, v)
    want_grads = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=0)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=0, err_msg=f"d loss / d {name}")
    # the check has teeth: without the padding segments, valid queries would see padding keys
    with pltpu.force_tpu_interpret_mode():
        unpadded = pallas_flash_causal(q, k, v, jnp.asarray(np.tril(np.ones((L, L), bool))[None, None]
                                                            .repeat(B, 0)))
    assert np.abs(np.asarray(unpadded)[1][valid[1]] - np.asarray(want)[1][valid[1]]).max() > 1e-2
