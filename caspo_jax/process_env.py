"""A spawned worker process's start-up: its environment variables first, then its imports.

JAX reads some variables once, when it is imported (``JAX_PLATFORMS``, ``JAX_ENABLE_X64``),
so a worker that must run under its own variables has to set them before anything imports
JAX. A process pool unpickles its initializer's arguments before calling it, and unpickling
a ``caspo_jax`` object imports that object's module -- and with it JAX. So the call travels
as pickled bytes: ``call_with_env`` sets the variables, then unpickles (this is where the
worker's modules get imported) and calls. This module imports nothing but the standard
library, and lives outside ``caspo_jax.remote`` because that package imports JAX.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping


def call_with_env(env: Mapping[str, str], pickled_call: bytes):
    """Set ``env`` in ``os.environ``, then unpickle ``(fn, args)`` from ``pickled_call`` and
    return ``fn(*args)``."""
    os.environ.update(env)
    fn, args = pickle.loads(pickled_call)
    return fn(*args)
