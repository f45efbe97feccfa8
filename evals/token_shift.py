"""Token-shift analysis (the paper's figure 5): which tokens move most between two models.

For one response scored by a reference model and a shifted model (e.g. base vs.
DPO, or plain vs. constitution-conditioned), let ``delta_t = logp_new_t - logp_ref_t``
per response token. We take the top-K positions by the chosen ranking, then report the
share of those tokens in each coarse class.

Coarse classes come from an offline classifier (no tagger download): a token string is
normalised (SentencePiece ``▁`` / byte-BPE ``Ġ``/``Ċ`` markers stripped, lower-cased), then

* ``punctuation``: only punctuation, symbols or whitespace (incl. markdown ``**``, ``\n``);
* ``function``: in ``FUNCTION_WORDS`` (determiners, pronouns, prepositions,
  conjunctions, auxiliaries, common adverbs of degree/negation), the closed classes of
  the universal POS tagset the paper cites;
* ``content``: an alphabetic word otherwise (nouns, verbs, adjectives, adverbs: the
  paper's "core content and modifiers");
* ``other``: numbers, special tokens (``<|im_end|>``) and word pieces mixing letters and
  digits.

Ranking by ``|delta|`` (default) is our reading: the paper says "top-K (K=5) shifted
tokens" (section 4) and "highest KL divergence" (figure 5's caption) without a sign; the
classifier stands in for the paper's POS tagger (no tagger download), a deviation.

Pure functions over Python/numpy data; ``evals.shift_scoring`` scores stored responses
under two checkpoints and ``caspo eval --token-shift BASE ALIGNED`` draws the figure.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Sequence

import numpy as np

CLASSES: tuple[str, ...] = ("punctuation", "function", "content", "other")

FUNCTION_WORDS: frozenset[str] = frozenset(
    """
    a an the this that these those my your his her its our their whose which what who whom
    i me you he him she it we us they them myself yourself itself ourselves themselves
    mine yours hers ours theirs one ones
    of in on at by for with about against between into through during before after above
    below to from up down out off over under again further via per upon within without
    across along around among behind beyond toward towards onto than like as
    and or but nor so yet if because while although though unless until whether since
    be am is are was were been being have has had having do does did doing done
    can could may might must shall should will would ought
    not no n't nt very too just also only then there here when where why how
    all any both each few more most other some such own same s t
    """.split()
)

_MARKERS = re.compile(r"^[\u2581\u0120\u010a\u0109 ]+")
_PUNCT = re.compile(r"^[\W_]+$", re.UNICODE)
_ALPHA = re.compile(r"^[^\W\d_]+(?:['\u2019][^\W\d_]+)?$", re.UNICODE)
_SPECIAL = re.compile(r"^<\|?[^>]*\|?>$")


def normalize_token(token: str) -> str:
    """Strip tokenizer word-boundary markers and lower-case."""
    return _MARKERS.sub("", token).lower()


def classify_token(token: str) -> str:
    """Coarse class of one token string: punctuation, function, content or other."""
    if _SPECIAL.match(token.strip()):
        return "other"
    t = normalize_token(token)
    if t == "" or _PUNCT.match(t):
        return "punctuation"  # whitespace-only or newline tokens are formatting
    if t in FUNCTION_WORDS or t.replace("\u2019", "'") in FUNCTION_WORDS:
        return "function"
    if _ALPHA.match(t):
        return "content"
    return "other"


@dataclasses.dataclass(frozen=True)
class ShiftedToken:
    sequence: int
    position: int
    token: str
    delta: float
    token_class: str


@dataclasses.dataclass(frozen=True)
class TokenShiftResult:
    top: list[ShiftedToken]  # all selected tokens, per sequence in rank order
    counts: dict[str, int]
    shares: dict[str, float]  # % of selected tokens per class (sum 100)


def top_k_shift(delta_T: np.ndarray, k: int, by: str = "abs") -> np.ndarray:
    """Positions of the k largest shifts (ties broken by position), rank order.

    ``by``: "abs" (|delta|, the default), "increase" (delta) or "decrease" (-delta).
    """
    delta_T = np.asarray(delta_T, dtype=np.float64)
    if by == "abs":
        key = np.abs(delta_T)
    elif by == "increase":
        key = delta_T
    elif by == "decrease":
        key = -delta_T
    else:
        raise ValueError(f"by must be 'abs', 'increase' or 'decrease', got {by!r}")
    order = np.lexsort((np.arange(len(key)), -key))  # primary: -key, secondary: position
    return order[: min(k, len(key))]


def token_shift(
    tokens: Sequence[Sequence[str]],
    logp_ref: Sequence[Sequence[float]],
    logp_new: Sequence[Sequence[float]],
    *,
    k: int = 5,
    by: str = "abs",
    mask: Sequence[Sequence[bool]] | None = None,
) -> TokenShiftResult:
    """Top-K shifted tokens per sequence and their class shares, pooled over sequences.

    ``tokens[b]``, ``logp_ref[b]``, ``logp_new[b]`` are the response tokens of sequence
    b and their log-probabilities under the reference and the new model (same length
    T_b). ``mask[b][t]`` False excludes a position (e.g. padding or the EOS token).
    """
    if not (len(tokens) == len(logp_ref) == len(logp_new)):
        raise ValueError("tokens, logp_ref and logp_new must have one entry per sequence")
    top: list[ShiftedToken] = []
    for b, (toks, ref, new) in enumerate(zip(tokens, logp_ref, logp_new)):
        ref_T, new_T = np.asarray(ref, np.float64), np.asarray(new, np.float64)
        if not (len(toks) == ref_T.shape[0] == new_T.shape[0]):
            raise ValueError(
                f"sequence {b}: {len(toks)} tokens but {ref_T.shape[0]} / {new_T.shape[0]} log-probs"
            )
        keep_T = np.ones(len(toks), bool) if mask is None else np.asarray(mask[b], bool)
        idx = np.nonzero(keep_T)[0]
        delta_T = new_T[idx] - ref_T[idx]
        for r in top_k_shift(delta_T, k, by):
            pos = int(idx[r])
            top.append(ShiftedToken(b, pos, toks[pos], float(delta_T[r]), classify_token(toks[pos])))
    counts = Counter(t.token_class for t in top)
    n = len(top)
    return TokenShiftResult(
        top=top,
        counts={c: counts.get(c, 0) for c in CLASSES},
        shares={c: (100.0 * counts.get(c, 0) / n if n else 0.0) for c in CLASSES},
    )
