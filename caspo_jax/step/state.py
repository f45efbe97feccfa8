"""TrainState (step, float32 master params, optimiser state) and its placement on a mesh."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from caspo_jax.models.common import weights
from caspo_jax.sharding import LogicalRules, param_shardings
from caspo_jax.step.batch import TrainBatch
from caspo_jax.step.optimizer import StepConfig, make_optimizer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array
    params: object  # the model's typed weights (``caspo_jax.models.common.weights``)
    opt_state: optax.OptState


def init_state(params, cfg: StepConfig) -> TrainState:
    """Step 0 with float32 master weights (cast if loaded in another dtype)."""
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(cfg).init(params))


def state_shardings(model, cfg: StepConfig, mesh: Mesh, rules: LogicalRules = LogicalRules()) -> TrainState:
    """NamedShardings of a TrainState: parameters and every parameter-shaped optimiser leaf
    (AdamW's mu and nu) follow the parameters' logical axes; scalars are replicated."""
    p_shard = param_shardings(model.param_table(), mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = make_optimizer(cfg)
    abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                                   _shape_tree(model))
    abstract_opt = jax.eval_shape(opt.init, abstract_params)
    opt_shard = optax.tree_map_params(opt, lambda _, s: s, abstract_opt, p_shard,
                                      transform_non_params=lambda _: replicated,
                                      is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(replicated, p_shard, opt_shard)


def _shape_tree(model):
    """The model's typed weights as float32 ShapeDtypeStructs (no memory)."""
    return weights.build(model.param_table(), lambda spec: jax.ShapeDtypeStruct(spec.shape, jnp.float32))


def shard_state(state: TrainState, shardings: TrainState) -> TrainState:
    return jax.device_put(state, shardings)


def batch_shardings(batch: TrainBatch, mesh: Mesh, rules: LogicalRules = LogicalRules()) -> TrainBatch:
    """Rows over the ``batch`` logical axis (default (data, fsdp)); position ids' row axis is
    their second; image inputs are replicated (any row may use any image)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def rows(x, axis=0):
        if x is None:
            return None
        axes = [None] * x.ndim
        axes[axis] = "batch"
        return NamedSharding(mesh, rules.spec(axes, x.shape, mesh))

    def layout(seq):
        if seq is None:
            return None
        return dataclasses.replace(seq, input_ids=rows(seq.input_ids), attention_mask=rows(seq.attention_mask),
                                   position_ids=rows(seq.position_ids, 1), image_slot=rows(seq.image_slot))

    def rep(x):
        return None if x is None else replicated

    return dataclasses.replace(
        batch, student=layout(batch.student), teacher=layout(batch.teacher), response_ids=rows(batch.response_ids),
        response_mask=rows(batch.response_mask), pixel_values=rep(batch.pixel_values),
        image_embeds=rep(batch.image_embeds), old_logp=rows(batch.old_logp), ref_logp=rows(batch.ref_logp),
        advantages=rows(batch.advantages), rollout_logp=rows(batch.rollout_logp))


def shard_batch(batch: TrainBatch, mesh: Mesh, rules: LogicalRules = LogicalRules()) -> TrainBatch:
    """``batch`` placed on ``mesh`` (rows split over the batch axes)."""
    return jax.device_put(batch, batch_shardings(batch, mesh, rules))
