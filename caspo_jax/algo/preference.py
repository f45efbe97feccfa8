"""Pairwise preference losses: DPO (the static-alignment baseline) and the reward
model's eq. 7 (Bradley-Terry + lambda * MSE).

Both are -log sigmoid of a chosen-minus-rejected margin: for DPO the margin is beta
times the difference of the two responses' log-ratios to a frozen reference policy
(Rafailov et al.), for the reward model the difference of the two scalar rewards.
Used by `caspo dpo` (`caspo_jax/loop/sft_dpo.py`) and `caspo rm`
(`caspo_jax/loop/reward_model.py`).
"""

import jax
import jax.numpy as jnp


def dpo_loss(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, mask_BxT: jax.Array, beta: float):
    """DPO over B = 2P rows: the first P chosen, the last P rejected (same prompts, same order).

    -mean log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))
    with each sequence's log-prob summed over its response tokens (mask_BxT 1; logp and
    ref_logp 0 where the mask is 0). Returns (loss, metrics): loss, reward_accuracy (share
    of pairs with a positive margin), reward_margin, chosen_reward, rejected_reward (the
    beta-scaled log-ratios, averaged).
    """
    mask = mask_BxT.astype(jnp.float32)
    seq = jnp.sum(logp_BxT * mask, axis=1)
    ref = jnp.sum(ref_logp_BxT * mask, axis=1)
    P = seq.shape[0] // 2
    chosen = seq[:P] - ref[:P]
    rejected = seq[P:] - ref[P:]
    margin = beta * (chosen - rejected)
    loss = -jnp.mean(jax.nn.log_sigmoid(margin))
    return loss, {"loss": loss, "reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
                  "reward_margin": jnp.mean(margin), "chosen_reward": beta * jnp.mean(chosen),
                  "rejected_reward": beta * jnp.mean(rejected)}


def rm_loss(r_B, bt_mask_K, mse_mask_B, target_B, mse_weight: float):
    """Eq. 7 on B = 2K rewards; returns (loss, metrics).

    L = -E_BT[log sigmoid(r(y_w) - r(y_l))] + mse_weight * E_MSE[(r(y) - s(y))^2], each
    expectation the mean over its own items (0 when the batch has none). Pairs: slot k
    (bt_mask_K[k] = 1) is (r[k], r[K + k]) = (chosen, rejected); MSE rows: mse_mask_B = 1,
    target_B = s. metrics: loss, bt_loss, mse, accuracy (pairs with r(y_w) > r(y_l)),
    margin (mean r(y_w) - r(y_l)), pairs, mse_rows.
    """
    K = bt_mask_K.shape[0]
    bt_mask = bt_mask_K.astype(jnp.float32)
    mse_mask = mse_mask_B.astype(jnp.float32)
    margin = r_B[:K] - r_B[K:]
    n_bt = jnp.sum(bt_mask)
    n_mse = jnp.sum(mse_mask)
    bt = -jnp.sum(bt_mask * jax.nn.log_sigmoid(margin)) / jnp.maximum(n_bt, 1.0)
    sq = jnp.sum(mse_mask * (r_B - target_B) ** 2) / jnp.maximum(n_mse, 1.0)
    loss = bt + mse_weight * sq
    accuracy = jnp.sum(bt_mask * (margin > 0)) / jnp.maximum(n_bt, 1.0)
    return loss, {"loss": loss, "bt_loss": bt, "mse": sq, "accuracy": accuracy,
                  "margin": jnp.sum(bt_mask * margin) / jnp.maximum(n_bt, 1.0), "pairs": n_bt, "mse_rows": n_mse}
