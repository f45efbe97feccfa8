"""The stages wired to one output folder: each reads the previous stage's kept records.

    <out>/synthesize.jsonl -> filter.jsonl -> dedup.jsonl (+ dedup_clusters.json) -> images.jsonl (optional)
          -> rewrite.jsonl -> benchmark.jsonl (SafetyRecord JSONL, for `caspo eval` and RL)
          -> respond.jsonl -> select.jsonl + sft.jsonl, pairs.jsonl, mse.jsonl (+ rm_balance.json)
                           -> dpo_disparity.jsonl / dpo_length_balanced.jsonl (`caspo curate dpo`)

Every function here is a thin composition of the stage modules; each can be called alone
(the CLI calls one per invocation) and rerun to resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from caspo_jax.curate import dedup as dedup_mod
from caspo_jax.curate.balance import balance_responses
from caspo_jax.curate.dpo_pairs import dpo_pairs
from caspo_jax.curate.images import attach_images
from caspo_jax.curate.selection import select
from caspo_jax.curate.stage import kept_records, write_stage
from caspo_jax.data.importers import write_jsonl
from caspo_jax.data.records import RecordError, SafetyRecord, load_records
from caspo_jax.errors import UserError

__all__ = ["dpo_path", "export_benchmark", "run_dedup", "run_dpo", "run_images", "run_select", "stage_input",
           "stage_path"]

# Extra scenario fields carried into the benchmark records' `meta`.
_META_FIELDS = ("subcategory", "scene", "hazard_object", "causal_chain", "source_model", "original_query")


def stage_path(out_dir: str | Path, stage: str) -> Path:
    return Path(out_dir) / f"{stage}.jsonl"


def stage_input(out_dir: str | Path, stage: str) -> list[dict[str, Any]]:
    """The kept records the stage consumes (rewrite reads images.jsonl if it exists, else dedup.jsonl)."""
    previous = {"filter": "synthesize", "dedup": "filter", "images": "dedup", "respond": "rewrite",
                "select": "respond", "dpo": "respond", "export": "rewrite"}
    if stage == "rewrite":
        source = "images" if stage_path(out_dir, "images").exists() else "dedup"
    elif stage in previous:
        source = previous[stage]
    else:
        raise ValueError(f"stage {stage!r} has no input stage")
    return kept_records(stage_path(out_dir, source))


def run_dedup(out_dir: str | Path, *, embedding_model: str | Path | None = None, threshold: float = 0.9,
              fields: Sequence[str] = ("query", "hazard")) -> dedup_mod.DedupResult:
    embedder = dedup_mod.Embedder(embedding_model) if embedding_model else None
    result = dedup_mod.dedup_records(stage_input(out_dir, "dedup"), embedder=embedder, threshold=threshold,
                                     fields=fields)
    dedup_mod.write_dedup(result, stage_path(out_dir, "dedup"))
    clusters = {"method": result.method, "kept": len(result.kept), "removed": len(result.removed),
                "clusters": result.clusters}
    (Path(out_dir) / "dedup_clusters.json").write_text(json.dumps(clusters, indent=2))
    return result


def run_images(out_dir: str | Path, image_root: str | Path, image_map: Mapping[str, list[str]] | None = None):
    kept, rejected = attach_images(stage_input(out_dir, "images"), image_root, image_map)
    write_stage(stage_path(out_dir, "images"), "images", str(Path(image_root).resolve()), kept, rejected)
    return kept, rejected


def export_benchmark(out_dir: str | Path, image_root: str | Path | None = None) -> Path:
    """Writes <out>/benchmark.jsonl in `caspo_jax.data.records` format, checked before it lands.

    The records are written to a hidden temporary file, reloaded with `load_records` (images
    checked under `image_root` when given) and only then renamed over benchmark.jsonl, so a
    failed check leaves no new file and a previous valid benchmark untouched. Image paths
    stay relative to the image root: pass the same root as `--image-root` to `caspo eval` or
    `load_records(path, root)`.
    """
    records = stage_input(out_dir, "export")
    path = Path(out_dir) / "benchmark.jsonl"
    if not records:
        raise UserError(f"{path} not written: the rewrite stage kept no records; rerun the earlier stages "
                        "(see summary.md for why records were rejected)")
    items = [SafetyRecord(
        id=r["id"], images=tuple(Path(p) for p in r.get("images") or ()), query=r["query"], category=r["category"],
        malicious_query=r.get("malicious_query"), reference=r.get("hazard"),
        meta={k: r[k] for k in _META_FIELDS if k in r},
    ) for r in records]
    tmp = path.with_name(f".{path.name}.check")
    write_jsonl(tmp, items)
    try:
        load_records(tmp, image_root if image_root is not None else Path(out_dir), check_images=image_root is not None)
        os.replace(tmp, path)
    except RecordError as exc:  # the message names the would-be file and its lines, not the temporary one
        why = str(exc).replace(str(tmp), str(path)).removeprefix(f"{path}: ")
        raise RecordError(f"{path} not written: {why}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def rm_balance_version(rm_balance: bool, per_cell: int | str, length_edges: Sequence[int] | None) -> str:
    if not rm_balance:
        return "rm_balance=off"
    return f"rm_balance=model+length,per_cell={per_cell},edges={'quartiles' if length_edges is None else list(length_edges)}"


def run_select(out_dir: str | Path, *, min_total: int = 5, gap_threshold: int = 4, pair_probability: float = 0.85,
               seed: int = 0, rm_balance: bool = True, rm_per_cell: int | str = "median",
               rm_length_edges: Sequence[int] | None = None):
    """Writes sft.jsonl, pairs.jsonl, mse.jsonl and select.jsonl (per-record SFT outcome).

    rm_balance: build the BT pairs and MSE records from responses balanced by source model
    and length (`balance.balance_responses`, the paper's appendix B.1); its cell counts go
    to rm_balance.json. SFT targets are chosen from every response either way.
    """
    responses = stage_input(out_dir, "select")
    out = Path(out_dir)
    report = None
    rm_pool = None
    if rm_balance:
        rm_pool, report = balance_responses(responses, per_cell=rm_per_cell, edges=rm_length_edges, seed=seed)
    sel = select(responses, min_total=min_total, gap_threshold=gap_threshold, pair_probability=pair_probability,
                 seed=seed, rm_responses=rm_pool)
    sel.rm_balance = report
    write_jsonl(out / "sft.jsonl", sel.sft)
    write_jsonl(out / "pairs.jsonl", sel.pairs)
    write_jsonl(out / "mse.jsonl", sel.mse)
    balance_path = out / "rm_balance.json"
    if report is not None:
        balance_path.write_text(json.dumps({
            "edges": list(report.edges), "per_cell": report.per_cell,
            "cells": [{"model": m, "length_bucket": b, "kept": report.kept.get((m, b), 0), "total": n}
                      for (m, b), n in sorted(report.total.items())],
        }, indent=2))
    else:
        balance_path.unlink(missing_ok=True)
    version = (f"min_total={min_total},gap>{gap_threshold},p={pair_probability},seed={seed},"
               f"{rm_balance_version(rm_balance, rm_per_cell, rm_length_edges)}")
    kept = [{"id": s.meta["record_id"], "category": s.category, "sft_id": s.id} for s in sel.sft]
    write_stage(stage_path(out, "select"), "select", version, kept,
                [{**r, "record": {"category": r.get("category")}} for r in sel.rejected])
    return sel


def dpo_path(out_dir: str | Path, mode: str) -> Path:
    """<out>/dpo_<mode>.jsonl (dpo_disparity.jsonl, dpo_length_balanced.jsonl)."""
    return Path(out_dir) / f"dpo_{mode.replace('-', '_')}.jsonl"


def run_dpo(out_dir: str | Path, mode: str, **options: Any) -> tuple[Path, list]:
    """Writes the DPO pairs of `mode` (`dpo_pairs.dpo_pairs`) from respond's scored responses.

    No pair is no file (a DPO run could not load an empty one): UserError says what to relax.
    """
    pairs = dpo_pairs(stage_input(out_dir, "dpo"), mode, **options)
    path = dpo_path(out_dir, mode)
    if not pairs:
        why = "no two responses of a record differ by more than the gap threshold"
        if mode == "length-balanced":
            why += ", or at each gap the chosen answer is always the longer one (or always the shorter)"
        raise UserError(f"{path} not written: no {mode} pair ({why}); lower --dpo-gap or collect more responses "
                        "per record (caspo curate respond --samples, more --model)")
    write_jsonl(path, pairs)
    return path, pairs
