"""`caspo train`: CASPO policy optimisation (Algorithm 1) from a preset, a YAML file and --set overrides."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """--preset, --config, --set, --out, --resume: shared by train, sft, dpo, demo and sweep."""
    parser.add_argument("--preset", default="tiny-cpu",
                        help="starting config: tiny-cpu (default), qwen2_5_vl_7b, qwen3_vl_4b")
    parser.add_argument("--config", metavar="YAML", help="YAML file of overrides on the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one field, e.g. --set algo.lam=0.6 (repeatable)")
    parser.add_argument("--out", default=default_out, help=f"run directory (default {default_out})")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest readable checkpoint in --out")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace):
    from caspo_jax.trainer.config import load_config

    return load_config(preset=args.preset, path=args.config, overrides=args.overrides)


def resolve(args: argparse.Namespace):
    """(config, exit status or None): prints config errors and --print-config, as every command does."""
    from caspo_jax.trainer.config import ConfigError, dump_config

    try:
        cfg = config_from_args(args)
    except (ConfigError, ValueError) as exc:
        print(f"caspo: config error: {exc}")
        return None, 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return cfg, 0
    return cfg, None


def run_stage(train) -> int:
    """Joins the job the environment describes (`caspo_jax.launch.distributed.start`: one
    process, explicit JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, SLURM or a
    TPU pod) before anything touches a device, runs `train()`, leaves the job. Config
    errors only the devices reveal (a mesh that does not fit) exit 2 like the others."""
    from caspo_jax.launch import distributed
    from caspo_jax.trainer.config import ConfigError

    plan = distributed.start()
    try:
        train()
    except ConfigError as exc:
        print(f"caspo: config error: {exc}")
        return 2
    finally:
        if plan.multi_process:
            distributed.shutdown()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "runs/caspo")
    parser.add_argument("--init", metavar="HF_DIR",
                        help="start from this HF checkpoint (e.g. the export of caspo sft) instead of model.path")
    add_topology_arguments(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the mesh, per-device memory and step FLOPs for --topology and exit "
                             "(nothing is allocated; no devices needed)")


def add_topology_arguments(parser: argparse.ArgumentParser) -> None:
    """--topology and --mesh: the devices a dry run sizes the job for."""
    parser.add_argument("--topology", default="1x16",
                        help="for --dry-run: v5p-64, 16xa100-80gb or DEVICESxGIB (32x95); optional :data,fsdp,tensor")
    parser.add_argument("--mesh", default=None, help="for --dry-run: data,fsdp,tensor (default: all devices on fsdp)")


def print_dry_run(cfg, args: argparse.Namespace) -> int:
    from caspo_jax.launch.dryrun import Topology, dry_run_report

    try:
        topology = Topology.parse(args.topology, args.mesh)
    except ValueError as exc:
        print(f"caspo: --topology/--mesh: {exc}")
        return 2
    print(dry_run_report(cfg, topology), end="")
    return 0


def run(args: argparse.Namespace) -> int:
    cfg, status = resolve(args)
    if status is not None:
        return status
    if args.init:
        import dataclasses

        cfg = cfg.replace(model=dataclasses.replace(cfg.model, path=args.init))
    if args.dry_run:
        return print_dry_run(cfg, args)
    from caspo_jax.trainer.caspo import run_caspo

    return run_stage(lambda: run_caspo(cfg, args.out, resume=args.resume))
