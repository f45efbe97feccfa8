"""Stage 3, `dedup`: near-duplicate removal by sentence embeddings, or exact normalised text.

Why our own loader instead of `sentence-transformers`: a sentence-transformers directory is
a Hugging Face model plus a pooling config, so `transformers.AutoModel` + masked mean
pooling (or CLS, when `1_Pooling/config.json` says so) + L2 normalisation reproduces its
embeddings without a new dependency. The model is loaded from a local directory only.

Clustering is greedy in input order: a record joins the cluster of the most similar kept
record when the cosine similarity reaches `threshold`, otherwise it starts a cluster and is
kept. Without a model, records whose normalised text (NFKC, lower case, punctuation
dropped, whitespace collapsed) is equal are duplicates. The text compared is the
record's `fields` joined (default: query and hazard, the paper's "risk deduplication").
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from caspo_jax.curate.stage import write_stage

__all__ = ["DedupResult", "Embedder", "dedup_records", "greedy_clusters", "normalize_text", "write_dedup"]


def normalize_text(text: str) -> str:
    """NFKC, lower case, punctuation and symbols removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PSZC" else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


class Embedder:
    """Sentence embeddings from a local Hugging Face / sentence-transformers directory.

    encode(texts) -> float32 array N x D with unit rows. `pooling`: "mean" (default, or
    read from `1_Pooling/config.json`) or "cls".
    """

    def __init__(self, model_dir: str | Path, *, batch_size: int = 32, max_length: int = 256,
                 pooling: str | None = None):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{model_dir}: no config.json; point --embedding-model at a local sentence-transformers "
                "directory (config.json, tokenizer files, weights), or omit it to use the exact-text fallback"
            )
        # the PyTorch path (an optional dependency): loaded only when an embedding model is given
        import torch  # noqa: F401
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self.pooling = pooling or _pooling_mode(model_dir)
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        self.name = str(model_dir)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            with torch.no_grad():
                h_BxLxD = self.model(**enc).last_hidden_state.float()
            if self.pooling == "cls":
                e_BxD = h_BxLxD[:, 0]
            else:
                mask_BxLx1 = enc["attention_mask"].unsqueeze(-1).to(h_BxLxD.dtype)
                e_BxD = (h_BxLxD * mask_BxLx1).sum(1) / mask_BxLx1.sum(1).clamp(min=1.0)
            e_BxD = torch.nn.functional.normalize(e_BxD, dim=-1)
            out.append(e_BxD.numpy().astype(np.float32))
        if not out:
            return np.zeros((0, int(self.model.config.hidden_size)), np.float32)
        return np.concatenate(out, axis=0)


def _pooling_mode(model_dir: Path) -> str:
    cfg = model_dir / "1_Pooling" / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        if data.get("pooling_mode_cls_token") and not data.get("pooling_mode_mean_tokens"):
            return "cls"
    return "mean"


def greedy_clusters(embeddings_NxD: np.ndarray, threshold: float) -> list[tuple[int, float]]:
    """For each row i: (index of its representative, cosine to it); a kept row is its own (i, 1.0).

    Rows must be unit vectors. Row i joins the most similar earlier *kept* row when that
    cosine is >= threshold.
    """
    reps: list[int] = []
    out: list[tuple[int, float]] = []
    for i, e in enumerate(embeddings_NxD):
        if reps:
            sims = embeddings_NxD[reps] @ e
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                out.append((reps[best], float(sims[best])))
                continue
        reps.append(i)
        out.append((i, 1.0))
    return out


@dataclasses.dataclass
class DedupResult:
    kept: list[dict[str, Any]]
    removed: list[dict[str, Any]]  # {"id", "duplicate_of", "similarity", "reason", "record"}
    clusters: dict[str, list[str]]  # representative id -> removed ids (only clusters with removals)
    method: str


def dedup_records(
    records: Sequence[dict[str, Any]],
    *,
    embedder: Embedder | None = None,
    threshold: float = 0.9,
    fields: Sequence[str] = ("query", "hazard"),
) -> DedupResult:
    """Removes near-duplicates (embedder) or normalised-text duplicates (embedder=None)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"dedup threshold must be in (0, 1], got {threshold}")
    texts = [" | ".join(str(r.get(f, "")) for f in fields) for r in records]
    if embedder is not None:
        assigned = greedy_clusters(embedder.encode(texts), threshold)
        method = f"embedding cosine >= {threshold} ({embedder.name}, fields {list(fields)})"
    else:
        first: dict[str, int] = {}
        assigned = []
        for i, t in enumerate(texts):
            key = normalize_text(t)
            rep = first.setdefault(key, i)
            assigned.append((rep, 1.0))
        method = f"exact normalised text (fields {list(fields)})"
    result = DedupResult([], [], {}, method)
    for i, (rep, sim) in enumerate(assigned):
        if rep == i:
            result.kept.append(dict(records[i]))
            continue
        rep_id = records[rep]["id"]
        result.removed.append({
            "id": records[i]["id"], "duplicate_of": rep_id, "similarity": round(sim, 6),
            "kind": "near_duplicate", "reason": f"dedup: near-duplicate of {rep_id} (similarity {sim:.4f}; {method})",
            "record": dict(records[i]),
        })
        result.clusters.setdefault(rep_id, []).append(records[i]["id"])
    return result


def write_dedup(result: DedupResult, out_path: str | Path) -> None:
    """Writes the stage file from scratch (dedup is cheap and deterministic: no resume needed)."""
    write_stage(out_path, "dedup", result.method, result.kept, result.removed)
