"""The CASPO trainer: `caspo train` (Algorithm 1), `caspo sft`, `caspo dpo`, plots and sweeps.

Modules: config (typed config, YAML, --set), setup (policy + processor), data (files,
exchanges), checkpoint (orbax), metrics (JSONL/TensorBoard/MFU), runtime (run dir,
signals, export), exchange (SFT/DPO), caspo (the RL loop), evaluate, plot, sweep.
Heavy modules are imported on use, so `import caspo_jax.trainer` stays cheap.
"""

from caspo_jax.trainer.config import ConfigError, TrainConfig, config_from_dict, load_config

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config"]
