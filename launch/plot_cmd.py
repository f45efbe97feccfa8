"""`caspo plot RUN_DIR...`: PNG figures of entropy, KL, response length, gradient norm (paper fig. 13) and reward."""

from __future__ import annotations

import argparse
import sys

from caspo_jax.loop.plot import plot_runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (several: one line each)")
    parser.add_argument("--out", help="output folder (default RUN_DIR/plots of the first run)")
    parser.add_argument("--labels", nargs="*", help="one legend label per run (default: variant and lambda)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in steps")


def run(args: argparse.Namespace) -> int:
    if args.labels and len(args.labels) != len(args.runs):
        print(f"caspo plot: {len(args.labels)} labels for {len(args.runs)} runs; give one --labels entry per run",
              file=sys.stderr)
        return 2
    try:
        paths = plot_runs(args.runs, args.out, args.labels, args.smooth)
    except FileNotFoundError as exc:
        print(f"caspo plot: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
