"""The reward model's training data as `caspo rm` reads it: balanced by source model and length."""

from collections import Counter

from caspo_jax.curate import pipeline
from caspo_jax.curate.stage import write_stage
from caspo_jax.data.formats import load_pairs
from caspo_jax.loop.reward_model import load_scored_responses


def _resp(record, model, mode, words, total):
    rid = f"{record}/{model}/{mode}/0"
    return {"id": rid, "record_id": record, "category": "violent", "images": [], "query": f"q {record}",
            "hazard": "h", "source_model": model, "prompt_mode": mode, "sample": 0,
            "response": " ".join([rid.replace("/", "-")] * words),
            "scores": {"risk": min(2, total), "safety": min(2, max(0, total - 2)), "effectiveness": max(0, total - 4),
                       "total": total, "reasons": {}}}


def _world():
    """Per record: m1 a short (5 words) and a long (20) safe answer, m2 two long safe ones, m3 a short
    unsafe one (total 0). Over 4 records, with the edge at 10 words, the cells are
    m1/short 4, m1/long 4, m2/long 8, m3/short 4."""
    out = []
    for k in range(4):
        rec = f"r{k}"
        out += [_resp(rec, "m1", "standard", 5, 6), _resp(rec, "m1", "constitution", 20, 6),
                _resp(rec, "m2", "standard", 20, 6), _resp(rec, "m2", "constitution", 20, 6),
                _resp(rec, "m3", "standard", 5, 0)]
    return out


def test_rm_files_hold_the_balanced_pool(tmp_path):
    out = tmp_path / "cur"
    write_stage(pipeline.stage_path(out, "respond"), "respond", "t", _world(), [])
    sel = pipeline.run_select(out, pair_probability=1.0, rm_length_edges=[10], seed=0)
    # median_low of (4, 4, 8, 4) = 4: only m2/long is cut, 8 -> 4; the pool has 16 of 20
    assert sel.rm_balance.kept == {("m1", 0): 4, ("m1", 1): 4, ("m2", 1): 4, ("m3", 0): 4}
    pairs = load_pairs(out / "pairs.jsonl", out)
    scored = load_scored_responses(out / "mse.jsonl", out)
    # each record: its best-ranked safe answer vs m3's unsafe one (gap 6 > 4, p = 1) -> 4 pairs;
    # the next two are both 6 (gap 0): MSE. 16 - 2 x 4 = 8 MSE records.
    assert len(pairs) == 4 and len(scored) == 8
    assert all(p.meta["rejected_model"] == "m3" and p.meta["gap"] == 6 for p in pairs)
    models = Counter([s.meta["source_model"] for s in scored]
                     + [p.meta[k] for p in pairs for k in ("chosen_model", "rejected_model")])
    assert models == {"m1": 8, "m2": 4, "m3": 4}
    lengths = Counter(["short" if len(t.split()) < 10 else "long"
                       for t in [s.response for s in scored] + [x for p in pairs for x in (p.chosen, p.rejected)]])
    assert lengths == {"short": 8, "long": 8}
    assert sorted(s.score for s in scored) == [6] * 8
