"""The host loops (Python on the host, around the jitted device step in ``caspo_jax.step``):
`caspo train` (Algorithm 1), `caspo sft`, `caspo dpo`, plots and sweeps.

Modules: config (typed config, YAML, --set), setup (policy + processor), data (files,
exchanges), checkpoint (orbax), metrics (JSONL/TensorBoard/MFU), runtime (run dir,
signals, export), sft_dpo (SFT/DPO), presets (named run configs), caspo (the RL loop), evaluate, plot, sweep.
Heavy modules are imported on use, so `import caspo_jax.loop` stays cheap.
"""

from caspo_jax.loop.config import ConfigError, TrainConfig, config_from_dict, load_config

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config"]
