"""`caspo demo`: the built-in tiny end-to-end run (SFT -> CASPO -> risk-failure table, plots)."""

from __future__ import annotations

import argparse

from caspo_jax.launch.train_cmd import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "runs/demo")
    parser.add_argument("--quick", action="store_true", help="a smoke-sized run (seconds, for tests)")


def run(args: argparse.Namespace) -> int:
    from caspo_jax.demo.run import demo_config, run_demo
    from caspo_jax.trainer.config import ConfigError, dump_config

    try:
        cfg = demo_config(args.preset, args.config, args.overrides, quick=args.quick)
    except (ConfigError, ValueError) as exc:
        print(f"caspo demo: config error: {exc}")
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    run_demo(cfg, args.out)
    return 0
