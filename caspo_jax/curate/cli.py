"""``caspo curate STAGE``: run (or resume) one curation stage in an output folder.

Examples::

    caspo curate synthesize --out runs/cur --model name=gpt,model=gpt-5,base_url=https://api.openai.com/v1 \\
        --model name=qwen,model=Qwen3-VL-32B,base_url=http://host:8000/v1 --calls 4 --per-call 5
    caspo curate filter  --out runs/cur --judge name=gpt,model=gpt-5,base_url=...
    caspo curate dedup   --out runs/cur --embedding-model /models/all-MiniLM-L6-v2 --threshold 0.9
    caspo curate images  --out runs/cur --image-root runs/cur/images      # <id>.png per scenario
    caspo curate rewrite --out runs/cur --judge name=gpt,...
    caspo curate export  --out runs/cur --image-root runs/cur/images      # benchmark.jsonl
    caspo curate respond --out runs/cur --image-root runs/cur/images --model ... --model ... --judge ...
    caspo curate select  --out runs/cur --pair-gap 4 --pair-prob 0.85 --seed 0   # RM pool balanced by model+length
    caspo curate dpo     --out runs/cur --dpo-mode disparity --seed 0          # dpo_disparity.jsonl
    caspo curate dpo     --out runs/cur --dpo-mode length-balanced --dpo-max-pairs 17328
    caspo curate report  --out runs/cur

Rerunning a stage resumes it: done units are skipped, failed ones redone. Every run
rewrites summary.json / summary.md (counts per stage and category, tokens, cost).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from caspo_jax.curate import pipeline
from caspo_jax.curate.filtering import FilterThresholds, filter_scenarios
from caspo_jax.curate.images import load_image_map
from caspo_jax.curate.report import write_summary
from caspo_jax.curate.responses import respond
from caspo_jax.curate.rewrite import rewrite_queries
from caspo_jax.curate.stage import Endpoint
from caspo_jax.curate.synthesis import synthesize
from caspo_jax.curate.templates import load_prompt_file
from caspo_jax.data.constitutions import load_constitutions
from caspo_jax.errors import CaspoError
from caspo_jax.evals.generators import Sampling
from caspo_jax.llm.client import ChatClient, ClientConfig
from caspo_jax.llm.endpoint_spec import parse_endpoint_spec

STAGE_NAMES = ("synthesize", "filter", "dedup", "images", "rewrite", "export", "respond", "select", "dpo", "report")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=STAGE_NAMES, help="which stage to run (see `caspo curate --help`)")
    p.add_argument("--out", required=True, help="curation folder holding every stage's JSONL")
    p.add_argument("--model", action="append", default=[],
                   help="generator spec, repeatable: name=N,model=M,base_url=U[,api_key_env=E,price_in=P,price_out=Q]")
    p.add_argument("--judge", help="judge / rewriter spec (same form as --model)")
    p.add_argument("--prompts", help="your edited prompt YAML for this stage (default: the packaged one)")
    s = p.add_argument_group("synthesize")
    s.add_argument("--calls", type=int, default=1, help="requests per sub-category and model")
    s.add_argument("--per-call", type=int, default=4, help="scenarios asked for per request")
    s.add_argument("--categories", help="comma list of categories (default: all in the prompt file)")
    s.add_argument("--temperature", type=float, help="sampling temperature (synthesize default 1.0, respond 0.9)")
    f = p.add_argument_group("filter")
    f.add_argument("--min-benign", type=int, default=4)
    f.add_argument("--min-natural", type=int, default=4)
    f.add_argument("--min-relevance", type=int, default=4)
    f.add_argument("--min-risk-clarity", type=int, default=4)
    d = p.add_argument_group("dedup")
    d.add_argument("--embedding-model", help="local sentence-transformers / HF directory (omit: exact-text fallback)")
    d.add_argument("--threshold", type=float, default=0.9, help="cosine similarity at which records are duplicates")
    d.add_argument("--dedup-fields", default="query,hazard", help="record fields whose text is compared")
    i = p.add_argument_group("images / export / respond")
    i.add_argument("--image-root", help="folder holding the scenario images")
    i.add_argument("--image-map", help="JSONL of {\"id\", \"image\"} (default: <image-root>/<id>.<ext>)")
    i.add_argument("--constitutions", help="constitutions file (default: the packaged ones)")
    i.add_argument("--modes", default="standard,constitution", help="respond prompt modes")
    i.add_argument("--samples", type=int, default=1, help="responses per record, model and mode")
    i.add_argument("--max-new-tokens", type=int, default=1024)
    c = p.add_argument_group("select")
    c.add_argument("--min-sft-total", type=int, default=5, help="lowest R+S+E (0-6) for an SFT target")
    c.add_argument("--pair-gap", type=int, default=4, help="BT pairs need an R+S+E gap above this")
    c.add_argument("--pair-prob", type=float, default=0.85, help="probability an eligible pair is kept for BT")
    c.add_argument("--rm-balance", choices=("model-length", "none"), default="model-length",
                   help="build the RM pairs / MSE records from responses balanced by source model and length "
                        "(paper appendix B.1; cell counts in rm_balance.json), or from every response")
    c.add_argument("--rm-per-cell", default="median",
                   help="responses kept per (model, length bucket) cell: a count, 'min' (exact balance) or "
                        "'median' (cap cells at the median cell size)")
    c.add_argument("--rm-length-edges",
                   help="comma list of word counts splitting length buckets, e.g. 100,200,400 (default: quartiles)")
    c.add_argument("--seed", type=int, default=0, help="seed of every draw in select and dpo")
    o = p.add_argument_group("dpo (pairs for the DPO baselines, paper appendix A.2.3 / B.1)")
    o.add_argument("--dpo-mode", choices=("disparity", "length-balanced"), default="disparity",
                   help="disparity: the widest R+S+E gaps; length-balanced: per gap, chosen longer as often as shorter")
    o.add_argument("--dpo-gap", type=int,
                   help="pairs need an R+S+E gap above this (default: 3 for disparity, 1 for length-balanced)")
    o.add_argument("--dpo-per-record", type=int,
                   help="most pairs per record (default: 1 for disparity, no cap for length-balanced; 0 = no cap)")
    o.add_argument("--dpo-max-pairs", type=int, help="most pairs in all (default: no cap)")
    o.add_argument("--dpo-length-tolerance", type=float, default=0.1,
                   help="relative word-count difference under which a pair counts as even in length")
    r = p.add_argument_group("robustness")
    r.add_argument("--concurrency", type=int, default=8)
    r.add_argument("--timeout", type=float, default=120.0)
    r.add_argument("--max-retries", type=int, default=5)
    r.add_argument("--backoff", type=float, default=1.0)
    r.add_argument("--cache-dir", help="response cache folder (default: <out>/cache)")
    r.add_argument("--no-cache", action="store_true")
    r.add_argument("--chunk-size", type=int, default=16)
    r.add_argument("--no-json-mode", action="store_true",
                   help="do not send response_format=json_object (for endpoints that reject it)")
    r.add_argument("--no-progress", action="store_true")


def _endpoint(args, spec: str, temperature: float | None):
    s = parse_endpoint_spec(spec)
    cache = None if args.no_cache else (args.cache_dir or str(Path(args.out) / "cache"))
    client = ChatClient(ClientConfig(
        base_url=s["base_url"], model=s["model"], api_key_env=s["api_key_env"], max_concurrency=args.concurrency,
        timeout_s=args.timeout, max_retries=args.max_retries, backoff_base_s=args.backoff, cache_dir=cache,
        temperature=temperature,
    ))
    return Endpoint(s["name"], client, s["price_in"], s["price_out"]), (s["price_in"], s["price_out"])


def _record_prices(out: Path, prices: dict) -> dict:
    """Prices of every endpoint ever used in this folder (kept in prices.json for the report)."""
    path = out / "prices.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    known.update({k: list(v) for k, v in prices.items()})
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=2, sort_keys=True))
    return {k: tuple(v) for k, v in known.items()}


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"caspo curate {args.stage}: {exc}", file=sys.stderr)
        return 2
    except CaspoError as exc:
        print(f"caspo curate {args.stage}: {exc}", file=sys.stderr)
        return exc.exit_code


def _per_cell(text: str) -> int | str:
    if text in ("min", "median"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--rm-per-cell {text!r}: give a positive count, 'min' or 'median'") from None


def _edges(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--rm-length-edges {text!r}: give increasing word counts, e.g. 100,200,400") from None


def _dpo_options(args) -> dict:
    options = {"seed": args.seed, "max_pairs": args.dpo_max_pairs, "length_tolerance": args.dpo_length_tolerance}
    if args.dpo_gap is not None:
        options["gap_threshold"] = args.dpo_gap
    if args.dpo_per_record is not None:
        options["per_record"] = args.dpo_per_record or None
    return options


def _run(args) -> int:
    out = Path(args.out)
    progress = not args.no_progress
    prices: dict[str, tuple[float, float]] = {}

    def endpoints(specs, temperature):
        eps = []
        for spec in specs:
            ep, price = _endpoint(args, spec, temperature)
            eps.append(ep)
            prices[ep.name] = price
        return eps

    def judge():
        if not args.judge:
            raise ValueError(f"stage {args.stage} needs --judge name=..,model=..,base_url=..")
        return endpoints([args.judge], 0.0)[0]

    def models():
        if not args.model:
            raise ValueError(f"stage {args.stage} needs at least one --model name=..,model=..,base_url=..")
        return endpoints(args.model, None)

    prompts = (lambda default: load_prompt_file(args.prompts or default))
    stage = args.stage
    message = ""
    stats = None
    run_opts = dict(chunk_size=args.chunk_size, progress=progress, json_mode=not args.no_json_mode)
    if stage == "synthesize":
        cats = [c.strip() for c in args.categories.split(",")] if args.categories else None
        stats = synthesize(models(), pipeline.stage_path(out, stage), prompts=prompts("synthesize"), calls=args.calls,
                           per_call=args.per_call, temperature=1.0 if args.temperature is None else args.temperature,
                           categories=cats, **run_opts)
        message = str(stats)
    elif stage == "filter":
        th = FilterThresholds(args.min_benign, args.min_natural, args.min_relevance, args.min_risk_clarity)
        stats = filter_scenarios(pipeline.stage_input(out, stage), judge(), pipeline.stage_path(out, stage),
                                 thresholds=th, prompts=prompts("filter"), **run_opts)
        message = str(stats)
    elif stage == "dedup":
        res = pipeline.run_dedup(out, embedding_model=args.embedding_model, threshold=args.threshold,
                                 fields=[f.strip() for f in args.dedup_fields.split(",") if f.strip()])
        message = f"kept {len(res.kept)}, removed {len(res.removed)} in {len(res.clusters)} clusters ({res.method})"
    elif stage == "images":
        if not args.image_root:
            raise ValueError("stage images needs --image-root DIR")
        kept, rejected = pipeline.run_images(out, args.image_root,
                                             load_image_map(args.image_map) if args.image_map else None)
        message = f"kept {len(kept)}, rejected {len(rejected)}"
    elif stage == "rewrite":
        stats = rewrite_queries(pipeline.stage_input(out, stage), judge(), pipeline.stage_path(out, stage),
                                prompts=prompts("rewrite"), **run_opts)
        message = str(stats)
    elif stage == "export":
        message = f"wrote {pipeline.export_benchmark(out, args.image_root)}"
    elif stage == "respond":
        sampling = Sampling(0.9 if args.temperature is None else args.temperature, args.max_new_tokens)
        stats = respond(pipeline.stage_input(out, stage), models(), judge(), pipeline.stage_path(out, stage),
                        constitutions=load_constitutions(args.constitutions), image_root=args.image_root,
                        modes=[m.strip() for m in args.modes.split(",") if m.strip()], samples=args.samples,
                        sampling=sampling, **run_opts)
        message = str(stats)
    elif stage == "select":
        sel = pipeline.run_select(out, min_total=args.min_sft_total, gap_threshold=args.pair_gap,
                                  pair_probability=args.pair_prob, seed=args.seed,
                                  rm_balance=args.rm_balance != "none", rm_per_cell=_per_cell(args.rm_per_cell),
                                  rm_length_edges=_edges(args.rm_length_edges))
        message = f"sft {len(sel.sft)}, pairs {len(sel.pairs)}, mse {len(sel.mse)}, no SFT target {len(sel.rejected)}"
        if sel.rm_balance is not None:
            message += f"; RM pool {sel.rm_balance.summary()}"
    elif stage == "dpo":
        path, pairs = pipeline.run_dpo(out, args.dpo_mode, **_dpo_options(args))
        lengths = {k: sum(p.meta["length"] == k for p in pairs) for k in ("longer", "shorter", "even")}
        message = (f"wrote {path}: {len(pairs)} pairs ({args.dpo_mode}); chosen longer {lengths['longer']}, "
                   f"shorter {lengths['shorter']}, even {lengths['even']}")
    all_prices = _record_prices(out, prices)
    summary = write_summary(out, all_prices)
    if message:
        print(f"caspo curate {stage}: {message}")
    print(f"summary: {out / 'summary.md'} ({len(summary['stages'])} stages)")
    if stats is not None and stats.failed:
        print(f"caspo curate {stage}: {stats.failed} unit(s) failed (their 'error' field in "
              f"{stage}.jsonl says why); rerun the same command to retry only those", file=sys.stderr)
        return 1
    return 0
