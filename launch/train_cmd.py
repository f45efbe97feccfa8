"""`caspo train`: CASPO policy optimisation (Algorithm 1) from a preset, a YAML file and --set overrides."""

from __future__ import annotations

import argparse
import dataclasses

from caspo_jax.launch.dryrun import add_topology_arguments, print_dry_run
from caspo_jax.launch.run_args import add_config_arguments, resolve, run_stage
from caspo_jax.loop.caspo import run_caspo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "runs/caspo")
    parser.add_argument("--init", metavar="HF_DIR",
                        help="start from this HF checkpoint (e.g. the export of caspo sft) instead of model.path")
    add_topology_arguments(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the mesh, per-device memory and step FLOPs for --topology and exit "
                             "(nothing is allocated; no devices needed)")


def run(args: argparse.Namespace) -> int:
    cfg, status = resolve(args)
    if status is not None:
        return status
    if args.init:
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, path=args.init))
    if args.dry_run:
        return print_dry_run(cfg, args)
    return run_stage(lambda: run_caspo(cfg, args.out, resume=args.resume))
