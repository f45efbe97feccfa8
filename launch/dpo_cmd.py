"""`caspo dpo`: DPO on preference pairs against the frozen initial policy (the static baseline)."""

from __future__ import annotations

import argparse

from caspo_jax.launch.run_args import add_config_arguments, resolve, run_stage
from caspo_jax.loop.sft_dpo import run_dpo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "runs/dpo")


def run(args: argparse.Namespace) -> int:
    cfg, status = resolve(args)
    if status is not None:
        return status
    return run_stage(lambda: run_dpo(cfg, args.out, resume=args.resume))
