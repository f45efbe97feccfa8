"""caspo-jax: CASPO safety alignment for Qwen-VL models in JAX/Flax.

Subpackages: ``algo`` (pure loss maths), ``models`` (Flax Qwen-VL ports),
``evals`` (R/S/E judging and reports), ``launch`` (CLI, presets, launchers).
"""

__version__ = "0.1.0"
