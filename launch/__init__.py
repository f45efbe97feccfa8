"""Command line, presets and multi-host launchers (imported as ``caspo_jax.launch``)."""
