"""Test-session set-up shared by every test.

JAX multi-device code is tested on CPU with 8 simulated devices; XLA reads the flag
once, at backend start, so it is set here before anything imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
