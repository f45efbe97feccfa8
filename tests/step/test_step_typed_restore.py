"""Run checkpoints written before the weights were typed (state.params nested dicts) restore
into the typed TrainState: orbax matches the tree by key names, and a node's field names
are the old dict keys."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from caspo_jax.loop.checkpoint import RunCheckpointer
from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from caspo_jax.rewards.reward_model import RewardHead, init_head, with_head
from caspo_jax.step import StepConfig, TrainState, init_state, make_optimizer
from caspo_jax.tiny import models as tm


def old_optimizer(cfg: StepConfig) -> optax.GradientTransformation:
    """make_optimizer with freeze_vision as it was over nested dicts (its labels: a frozen copy)."""
    def labels(params: dict) -> dict:
        return {key: jax.tree.map(lambda _, k=key: "frozen" if k == "vision" else "train", sub)
                for key, sub in params.items()}

    train = make_optimizer(cfg.replace(freeze_vision=False))
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


@pytest.mark.parametrize("reward_head", [False, True])
def test_nested_dict_checkpoint_restores_into_typed_state(tmp_path, reward_head):
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("text", num_layers=1)))
    cfg = StepConfig(freeze_vision=True)  # multi_transform: the labels tree must match too
    saved = model.init(jax.random.PRNGKey(1))
    fresh = model.init(jax.random.PRNGKey(2))
    if reward_head:  # the RM trainer's state: backbone + reward_head
        saved = with_head(saved, init_head(saved.text.embed.shape[1], seed=1))
        fresh = with_head(fresh, init_head(fresh.text.embed.shape[1], seed=2))
    nested = flax.serialization.to_state_dict(saved)
    assert isinstance(nested["text"]["layers"], dict)
    opt = old_optimizer(cfg)
    _, opt_state = opt.update(jax.tree.map(jnp.ones_like, nested), opt.init(nested), nested)  # non-zero moments
    state = TrainState(jnp.asarray(5, jnp.int32), nested, opt_state)

    checkpointer = RunCheckpointer(tmp_path / "ckpt")
    checkpointer.save(5, state, {"stage": "test"})
    checkpointer.wait()
    step, restored, extras = checkpointer.restore_latest(init_state(fresh, cfg))
    checkpointer.close()

    assert step == 5 and extras == {"stage": "test"}
    assert type(restored.params) is type(fresh) and type(restored.params.text.layers) is type(fresh.text.layers)
    assert jax.tree.structure(restored) == jax.tree.structure(init_state(fresh, cfg))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(restored.params.text.layers.q_kernel, nested["text"]["layers"]["q_kernel"])
    if reward_head:
        assert isinstance(restored.params.reward_head, RewardHead)
        np.testing.assert_array_equal(restored.params.reward_head.kernel, nested["reward_head"]["kernel"])
