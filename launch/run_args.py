"""What every run command (train, sft, dpo, rm, demo, sweep, dryrun) shares: the config
arguments (--preset, --config, --set, --out, --resume, --print-config), resolving them into
one validated run config, and running a stage inside the job the environment describes."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from caspo_jax import distributed
from caspo_jax.errors import CaspoError
from caspo_jax.launch.cli import one_line, report_error
from caspo_jax.loop.config import ConfigError, RunConfig, dump_config, load_config

# The flag that lets a checkpoint directory declaring custom code (`auto_map`,
# `trust_remote_code`) load as a plain Qwen-VL model; its code is never run.
IGNORE_CUSTOM_CODE_FLAG = "--ignore-custom-code"


def add_config_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """--preset, --config, --set, --out, --resume, --ignore-custom-code: shared by train, sft,
    dpo, demo and sweep. --out, when not given, is run.out_dir if the config sets it, else
    `default_out`; the config echoed and saved with the run shows the directory used."""
    parser.add_argument("--preset", default="tiny-cpu",
                        help="starting config: tiny-cpu (default); B (the original model) or B-start-sft, "
                             "B-start-original, B-teacher-frozen-sft, B-teacher-original for B in qwen2_5_vl_7b, "
                             "qwen3_vl_4b (the Fig. 6 readings; see caspo_jax/loop/presets.py)")
    parser.add_argument("--config", metavar="YAML", help="YAML file of overrides on the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one field, e.g. --set algo.lam=0.6 (repeatable)")
    parser.add_argument("--out", default=None,
                        help=f"run directory (default: run.out_dir if the config sets it, else {default_out})")
    parser.set_defaults(_default_out=default_out)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest readable checkpoint in --out")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(IGNORE_CUSTOM_CODE_FLAG, action="store_true",
                        help="load a checkpoint directory that declares custom code (config 'auto_map' or "
                             "'trust_remote_code') as a plain Qwen-VL model; its code is never run")


def cli_overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides, plus the ones flags stand for (--ignore-custom-code)."""
    flags = ["model.ignore_custom_code=true"] if getattr(args, "ignore_custom_code", False) else []
    return list(args.overrides) + flags


def config_from_args(args: argparse.Namespace):
    return load_config(preset=args.preset, path=args.config, overrides=cli_overrides(args))


def with_out_dir(cfg, args: argparse.Namespace):
    """`cfg` with run.out_dir set to the run directory this command uses (args.out is set to
    it too): --out, else run.out_dir when the config changed it, else the command's default."""
    if not hasattr(args, "_default_out"):  # a command without --out (caspo dryrun)
        return cfg
    if args.out is None:
        configured = cfg.run.out_dir
        args.out = configured if configured != RunConfig.out_dir else args._default_out
    return cfg.replace(run=dataclasses.replace(cfg.run, out_dir=str(args.out)))


def config_error(exc: Exception) -> int:
    """A config error as one line on stderr (nothing on stdout); exit status 2."""
    print(f"caspo: config error: {one_line(exc)}", file=sys.stderr, flush=True)
    return 2


def resolve(args: argparse.Namespace):
    """(config, exit status or None): reports config errors and --print-config, as every command does."""
    try:
        cfg = with_out_dir(config_from_args(args), args)
    except (ConfigError, ValueError) as exc:
        return None, config_error(exc)
    if args.print_config:
        print(dump_config(cfg), end="")
        return cfg, 0
    return cfg, None


def run_stage(train) -> int:
    """Joins the job the environment describes (`caspo_jax.distributed.start`: one
    process, explicit JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, SLURM or a
    TPU pod) before anything touches a device, runs `train()`, leaves the job.

    Errors the user can act on (`CaspoError`: a config the devices reject, a bad data file
    or image, an untrusted or damaged checkpoint, a run that halted itself after saving)
    print one line, ``caspo: <message>``, on stderr and return their exit code (2 or 3)."""
    plan = distributed.start()
    try:
        train()
    except CaspoError as exc:
        return report_error(exc)
    finally:
        if plan.multi_process:
            distributed.shutdown()
    return 0
