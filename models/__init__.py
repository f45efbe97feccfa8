"""Functional Flax ports of Qwen-VL models (imported as ``caspo_jax.models``)."""
