"""`caspo sweep`: advantage cells x seeds on a preset -> table.md (mean and 95% interval),
table.csv, sweep.png; --study: the same under the demo's (start, teacher) conditions ->
study.md/.csv/.png; with --eval-* benchmark files, every cell's export through `caspo eval`
-> table10.md/.csv."""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from caspo_jax.errors import UserError
from caspo_jax.launch.run_args import add_config_arguments, resolve
from caspo_jax.loop.sweep import DEFAULT_CELLS, DEFAULT_SEEDS, STUDY_CELLS, Cell, SweepBenchmarks, run_study, run_sweep


def _spec(cell: Cell) -> str:
    if cell.variant != "hybrid":
        return cell.variant
    return f"hybrid:{cell.lam:g}" + (":nonneg" if cell.nonneg else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "runs/sweep")
    parser.add_argument("--cells", nargs="+", default=None, metavar="CELL",
                        help="outcome, token, hybrid:LAMBDA or hybrid:LAMBDA:nonneg; each cell is its variant's "
                             "algo preset (paper-outr, paper-tokr, paper at LAMBDA). Default: "
                             f"{' '.join(map(_spec, DEFAULT_CELLS))} (with --study: "
                             f"{' '.join(map(_spec, STUDY_CELLS))})")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--no-sft", action="store_true", help="start every cell from model.path, without SFT")
    parser.add_argument("--study", action="store_true",
                        help="the demo task under each start (suppressed, blind) x teacher (discriminating, "
                             "biased): data.demo_start / data.demo_teacher, its own SFT per condition")
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="XLA's persistent compilation cache, so every seed and cell (and a rerun) reuses "
                             "compiled programs (default: OUT/jax_cache; 'none': off)")
    b = parser.add_argument_group("table 10: `caspo eval` of the start policy and every cell's export")
    b.add_argument("--eval-records", metavar="JSONL", help="OOD-MMSafe-style records (standard mode)")
    b.add_argument("--eval-image-root", help="folder the records' image paths are relative to")
    b.add_argument("--eval-siuo", metavar="JSON", help="SIUO siuo_gen.json")
    b.add_argument("--eval-siuo-images", help="SIUO images folder (default: <siuo dir>/images)")
    b.add_argument("--eval-siuo-samples", type=int, default=3, help="samples per SIUO question (majority vote)")
    b.add_argument("--eval-mss", metavar="JSON", help="MSSBench combined.json")
    b.add_argument("--eval-mss-root", help="MSSBench image root (default: its folder)")
    b.add_argument("--eval-judge", action="append", default=[], metavar="SPEC",
                   help="judge endpoint, as caspo eval --judge: name=N,model=M,base_url=URL[,api_key_env=E] "
                        "(repeatable: rates are averaged over judges)")
    b.add_argument("--eval-temperature", type=float, help="generation temperature (default: caspo eval's 0.9)")
    b.add_argument("--eval-max-new-tokens", type=int, help="max new tokens (default: caspo eval's 4096)")
    b.add_argument("--eval-limit", type=int, help="only the first N records / questions / pairs of each benchmark")
    b.add_argument("--eval-cache-dir", help="judge response cache folder")


def benchmarks_from_args(args: argparse.Namespace):
    """A SweepBenchmarks when any --eval-records/--eval-siuo/--eval-mss is given, else None."""
    if not (args.eval_records or args.eval_siuo or args.eval_mss):
        if args.eval_judge:
            raise UserError("caspo sweep: --eval-judge without a benchmark; add --eval-records, --eval-siuo "
                            "and/or --eval-mss")
        return None

    return SweepBenchmarks(
        judges=tuple(args.eval_judge), records=args.eval_records, image_root=args.eval_image_root,
        siuo=args.eval_siuo, siuo_images=args.eval_siuo_images, siuo_samples=args.eval_siuo_samples,
        mss=args.eval_mss, mss_root=args.eval_mss_root, temperature=args.eval_temperature,
        max_new_tokens=args.eval_max_new_tokens, limit=args.eval_limit, cache_dir=args.eval_cache_dir)


def run(args: argparse.Namespace) -> int:
    cfg, status = resolve(args)
    if status is not None:
        return status

    cells = [Cell.parse(spec) for spec in args.cells] if args.cells else None
    benchmarks = benchmarks_from_args(args)  # a UserError here reaches the CLI edge: one line, exit 2
    if args.study and (benchmarks is not None or args.no_sft):
        raise UserError("caspo sweep --study runs the demo task from its own SFT starts; drop --eval-* / --no-sft")
    if args.compile_cache != "none":
        jax.config.update("jax_compilation_cache_dir", str(args.compile_cache or Path(args.out) / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if args.study:
        run_study(cfg, args.out, cells=cells or STUDY_CELLS, seeds=args.seeds)
    else:
        run_sweep(cfg, args.out, cells=cells or DEFAULT_CELLS, seeds=args.seeds, sft_first=not args.no_sft,
                  benchmarks=benchmarks)
    return 0
