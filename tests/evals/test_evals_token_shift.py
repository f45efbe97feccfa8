"""Token-shift analysis: hand-computed top-K and class shares."""

import numpy as np
import pytest

from caspo_jax.evals import token_shift as TS


@pytest.mark.parametrize(
    "token,cls",
    [
        ("Ġthe", "function"), ("\u2581Do", "function"), ("n't", "function"),
        ("Ġknife", "content"), ("\u2581Warning", "content"), ("railing", "content"),
        (",", "punctuation"), ("**", "punctuation"), ("Ċ", "punctuation"), ("\n\n", "punctuation"), ("Ġ", "punctuation"),
        ("<|im_end|>", "other"), ("42", "other"), ("3rd", "other"),
    ],
)
def test_classify_token(token, cls):
    assert TS.classify_token(token) == cls


def test_top_k_ranking_and_ties():
    d = np.array([0.5, -2.0, 2.0, 0.1, -0.5])
    assert TS.top_k_shift(d, 3, "abs").tolist() == [1, 2, 0]  # tie |2| -> earlier position first
    assert TS.top_k_shift(d, 2, "increase").tolist() == [2, 0]
    assert TS.top_k_shift(d, 2, "decrease").tolist() == [1, 4]
    assert TS.top_k_shift(d, 10, "abs").shape == (5,)
    with pytest.raises(ValueError, match="by must be"):
        TS.top_k_shift(d, 1, "kl")


def test_token_shift_pooled_shares():
    toks = [["ĠThe", "Ġstove", ",", "Ġis", "Ġhot", "<|im_end|>"], ["**", "Ġfire", "Ġa"]]
    ref = [[-1.0, -2.0, -3.0, -1.0, -5.0, -0.1], [-4.0, -1.0, -2.0]]
    new = [[-1.1, -0.5, -0.1, -1.0, -4.0, -3.0], [-0.5, -1.2, -2.0]]
    # seq 0 deltas: -.1, 1.5, 2.9, 0, 1.0, -2.9 ; mask drops the EOS token
    mask = [[True] * 5 + [False], [True] * 3]
    r = TS.token_shift(toks, ref, new, k=2, mask=mask)
    assert [(t.sequence, t.position, t.token_class) for t in r.top] == [
        (0, 2, "punctuation"), (0, 1, "content"), (1, 0, "punctuation"), (1, 1, "content")]
    assert r.top[0].delta == pytest.approx(2.9)
    assert r.counts == {"punctuation": 2, "function": 0, "content": 2, "other": 0}
    assert r.shares["punctuation"] == pytest.approx(50.0) and sum(r.shares.values()) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="sequence 1"):
        TS.token_shift(toks, ref, [new[0], new[1][:2]])


def test_token_shift_figure(tmp_path):
    from PIL import Image

    from caspo_jax.evals.report import plot_token_shift

    r = TS.token_shift([["Ġthe", ",", "Ġfire"]], [[-1.0, -1.0, -1.0]], [[-0.5, 0.0, -3.0]], k=2)
    plot_token_shift(tmp_path / "shift.png", {"constitution vs base": r, "DPO vs base": r})
    with Image.open(tmp_path / "shift.png") as im:
        assert im.format == "PNG" and im.size[0] >= 500
