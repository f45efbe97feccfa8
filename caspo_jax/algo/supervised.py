"""The SFT loss (the paper's stage before CASPO, appendix B.1): mean negative
log-likelihood of the response tokens.

Prompt, image and padding tokens carry no loss: the mask selects the response. Used by
`caspo sft` (`caspo_jax/loop/sft_dpo.py`).
"""

import jax
import jax.numpy as jnp


def sft_loss(logp_BxT: jax.Array, mask_BxT: jax.Array):
    """Mean NLL over response tokens: -sum(logp * mask) / sum(mask); (loss, metrics).

    logp_BxT: log-probs of the target tokens (0 where the mask is 0, so padding NaN
    never reaches the product); mask_BxT: 1 on response tokens. No token at all gives 0.
    metrics: loss and ppl = exp(loss).
    """
    mask = mask_BxT.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    nll = -jnp.sum(logp_BxT * mask) / n
    return nll, {"loss": nll, "ppl": jnp.exp(nll)}
