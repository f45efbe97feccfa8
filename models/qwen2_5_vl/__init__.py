"""Qwen2.5-VL as pure functions over a parameter pytree."""
