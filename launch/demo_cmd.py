"""`caspo demo`: the built-in tiny end-to-end run (SFT -> CASPO -> risk-failure table, plots)."""

from __future__ import annotations

import argparse

from caspo_jax.launch.run_args import add_config_arguments, cli_overrides, config_error, with_out_dir

from caspo_jax.loop.config import ConfigError, dump_config
from caspo_jax.loop.demo import demo_config, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "runs/demo")
    parser.add_argument("--quick", action="store_true", help="a smoke-sized run (seconds, for tests)")


def run(args: argparse.Namespace) -> int:
    """Config errors: one line on stderr, exit 2; errors during the run reach `caspo`'s
    edge (`caspo_jax.launch.cli.main`), which reports any `CaspoError` as one line."""
    try:
        cfg = with_out_dir(demo_config(args.preset, args.config, cli_overrides(args), quick=args.quick), args)
    except (ConfigError, ValueError) as exc:
        return config_error(exc)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    run_demo(cfg, args.out)
    return 0
