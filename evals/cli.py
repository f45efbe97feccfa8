"""``caspo eval``: generate, judge and report OOD-MMSafe-style, SIUO and MSSBench results.

Examples::

    caspo eval --records data/ood.jsonl --modes standard,constitution \\
        --engine openai --base-url http://localhost:8000/v1 --model my-ckpt \\
        --judge name=gpt,model=gpt-5,base_url=https://api.openai.com/v1,api_key_env=OPENAI_API_KEY,price_in=0.00125,price_out=0.01 \\
        --judge name=qwen,model=Qwen3-VL-32B,base_url=http://judge:8000/v1 \\
        --out runs/eval-ckpt
    caspo eval --compare runs/eval-base runs/eval-caspo --out runs/compare
    caspo eval --token-shift ckpt/base ckpt/caspo --records data/ood.jsonl \\
        --responses-from runs/eval-caspo --out runs/shift

Rerunning the same command resumes: finished items are skipped, failed ones retried.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
import sys
from typing import Any

from caspo_jax.data.constitutions import load_constitutions
from caspo_jax.data.records import load_records as load_safety_records
from caspo_jax.errors import CaspoError, UserError
from caspo_jax.evals import judging, metrics, report, suites, token_shift
from caspo_jax.evals.generators import NOT_RETRIED, PAPER_SAMPLING, EngineNotAvailable, OpenAIGenerator, local_generator
from caspo_jax.evals.modes import MODES, PROMPTS_VERSION, build_prompt
from caspo_jax.evals.mssbench import load_mssbench
from caspo_jax.evals.runner import Judge, RunStats, run_items, spent_totals
from caspo_jax.evals.shift_scoring import score_under_checkpoints
from caspo_jax.evals.siuo import load_siuo
from caspo_jax.evals.store import ResultsStore, load_records
from caspo_jax.llm.client import ChatClient, ClientConfig
from caspo_jax.llm.endpoint_spec import parse_endpoint_spec
from caspo_jax.rubric.rse import RUBRIC_VERSION



class EvalFailed(CaspoError):
    """Every item of the run failed (exit 1): the report covers nothing; the message says why."""

    exit_code = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output directory (results.jsonl, report.md, summary.csv, PNGs)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="two eval output dirs: before/after deltas (table 3)")
    d = p.add_argument_group("data")
    d.add_argument("--records", help="OOD-MMSafe-style records JSONL (caspo_jax.data.records format)")
    d.add_argument("--image-root", help="folder image paths in --records are relative to (default: the file's folder)")
    d.add_argument("--modes", default="standard", help=f"comma list of {','.join(MODES)}")
    d.add_argument("--constitutions", help="constitutions file (default: the packaged constitutions)")
    d.add_argument("--limit", type=int, help="evaluate only the first N records / questions / pairs")
    d.add_argument("--siuo", help="SIUO siuo_gen.json")
    d.add_argument("--siuo-images", help="SIUO images folder (default: <siuo dir>/images)")
    d.add_argument("--siuo-samples", type=int, default=3, help="samples per SIUO question, combined by majority vote (our protocol; the paper gives none)")
    d.add_argument("--siuo-effective", default="effective", choices=["effective", "safe_and_effective"],
                   help="how the effective rate is computed (our options; see caspo_jax.evals.siuo)")
    d.add_argument("--mss", help="MSSBench combined.json")
    d.add_argument("--mss-root", help="MSSBench image root holding chat/ and embodied/ (default: its folder)")
    d.add_argument("--mss-rates", default="unsafe_safe", choices=["unsafe_safe", "total"],
                   help="our mapping of MSSBench accuracies to the safe/effective rates the paper reports")
    g = p.add_argument_group("generation")
    g.add_argument("--engine", default="openai", choices=["openai", "jax", "vllm"])
    g.add_argument("--checkpoint", help="caspo checkpoint or HF directory (--engine jax|vllm)")
    g.add_argument("--ignore-custom-code", action="store_true",
                   help="load a checkpoint directory that declares its own code (auto_map, trust_remote_code) "
                        "as a plain Qwen-VL model; its code is never run (without it such a directory is refused)")
    g.add_argument("--base-url", help="OpenAI-compatible endpoint of the evaluated model")
    g.add_argument("--model", help="served model name of the evaluated model")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the evaluated endpoint's key")
    g.add_argument("--preset", choices=["paper"], default="paper", help="sampling preset (paper: T=0.9, 4096 new tokens)")
    g.add_argument("--temperature", type=float, help="override the preset's temperature")
    g.add_argument("--max-new-tokens", type=int, help="override the preset's max new tokens")
    g.add_argument("--samples", type=int, default=1, help="responses per OOD record and mode")
    g.add_argument("--price-in", type=float, default=0.0, help="evaluated model's price per 1k prompt tokens")
    g.add_argument("--price-out", type=float, default=0.0, help="evaluated model's price per 1k completion tokens")
    j = p.add_argument_group("judging")
    j.add_argument("--judge", action="append", default=[],
                   help="judge spec, repeatable: name=N,model=M,base_url=U[,api_key_env=E,price_in=P,price_out=Q]")
    j.add_argument("--allow-partial-judges", action="store_true",
                   help="average items over the judges that succeeded (default: only items every judge scored)")
    r = p.add_argument_group("robustness")
    r.add_argument("--concurrency", type=int, default=8)
    r.add_argument("--timeout", type=float, default=120.0)
    r.add_argument("--max-retries", type=int, default=5)
    r.add_argument("--backoff", type=float, default=1.0, help="base backoff seconds between retries")
    r.add_argument("--cache-dir", help="response cache folder (makes reruns free)")
    r.add_argument("--chunk-size", type=int, default=16, help="items per append to the results file")
    r.add_argument("--report-only", action="store_true", help="rebuild the report from results.jsonl; call no model")
    r.add_argument("--no-progress", action="store_true")
    t = p.add_argument_group("token shift (figure 5): the same responses scored by two checkpoints")
    t.add_argument("--token-shift", nargs=2, metavar=("BASE_DIR", "ALIGNED_DIR"),
                   help="two HF checkpoint directories (one tokenizer); writes token_shift.{md,csv,png} to --out")
    t.add_argument("--responses-from", metavar="RUN_DIR",
                   help="a `caspo eval --out` folder whose results.jsonl holds the responses (default: --out); "
                        "their prompts are rebuilt from --records and --modes")
    t.add_argument("--top-k", type=int, default=5, help="most shifted tokens taken per response (the paper's K=5)")
    t.add_argument("--shift-rank", default="abs", choices=["abs", "increase", "decrease"],
                   help="rank by |delta log p| (default), by its increase or by its decrease")


def _client(args, base_url: str, model: str, api_key_env: str, temperature: float | None):
    return ChatClient(ClientConfig(
        base_url=base_url, model=model, api_key_env=api_key_env, max_concurrency=args.concurrency,
        timeout_s=args.timeout, max_retries=args.max_retries, backoff_base_s=args.backoff,
        cache_dir=args.cache_dir, temperature=temperature, progress=not args.no_progress,
    ))


def _fail(msg: str) -> int:
    print(f"caspo eval: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        if args.compare:
            return _run_compare(args)
        if args.token_shift:
            return _run_token_shift(args)
        return _run_eval(args)
    except CaspoError as e:  # UserError: exit 2; EvalFailed: exit 1
        print(f"caspo eval: {e}", file=sys.stderr)
        return e.exit_code
    except EngineNotAvailable as e:
        return _fail(str(e))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        return _fail(str(e))


def _run_eval(args) -> int:
    if args.engine != "openai" and not args.report_only and not args.checkpoint:
        raise ValueError(f"--engine {args.engine} needs --checkpoint DIR (an HF directory with config.json, "
                         "safetensors, tokenizer and preprocessor_config.json)")
    if not args.out:
        raise ValueError("--out is required (the folder for results.jsonl and the report)")
    if not (args.records or args.siuo or args.mss):
        raise ValueError("nothing to evaluate: pass --records, --siuo and/or --mss")
    out = pathlib.Path(args.out)
    results_path = out / "results.jsonl"
    judge_specs = [parse_endpoint_spec(s) for s in args.judge]
    names = [j["name"] for j in judge_specs]
    if len(set(names)) != len(names):
        raise ValueError(f"judge names must be unique, got {names}")
    if not judge_specs and not args.report_only:
        raise ValueError("pass at least one --judge name=..,model=..,base_url=..")
    if args.report_only:
        run_json = out / "run.json"
        if not judge_specs and run_json.exists():
            names = json.loads(run_json.read_text())["judges"]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    sampling = dataclasses.replace(
        PAPER_SAMPLING,
        **({"temperature": args.temperature} if args.temperature is not None else {}),
        **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}),
    )

    # Work items (data errors surface before any model call).
    items, siuo_n, mss_n = [], 0, 0
    if args.records:
        records = load_safety_records(args.records, args.image_root, check_images=True)[: args.limit]
        constitutions = None
        if "constitution" in modes:
            constitutions = load_constitutions(args.constitutions)
        items += suites.ood_items(records, modes, constitutions, samples=args.samples)
    if args.siuo:
        s_items = load_siuo(args.siuo, args.siuo_images)[: args.limit]
        siuo_n = len(s_items)
        items += suites.siuo_items(s_items, samples=args.siuo_samples)
    if args.mss:
        pairs = load_mssbench(args.mss, args.mss_root)[: args.limit]
        mss_n = len(pairs)
        items += suites.mss_items(pairs)

    gen_name = args.model or args.checkpoint or args.engine
    if not args.report_only:
        if args.engine == "openai" and not (args.base_url and args.model):
            raise ValueError("--engine openai needs --base-url and --model of the evaluated model")
        run_info = {"generator": gen_name, "sampling": dataclasses.asdict(sampling), "prompts_version": PROMPTS_VERSION}
        out.mkdir(parents=True, exist_ok=True)
        run_meta = {
            "generator": gen_name, "engine": args.engine, "base_url": args.base_url, "sampling": dataclasses.asdict(sampling),
            "judges": names, "judge_models": {j["name"]: j["model"] for j in judge_specs}, "modes": modes,
            "rubric_version": RUBRIC_VERSION, "prompts_version": PROMPTS_VERSION,
        }
        _check_resume_compatible(out / "run.json", run_meta)
        (out / "run.json").write_text(json.dumps(run_meta, indent=2))
        gen_client = None
        if args.engine == "openai":
            gen_client = _client(args, args.base_url, args.model, args.api_key_env, sampling.temperature)
            generator = OpenAIGenerator(gen_client, gen_name)
        else:
            generator = local_generator(args.engine, args.checkpoint, ignore_custom_code=args.ignore_custom_code,
                                        progress=not args.no_progress)
        judges = [Judge(j["name"], _client(args, j["base_url"], j["model"], j["api_key_env"], 0.0), j["price_in"], j["price_out"])
                  for j in judge_specs]
        totals = RunStats()
        try:
            with ResultsStore(results_path) as store:
                for bench, fn in (("ood", judging.rse_judge_fn), ("siuo", judging.siuo_judge_fn), ("mss", judging.mss_judge_fn)):
                    bench_items = [it for it in items if it.meta["benchmark"] == bench]
                    if bench_items:
                        st = run_items(bench_items, store, generator, sampling, judges, fn, chunk_size=args.chunk_size,
                                       run_info=run_info, progress=not args.no_progress)
                        print(f"{bench}: {st.items} items, {st.skipped_done} already done, {st.done} done now, "
                              f"{st.failed} failed", file=sys.stderr)
                        _print_failures(st)
                        for f in ("items", "skipped_done", "done", "failed"):
                            setattr(totals, f, getattr(totals, f) + getattr(st, f))
                        totals.errors.update(st.errors)
        finally:
            if gen_client is not None:
                gen_client.close()
            for j in judges:
                j.client.close()
    else:
        totals = None
        judges = [Judge(n, None) for n in names]

    # Report from the store only.
    wanted = {it.key for it in items}
    recs = {k: v for k, v in load_records(results_path).items() if k in wanted}
    summaries, by_cat = suites.ood_summaries(recs, names, modes, require_all_judges=not args.allow_partial_judges)
    extra = []
    if siuo_n:
        extra.append(("SIUO", suites.siuo_table(suites.siuo_summary(recs, names, effective_rate=args.siuo_effective), args.siuo_effective)))
    if mss_n:
        extra.append(("MSSBench", suites.mss_table(suites.mss_summary(recs, names), args.mss_rates)))
    usage = spent_totals(results_path, judges, (args.price_in, args.price_out), gen_name) if results_path.exists() else {}
    missing = len(wanted) - len(recs)
    notes = [f"generator: {gen_name}; judges: {', '.join(names)}; sampling: T={sampling.temperature}, max {sampling.max_new_tokens} new tokens",
             f"results: {len(recs)} of {len(wanted)} items recorded" + (f" ({missing} never attempted)" if missing else ""),
             "failed judgements reduce coverage and are never scored 0"]
    paths = report.write_report(out, summaries, by_cat, usage=usage, extra_sections=extra, notes=notes,
                                title=f"Evaluation of {gen_name}")
    if summaries:
        report.write_items_csv(out / "items.csv", suites.ood_item_scores(recs, names), names)
    print(f"report: {paths['markdown']}", file=sys.stderr)
    if totals is not None and totals.failed and not (totals.done or totals.skipped_done):
        (error, count), = totals.errors.most_common(1) or [("no error recorded", totals.failed)]
        raise EvalFailed(f"all {totals.failed} items failed, so {paths['markdown']} covers none; most common "
                         f"error ({count}x): {error}")
    return 0


def _print_failures(stats) -> None:
    """The three most common reasons items failed, and whether a rerun can help."""
    for error, count in stats.errors.most_common(3):
        print(f"  {count}x {error}", file=sys.stderr)
    if stats.failed:
        retryable = not stats.errors or any(NOT_RETRIED not in e for e in stats.errors)
        print("  " + ("rerun the same command to retry the failed items" if retryable else
                      "a rerun repeats these errors: fix what they name first"), file=sys.stderr)


_MUST_MATCH = ("generator", "sampling", "rubric_version", "prompts_version")


def _check_resume_compatible(run_json: pathlib.Path, new: dict[str, Any]) -> None:
    """Refuse to mix responses of another model / sampling / prompt wording into one results file."""
    if not run_json.exists():
        return
    old = json.loads(run_json.read_text())
    diff = [k for k in _MUST_MATCH if k in old and old[k] != new[k]]
    if diff:
        details = "; ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in diff)
        raise ValueError(f"{run_json.parent} holds results of a different run ({details}); "
                         "use a new --out folder (or delete that folder to start over)")


def _run_compare(args) -> int:
    before, after = (pathlib.Path(x) for x in args.compare)
    sums = []
    judge_sets = []
    for d in (before, after):
        if not (d / "results.jsonl").exists():
            raise FileNotFoundError(f"{d / 'results.jsonl'} not found; --compare takes two `caspo eval --out` folders")
        judge_sets.append(json.loads((d / "run.json").read_text())["judges"] if (d / "run.json").exists() else None)
    judges = [j for j in (judge_sets[0] or []) if j in (judge_sets[1] or [])]
    if not judges:
        raise ValueError(f"{before} and {after} share no judge (run.json 'judges'); compare runs judged by the same judges")
    for d in (before, after):
        s, _ = suites.ood_summaries(load_records(d / "results.jsonl"), judges)
        sums.append(s)
    deltas = metrics.compare(sums[0], sums[1])
    if not deltas:
        raise ValueError(f"{before} and {after} share no OOD mode")
    out = pathlib.Path(args.out or after)
    out.mkdir(parents=True, exist_ok=True)
    text = (f"# {after.name} vs {before.name}\n\nValues of {after.name}; in brackets the change from {before.name} "
            f"(absolute, relative %). Judges: {', '.join(judges)}.\n\n" + report.compare_table(deltas) + "\n")
    (out / "compare.md").write_text(text + "\n![before/after](compare.png)\n")
    report.write_compare_csv(out / "compare.csv", deltas)
    report.plot_compare(out / "compare.png", deltas, (before.name, after.name))
    print(text)
    return 0


def _run_token_shift(args) -> int:
    """Figure 5: delta log p = log pi_aligned - log pi_base on stored responses, top-K classes."""
    if not (args.out and args.records):
        raise UserError("--token-shift needs --out (where the figure goes) and --records (to rebuild the prompts)")
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    base, aligned = args.token_shift
    for d in (base, aligned):
        if not (pathlib.Path(d) / "config.json").is_file():
            raise UserError(f"--token-shift {d}: no config.json there; pass two HF checkpoint directories")
    results = pathlib.Path(args.responses_from or args.out) / "results.jsonl"
    if not results.is_file():
        raise UserError(f"{results} not found; --responses-from takes a `caspo eval --out` folder (default --out)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    records = {r.id: r for r in load_safety_records(args.records, args.image_root, check_images=True)[: args.limit]}
    constitutions = None
    if "constitution" in modes:
        constitutions = load_constitutions(args.constitutions)
    keys, prompts, responses = [], [], []
    for key, rec in sorted(load_records(results).items()):
        if rec.get("benchmark") == "ood" and rec.get("mode") in modes and rec.get("id") in records \
                and isinstance(rec.get("response"), str):
            keys.append(key)
            prompts.append(build_prompt(records[rec["id"]], rec["mode"], constitutions))
            responses.append(rec["response"])
    if not keys:
        raise UserError(f"{results} holds no response for the records of {args.records} in modes {modes}")
    tokens, (logp_base, logp_aligned) = score_under_checkpoints(
        [base, aligned], prompts, responses, ignore_custom_code=args.ignore_custom_code,
        progress=not args.no_progress)
    result = token_shift.token_shift(tokens, logp_base, logp_aligned, k=args.top_k, by=args.shift_rank)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = f"{pathlib.Path(aligned).name} vs {pathlib.Path(base).name}"
    with open(out / "token_shift.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "position", "token", "class", "logp_base", "logp_aligned", "delta"])
        for t in result.top:
            w.writerow([keys[t.sequence], t.position, t.token, t.token_class,
                        f"{logp_base[t.sequence][t.position]:.6f}", f"{logp_aligned[t.sequence][t.position]:.6f}",
                        f"{t.delta:.6f}"])
    table = ["| class | tokens | share % |", "|---|---:|---:|"] + [
        f"| {c} | {result.counts[c]} | {result.shares[c]:.1f} |" for c in token_shift.CLASSES]
    text = (f"# Token shift: {label}\n\ndelta log p = log pi({aligned}) - log pi({base}) on {len(keys)} responses "
            f"from {results}; top {args.top_k} per response by {args.shift_rank}; {len(result.top)} tokens.\n\n"
            + "\n".join(table) + "\n")
    (out / "token_shift.md").write_text(text + "\n![token classes](token_shift.png)\n"
                                        "\nPer token: token_shift.csv.\n")
    report.plot_token_shift(out / "token_shift.png", {label: result})
    print(text)
    return 0
