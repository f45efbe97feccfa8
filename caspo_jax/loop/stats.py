"""Small statistics for experiment tables: a mean with its 95% interval, a rank AUC.

Pure NumPy (+ SciPy's t quantile: SciPy comes with JAX). Used by `caspo sweep` (cells x
seeds) and by the evaluation readouts (P(warning) on hazard vs safe images).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats as scipy_stats

__all__ = ["Interval", "mean_interval", "rank_auc"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """mean, [low, high] (NaN when undefined), n finite values used."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "-"
        if math.isnan(self.low):
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def mean_interval(values, confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> Interval:
    """Mean of the finite `values` and Student's t interval for it:
    mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n), s the sample std (ddof=1), cut to
    `bounds` (a rate's or an AUC's [0, 1]: the mean cannot lie outside them).

    Seeds are independent runs, so the t interval is the textbook choice; with per-seed
    values that are nearly binary (a policy that learnt the cue or did not) it is only
    approximate, which is why the tables also print every seed. n < 2: no interval (NaN
    bounds); all values equal: a zero-width interval.
    """
    x = np.asarray([float(v) for v in values if v is not None and not math.isnan(float(v))], np.float64)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high, n)


def rank_auc(scores, labels) -> float:
    """Area under the ROC curve of `scores` separating labels True from False: the
    probability that a random positive scores above a random negative, ties counting
    one half (Mann-Whitney U / (n_pos * n_neg)). NaN when a class is empty."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
