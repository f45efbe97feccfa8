"""A subprocess rollout worker runs under ``WorkerSpec.env`` from its first import.

JAX reads ``JAX_PLATFORMS`` once, when it is imported, and the worker's modules import JAX
at their top; so the pool must set the variables before it unpickles anything of
``caspo_jax`` (``caspo_jax.process_env.call_with_env``). With the spec handed straight to
the pool's initializer, the worker would import JAX first and silently run on the default
platform."""

import pytest

from caspo_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from caspo_jax.remote import RemoteRolloutEngine, WorkerSpec
from caspo_jax.tiny import models as tm


def test_subprocess_worker_env_is_set_before_jax_is_imported():
    model = Qwen2_5_VL(Qwen2_5_VLConfig.from_dict(tm.hf_config_dict("text")))
    spec = WorkerSpec.jax(model, env={"JAX_PLATFORMS": "no_such_platform"})
    with RemoteRolloutEngine.subprocess(model, spec, timeout=300) as remote:
        with pytest.raises(RuntimeError, match="no_such_platform"):
            remote.info()  # the worker asks JAX for its backend: the one named in spec.env
