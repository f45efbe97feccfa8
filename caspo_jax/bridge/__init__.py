"""The weight bridge: JAX parameter pytree -> HF-named PyTorch tensors -> a rollout engine."""
