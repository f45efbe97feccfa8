"""The stages wired to one output folder: each reads the previous stage's kept records.

    <out>/synthesize.jsonl -> filter.jsonl -> dedup.jsonl (+ dedup_clusters.json) -> images.jsonl (optional)
          -> rewrite.jsonl -> benchmark.jsonl (SafetyRecord JSONL, for `caspo eval` and RL)
          -> respond.jsonl -> select.jsonl + sft.jsonl, pairs.jsonl, mse.jsonl

Every function here is a thin composition of the stage modules; each can be called alone
(the CLI calls one per invocation) and rerun to resume.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from caspo_jax.curate import dedup as dedup_mod
from caspo_jax.curate.images import attach_images
from caspo_jax.curate.selection import select
from caspo_jax.curate.stage import kept_records, write_stage
from caspo_jax.data.importers import write_jsonl
from caspo_jax.data.records import SafetyRecord, load_records

__all__ = ["export_benchmark", "run_dedup", "run_images", "run_select", "stage_input", "stage_path"]

# Extra scenario fields carried into the benchmark records' `meta`.
_META_FIELDS = ("subcategory", "scene", "hazard_object", "causal_chain", "source_model", "original_query")


def stage_path(out_dir: str | Path, stage: str) -> Path:
    return Path(out_dir) / f"{stage}.jsonl"


def stage_input(out_dir: str | Path, stage: str) -> list[dict[str, Any]]:
    """The kept records the stage consumes (rewrite reads images.jsonl if it exists, else dedup.jsonl)."""
    previous = {"filter": "synthesize", "dedup": "filter", "images": "dedup", "respond": "rewrite",
                "select": "respond", "export": "rewrite"}
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
    """Writes <out>/benchmark.jsonl in `caspo_jax.data.records` format and reloads it to check.

    Image paths stay relative to the image root: pass the same root as `--image-root` to
    `caspo eval` or `load_records(path, root)`.
    """
    records = stage_input(out_dir, "export")
    path = Path(out_dir) / "benchmark.jsonl"
    items = [SafetyRecord(
        id=r["id"], images=tuple(Path(p) for p in r.get("images") or ()), query=r["query"], category=r["category"],
        malicious_query=r.get("malicious_query"), reference=r.get("hazard"),
        meta={k: r[k] for k in _META_FIELDS if k in r},
    ) for r in records]
    write_jsonl(path, items)
    if items:
        load_records(path, image_root if image_root is not None else Path(out_dir), check_images=image_root is not None)
    return path


def run_select(out_dir: str | Path, *, min_total: int = 5, gap_threshold: int = 4, pair_probability: float = 0.85,
               seed: int = 0):
    """Writes sft.jsonl, pairs.jsonl, mse.jsonl and select.jsonl (per-record SFT outcome)."""
    responses = stage_input(out_dir, "select")
    sel = select(responses, min_total=min_total, gap_threshold=gap_threshold, pair_probability=pair_probability,
                 seed=seed)
    out = Path(out_dir)
    write_jsonl(out / "sft.jsonl", sel.sft)
    write_jsonl(out / "pairs.jsonl", sel.pairs)
    write_jsonl(out / "mse.jsonl", sel.mse)
    version = f"min_total={min_total},gap>{gap_threshold},p={pair_probability},seed={seed}"
    kept = [{"id": s.meta["record_id"], "category": s.category, "sft_id": s.id} for s in sel.sft]
    write_stage(stage_path(out, "select"), "select", version, kept,
                [{**r, "record": {"category": r.get("category")}} for r in sel.rejected])
    return sel
