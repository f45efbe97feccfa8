"""`caspo rm`: train the reward model on BT pairs + RSE-scored responses (eq. 7)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caspo_jax.errors import CaspoError
from caspo_jax.launch.cli import one_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", help="preference pairs JSONL (id, images, query, chosen, rejected)")
    parser.add_argument("--scores", help="scored responses JSONL (id, images, query, response, score 0..6), "
                                         "e.g. curate's mse.jsonl")
    parser.add_argument("--model", required=True, help="backbone HF directory (Qwen2.5-VL / Qwen3-VL) or an "
                                                       "earlier reward-model directory")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, eval.json, export/)")
    parser.add_argument("--mse-weight", type=float, default=1.0, help="lambda of eq. 7 (0: BT only)")
    parser.add_argument("--batch-size", type=int, default=8, help="slots per step: a pair or two MSE records")
    parser.add_argument("--steps", type=int, default=None, help="updates (default: --epochs passes)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of pairs and of records")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: at the end)")
    parser.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompt-len", type=int, default=2048)
    parser.add_argument("--max-response-len", type=int, default=1024)
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--mesh", default=None, help="DATA,FSDP,TENSOR device mesh, e.g. 1,8,1 (default: one device)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--ignore-custom-code", action="store_true",
                        help="load a --model directory that declares its own code (auto_map, trust_remote_code) as a "
                             "plain Qwen-VL model; its code is never run (without it such a directory is refused)")
    parser.add_argument("--no-progress", action="store_true")


def _fail(message: object, code: int = 2) -> int:
    """One line on stderr, exit `code` (2: bad input)."""
    print(f"caspo rm: error: {one_line(message)}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    if args.pairs is None and args.scores is None:
        return _fail("give --pairs PAIRS.jsonl and/or --scores SCORES.jsonl")
    for flag, value in (("--pairs", args.pairs), ("--scores", args.scores)):
        if value is not None and not Path(value).is_file():
            return _fail(f"{flag} {value}: file not found")
    if not (Path(args.model) / "config.json").is_file():
        return _fail(f"--model {args.model}: no config.json there; pass a Qwen-VL HF checkpoint directory")
    mesh = None
    if args.mesh:
        try:
            mesh = tuple(int(x) for x in args.mesh.split(","))
            assert len(mesh) == 3
        except (ValueError, AssertionError):
            return _fail(f"--mesh {args.mesh!r}: expected three integers DATA,FSDP,TENSOR, e.g. 1,8,1")
    from caspo_jax.rewards.rm_train import RMTrainConfig, train_reward_model
    from caspo_jax.step import StepConfig

    try:
        step = StepConfig(learning_rate=args.lr, warmup_steps=args.warmup_steps, compute_dtype=args.compute_dtype)
        cfg = RMTrainConfig(mse_weight=args.mse_weight, batch_size=args.batch_size, steps=args.steps,
                            epochs=args.epochs, step=step, eval_fraction=args.eval_fraction,
                            eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
                            max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len, mesh=mesh)
        _, final = train_reward_model(args.pairs, args.scores, args.model, args.out, cfg, resume=args.resume,
                                      progress=not args.no_progress, ignore_custom_code=args.ignore_custom_code)
    except CaspoError as exc:  # bad pairs / scores / images, an untrusted or damaged checkpoint
        return _fail(exc, exc.exit_code)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        return _fail(exc)
    if "stopped" in final:  # train_reward_model printed how to resume
        return 0
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items())
    print(f"caspo rm: done ({shown}); reward model in {Path(args.out) / 'export'}")
    return 0
