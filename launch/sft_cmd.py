"""`caspo sft`: supervised fine-tuning on (image, query, response), loss on response tokens only."""

from __future__ import annotations

import argparse

from caspo_jax.launch.run_args import add_config_arguments, resolve, run_stage
from caspo_jax.loop.sft_dpo import run_sft


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "runs/sft")


def run(args: argparse.Namespace) -> int:
    cfg, status = resolve(args)
    if status is not None:
        return status
    return run_stage(lambda: run_sft(cfg, args.out, resume=args.resume))
