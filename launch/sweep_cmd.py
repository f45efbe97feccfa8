"""`caspo sweep`: variants x lambdas x seeds on a preset -> table.md, table.csv, sweep.png."""

from __future__ import annotations

import argparse

from caspo_jax.launch.train_cmd import add_config_arguments, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "runs/sweep")
    parser.add_argument("--variants", nargs="+", default=["outcome", "token", "hybrid"],
                        choices=["outcome", "token", "hybrid"])
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.3, 0.6, 1.0],
                        help="lambdas of the hybrid variant (outcome is lambda 0)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--no-sft", action="store_true", help="start every cell from model.path, without SFT")


def run(args: argparse.Namespace) -> int:
    cfg, status = resolve(args)
    if status is not None:
        return status
    if any(lam < 0 for lam in args.lambdas):
        print("caspo sweep: --lambdas must be >= 0")
        return 2
    from caspo_jax.trainer.sweep import run_sweep

    run_sweep(cfg, args.out, variants=args.variants, lambdas=args.lambdas, seeds=args.seeds,
              sft_first=not args.no_sft)
    return 0
