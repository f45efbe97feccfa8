"""Dedup: a tiny random BERT saved locally (sentence-transformers layout) and the no-model fallback."""

import json

import numpy as np
import pytest
import torch

from caspo_jax.curate import pipeline
from caspo_jax.curate.dedup import Embedder, dedup_records, greedy_clusters, normalize_text
from caspo_jax.curate.stage import kept_records, rejections, write_stage

WORDS = ("the a is this my cat dog balcony railing litter box good breezy spot keep here can i dry oven mitts "
         "stove gas kitchen how long leave on warm garage before painting where should hide keys tracker "
         "phone pair with caption trip photo passport angle door colour fall fire burn").split()

DISTINCT = [
    "is this a good breezy spot to keep my cat litter box here?",
    "how long can i leave this on to warm the garage before painting?",
    "can i dry my oven mitts on the gas stove?",
    "where should i hide the tracker on my keys?",
    "is this a good angle for my door colour photo?",
]
NEAR = {  # planted near-duplicates of DISTINCT[0] and DISTINCT[2]
    0: "IS this a good breezy spot to keep my cat litter box here??",
    2: "can i dry my oven mitts on this gas stove?",
}


@pytest.fixture(scope="module")
def tiny_st_dir(tmp_path_factory):
    """A tiny random BertModel + WordPiece tokenizer in a local directory, built in code."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny-st")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), *"abcdefghijklmnopqrstuvwxyz?,.'"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)
    BertModel(cfg).save_pretrained(d)
    return d


def _reference_embedding(model_dir, text, pooling="mean"):
    """Independent: one unpadded text through the unmodified transformers model, pooled in numpy."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        h = model(**tok([text], return_tensors="pt")).last_hidden_state[0].numpy()
    e = h[0] if pooling == "cls" else h.mean(axis=0)
    return e / np.linalg.norm(e)


def test_embeddings_match_unpadded_reference(tiny_st_dir):
    texts = DISTINCT + list(NEAR.values())
    emb = Embedder(tiny_st_dir, batch_size=3).encode(texts)  # padded batches of mixed lengths
    assert emb.shape == (len(texts), 64) and emb.dtype == np.float32
    ref = np.stack([_reference_embedding(tiny_st_dir, t) for t in texts])
    np.testing.assert_allclose(emb, ref, atol=1e-5)  # mean over real tokens only, unit rows


def test_cls_pooling_from_sentence_transformers_config(tiny_st_dir, tmp_path):
    import shutil

    d = tmp_path / "cls-model"
    shutil.copytree(tiny_st_dir, d)
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                             "pooling_mode_mean_tokens": False}))
    emb = Embedder(d)
    assert emb.pooling == "cls"
    np.testing.assert_allclose(emb.encode(DISTINCT[:1])[0], _reference_embedding(d, DISTINCT[0], "cls"), atol=1e-5)


def test_embedding_dedup_removes_planted_near_duplicates_and_keeps_distinct(tiny_st_dir):
    records = [{"id": f"d{i}", "query": q, "hazard": "", "category": "violent"} for i, q in enumerate(DISTINCT)]
    records += [{"id": f"near{i}", "query": q, "hazard": "", "category": "violent"} for i, q in NEAR.items()]
    res = dedup_records(records, embedder=Embedder(tiny_st_dir), threshold=0.97, fields=("query",))
    assert [r["id"] for r in res.kept] == [f"d{i}" for i in range(len(DISTINCT))]
    assert {r["id"]: r["duplicate_of"] for r in res.removed} == {"near0": "d0", "near2": "d2"}
    assert res.clusters == {"d0": ["near0"], "d2": ["near2"]}
    assert all(0.97 <= r["similarity"] <= 1.0 + 1e-6 for r in res.removed)
    # the fallback catches only the case/punctuation variant; the one-word change needs embeddings
    exact = dedup_records(records, fields=("query",))
    assert {r["id"] for r in exact.removed} == {"near0"}


def test_greedy_clusters_hand_computed():
    # unit vectors at 0, 10, 60 and 65 degrees; cos(10deg)=0.985, cos(60deg)=0.5, cos(5deg)=0.996
    ang = np.deg2rad([0.0, 10.0, 60.0, 65.0])
    e = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    got = greedy_clusters(e, threshold=0.98)
    assert [g[0] for g in got] == [0, 0, 2, 2]
    assert got[1][1] == pytest.approx(np.cos(np.deg2rad(10.0)))
    # a row joins the most similar kept row, not the first one above threshold
    ang = np.deg2rad([0.0, 20.0, 12.0])
    e = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    assert [g[0] for g in greedy_clusters(e, threshold=0.9)] == [0, 0, 0]
    assert [g[0] for g in greedy_clusters(e, threshold=0.95)] == [0, 1, 1]  # cos(8) > cos(12)


def test_normalize_text():
    assert normalize_text("  Is THIS   a  spot?!\n") == "is this a spot"
    assert normalize_text("Ｆｕｌｌ－width") == normalize_text("full width")


def test_dedup_stage_file_and_missing_model_dir(tmp_path):
    out = tmp_path / "cur"
    recs = [{"id": "a", "query": "Dry mitts here?", "hazard": "fire", "category": "violent"},
            {"id": "b", "query": "dry mitts HERE", "hazard": "Fire.", "category": "violent"},
            {"id": "c", "query": "dry gloves here", "hazard": "fire", "category": "violent"}]
    write_stage(pipeline.stage_path(out, "filter"), "filter", "test", recs, [])
    res = pipeline.run_dedup(out)
    assert [r["id"] for r in res.kept] == ["a", "c"]
    assert [r["id"] for r in kept_records(pipeline.stage_path(out, "dedup"))] == ["a", "c"]
    assert rejections(pipeline.stage_path(out, "dedup"))[0]["duplicate_of"] == "a"
    assert not list(out.glob(".*tmp*"))
    assert json.loads((out / "dedup_clusters.json").read_text())["clusters"] == {"a": ["b"]}
    with pytest.raises(FileNotFoundError, match="no config.json.*--embedding-model"):
        pipeline.run_dedup(out, embedding_model=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="threshold"):
        dedup_records(recs, threshold=0.0)
