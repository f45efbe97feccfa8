"""Building an outcome reward from a config mapping (what the trainer's YAML holds).

    {"kind": "reward_model", "path": "runs/rm/export", "dtype": "bfloat16", "batch_size": 32}
    {"kind": "judge", "base_url": "http://host:8000/v1", "model": "Qwen3-VL-32B",
     "api_key_env": "JUDGE_API_KEY", "cache_dir": "runs/judge-cache"}
    {"kind": "function", "target": "my_pkg.rewards:length_penalty"}

"reward_model" is the paper's RM_phi (Algorithm 1 line 5, eq. 7): the export of `caspo
rm`, and the paper presets' reward. The judge scores without the dataset's hazard
reference unless the config says `"use_reference": true`, an explicit opt-in (the
reference is privileged information RM_phi never sees; see `JudgeReward`).

Kinds are a registry: `caspo_jax.rewards` registers "reward_model" with
`register_reward_kind` (lazily, so importing rewards does not start JAX). The API key
itself is never part of the config, only the name of the variable that holds it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from caspo_jax.llm.client import ClientConfig
from caspo_jax.rewards.base import OutcomeReward
from caspo_jax.rewards.function import FunctionReward
from caspo_jax.rewards.judge import JudgeReward

__all__ = ["build_reward", "register_reward_kind", "reward_kinds"]

_BUILDERS: dict[str, Callable[[dict[str, Any]], OutcomeReward]] = {}


def register_reward_kind(kind: str, builder: Callable[[dict[str, Any]], OutcomeReward]) -> None:
    """Makes `build_reward({"kind": kind, ...})` call `builder(remaining fields)`."""
    _BUILDERS[kind] = builder


def reward_kinds() -> list[str]:
    return sorted(_BUILDERS)


def build_reward(spec: Mapping[str, Any]) -> OutcomeReward:
    fields = dict(spec)
    kind = fields.pop("kind", None)
    if kind not in _BUILDERS:
        raise ValueError(f"reward kind {kind!r} is not one of {reward_kinds()}; set `kind`")
    if any("key" in k.lower() and k != "api_key_env" for k in fields):
        raise ValueError(
            "reward config must not hold API keys; put the key in an environment variable "
            "and name it with `api_key_env`"
        )
    return _BUILDERS[kind](fields)


def _build_judge(fields: dict[str, Any]) -> OutcomeReward:
    judge_options = {k: fields.pop(k) for k in ("use_reference", "json_mode", "progress", "name", "image_max_pixels") if k in fields}
    if not isinstance(judge_options.get("use_reference", False), bool):
        raise ValueError(f"judge reward field use_reference={judge_options['use_reference']!r} must be true or "
                         "false (false, the default, keeps the hazard reference from the judge)")
    known = {f.name for f in dataclasses.fields(ClientConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown judge reward fields {unknown}; allowed: {sorted(known)} and use_reference, "
                         "json_mode, progress, name, image_max_pixels")
    return JudgeReward(ClientConfig(**fields), **judge_options)


def _build_function(fields: dict[str, Any]) -> OutcomeReward:
    target = fields.pop("target", None)
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"function reward needs target='module:callable', got {target!r}")
    module_name, attr = target.split(":", 1)
    fn = getattr(importlib.import_module(module_name), attr)
    return FunctionReward(fn, name=fields.pop("name", attr), batched=bool(fields.pop("batched", False)))


register_reward_kind("judge", _build_judge)
register_reward_kind("function", _build_function)
