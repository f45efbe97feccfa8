"""OOD-MMSafe-style evaluation (imported as ``caspo_jax.evals``)."""
