"""`caspo rm`: train the reward model on BT pairs + RSE-scored responses (eq. 7).

The run config is the one every command reads (`caspo_jax.loop.config.TrainConfig`, its
`rm` section); the flags below are shorthands for --set entries and win over them:

    --pairs / --scores   data.pairs / data.scores      --model        model.path
    --mse-weight         rm.mse_weight                 --batch-size   rm.batch_size
    --steps / --epochs   rm.steps / rm.epochs          --lr           rm.learning_rate
    --eval-fraction      rm.eval_fraction              --eval-every   rm.eval_every
    --warmup-steps       optim.warmup_steps            --save-every   run.save_every
    --seed               run.seed                      --compute-dtype model.dtype
    --max-prompt-len / --max-response-len   data.max_prompt_len / data.max_response_len
    --mesh D,F,T         run.mesh_data / run.mesh_fsdp / run.mesh_tensor

Unlike the other commands it starts from no preset (the config's own defaults: prompts up
to 2048 tokens, responses up to 1024, every device on the data axis) unless --preset is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from caspo_jax.distributed import is_primary
from caspo_jax.launch.cli import one_line
from caspo_jax.launch.run_args import add_config_arguments, resolve, run_stage
from caspo_jax.loop.reward_model import train_reward_model

# flag (argparse dest) -> the run-config field it sets
FLAG_FIELDS = {"pairs": "data.pairs", "scores": "data.scores", "model": "model.path", "mse_weight": "rm.mse_weight",
               "batch_size": "rm.batch_size", "steps": "rm.steps", "epochs": "rm.epochs", "lr": "rm.learning_rate",
               "eval_fraction": "rm.eval_fraction", "eval_every": "rm.eval_every",
               "warmup_steps": "optim.warmup_steps", "save_every": "run.save_every", "seed": "run.seed",
               "compute_dtype": "model.dtype", "max_prompt_len": "data.max_prompt_len",
               "max_response_len": "data.max_response_len"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "runs/rm")
    parser.set_defaults(preset=None)
    parser.add_argument("--pairs", help="preference pairs JSONL (id, images, query, chosen, rejected)")
    parser.add_argument("--scores", help="scored responses JSONL (id, images, query, response, score 0..6), "
                                         "e.g. curate's mse.jsonl")
    parser.add_argument("--model", help="backbone HF directory (Qwen2.5-VL / Qwen3-VL) or an earlier reward-model "
                                        "directory (default: model.path; unset: the built-in tiny model)")
    parser.add_argument("--mse-weight", type=float, help="lambda of eq. 7 (0: BT only; default 1)")
    parser.add_argument("--batch-size", type=int, help="slots per step: a pair or two MSE records (default 8)")
    parser.add_argument("--steps", type=int, help="updates (default: --epochs passes)")
    parser.add_argument("--epochs", type=int, help="passes over the training slots (default 1)")
    parser.add_argument("--lr", type=float, help="AdamW peak learning rate (default 1e-5)")
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--eval-fraction", type=float, help="held-out share of pairs and of records (default 0.1)")
    parser.add_argument("--eval-every", type=int, help="steps between held-out evaluations (0: at the end)")
    parser.add_argument("--save-every", type=int, help="steps between checkpoints (0: at the end)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-prompt-len", type=int)
    parser.add_argument("--max-response-len", type=int)
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--mesh", default=None, help="DATA,FSDP,TENSOR device mesh, e.g. 1,8,1 (-1: the remaining "
                                                     "devices; default: run.mesh_*)")
    parser.add_argument("--no-progress", action="store_true")


def _fail(message: object, code: int = 2) -> int:
    """One line on stderr, exit `code` (2: bad input)."""
    print(f"caspo rm: error: {one_line(message)}", file=sys.stderr)
    return code


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The --set entries the given flags stand for (values as JSON, which YAML reads)."""
    sets = [f"{field}={json.dumps(getattr(args, dest))}" for dest, field in FLAG_FIELDS.items()
            if getattr(args, dest) is not None]
    if args.mesh:
        try:
            mesh = [int(x) for x in args.mesh.split(",")]
        except ValueError:
            mesh = []
        if len(mesh) != 3:
            raise ValueError(f"--mesh {args.mesh!r}: expected three integers DATA,FSDP,TENSOR, e.g. 1,8,1")
        sets += [f"run.mesh_{axis}={size}" for axis, size in zip(("data", "fsdp", "tensor"), mesh)]
    return sets


def run(args: argparse.Namespace) -> int:
    try:
        args.overrides = list(args.overrides) + flag_overrides(args)
    except ValueError as exc:
        return _fail(exc)
    cfg, status = resolve(args)
    if status is not None:
        return status
    d = cfg.data
    if d.pairs is None and d.scores is None:
        return _fail("give --pairs PAIRS.jsonl and/or --scores SCORES.jsonl (or --set data.pairs / data.scores)")
    for flag, value in (("--pairs", d.pairs), ("--scores", d.scores)):
        if value is not None and not Path(value).is_file():
            return _fail(f"{flag} {value}: file not found")
    if cfg.model.path is not None and not (Path(cfg.model.path) / "config.json").is_file():
        return _fail(f"--model {cfg.model.path}: no config.json there; pass a Qwen-VL HF checkpoint directory")
    result = {}

    def train():
        result["final"] = train_reward_model(cfg, args.out, resume=args.resume, progress=not args.no_progress)[1]

    status = run_stage(train)
    if status or "stopped" in result["final"]:  # an error was printed; or train_reward_model said how to resume
        return status
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result["final"].items())
    if is_primary():
        print(f"caspo rm: done ({shown}); reward model in {Path(args.out) / 'export'}")
    return 0
