"""The statistics every reported effect rests on: weighted detection metrics, a cluster
bootstrap run by ``scipy.stats.bootstrap``, and the Holm correction.

Why clusters: the samples of one prompt (its continuations, its probe-test rows) are not
independent, so every interval resamples *prompts* with all of their rows. A resample is
a count per prompt (how often it was drawn); each row takes its prompt's count as its
weight, and every metric here is written for row weights (``weights [..., rows]``), so one
vectorised call evaluates all resamples at once.

Why paired: two models evaluated on the same prompts (an arm and the base model, two arms)
are compared on the same resampled prompts, so prompt-to-prompt variation cancels. Their
rows may differ (each model's own completions): what they share is the prompt.

Why percentile intervals: they are what the project has always reported, and they never fail
on a degenerate resample (BCa's jackknife does on rare events).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Sequence

import numpy as np

CI_LEVEL = 0.95


def stable_seed(*parts: Any) -> int:
    """A seed from any parts (``("train", 3, "batch", 0)``), the same in every process and run."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31 - 1)


# ---------------------------------------------------------------------------------------------
# Metrics of weighted rows (weights [..., n] give one value per leading index)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_mean(values: Any, weights: np.ndarray, where: Any = None) -> np.ndarray:
    """``sum(w v) / sum(w)`` over the rows selected by ``where`` (all rows by default)."""
    v = np.asarray(values, dtype=np.float64)
    w = weights if where is None else weights * np.asarray(where, dtype=np.float64)
    return _ratio((w * v).sum(-1), w.sum(-1))


def weighted_auroc(scores: Any, labels: Any, weights: np.ndarray) -> np.ndarray:
    """AUROC with row weights (a row of weight 2 counts as two copies; ties count half).

    Equal to ``sklearn.metrics.roc_auc_score(labels, scores, sample_weight=w)``; NaN where a
    class has no weight. Rows are sorted once and summed per run of equal scores, so all
    resamples cost a few array passes.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    w = np.asarray(weights, dtype=np.float64)
    lead = w.shape[:-1]
    if not len(s):
        return np.full(lead, np.nan)
    order = np.argsort(s, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(s[order]) != 0])  # first row of each run of equal scores
    w2 = w.reshape(-1, w.shape[-1])[:, order]
    pos = np.add.reduceat(w2 * y[order], starts, axis=1)
    neg = np.add.reduceat(w2 * ~y[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each run
    auc = _ratio((pos * (below + 0.5 * neg)).sum(1), pos.sum(1) * neg.sum(1))
    return auc.reshape(lead)


# ---------------------------------------------------------------------------------------------
# The cluster bootstrap


def cluster_ids(groups: Sequence[Any], order: dict[str, int] | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Integer cluster ids for ``groups`` (in first-seen order, or in a shared ``order`` that is
    extended in place), so datasets of two models over the same prompts share their ids."""
    order = {} if order is None else order
    ids = np.array([order.setdefault(str(g), len(order)) for g in groups], dtype=np.int64)
    return ids, order


def cluster_bootstrap(n_clusters: int, statistic: Callable[[np.ndarray], np.ndarray], *, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """Resample clusters with ``scipy.stats.bootstrap`` and summarise ``statistic(counts)``.

    ``statistic`` maps cluster counts ``[..., n_clusters]`` (how often each cluster is in a
    resample) to one value per leading index; the estimate is its value at counts of 1.
    Returns the estimate, the 95% percentile interval and a two-sided bootstrap p-value for
    "the statistic is 0" (twice the smaller tail around 0, at least 1/resamples). Resamples
    whose statistic is NaN (no positive drawn, say) are left out of the interval.
    """
    from scipy.stats import bootstrap

    estimate = float(statistic(np.ones(n_clusters)))
    nan = {"estimate": estimate, "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"),
           "undefined": n_boot}
    if n_clusters < 2 or not math.isfinite(estimate):
        return nan

    def counts_of(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        flat = idx.reshape(-1, idx.shape[-1])
        offsets = (np.arange(flat.shape[0]) * n_clusters)[:, None]
        counts = np.bincount((flat + offsets).ravel(), minlength=flat.shape[0] * n_clusters)
        return statistic(counts.reshape(flat.shape[0], n_clusters).astype(np.float64)).reshape(idx.shape[:-1])

    res = bootstrap((np.arange(n_clusters),), counts_of, n_resamples=n_boot, vectorized=True,
                    confidence_level=CI_LEVEL, method="percentile", random_state=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    dist = dist[np.isfinite(dist)]
    if not len(dist):
        return nan
    undefined = int(n_boot - len(dist))
    alpha = (1 - CI_LEVEL) / 2
    lo, hi = np.quantile(dist, [alpha, 1 - alpha])
    p = min(1.0, 2 * min(float((dist <= 0).mean()), float((dist >= 0).mean())))
    return {"estimate": estimate, "ci_low": float(lo), "ci_high": float(hi), "p_value": max(p, 1.0 / len(dist)),
            "undefined": undefined}


def mean_ci(values: Any, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of a mean (NaN for fewer than two values)."""
    v = np.asarray(values, dtype=np.float64)
    res = cluster_bootstrap(len(v), lambda c: (c * v).sum(-1) / c.sum(-1), n_boot=n_boot, seed=seed)
    return res["ci_low"], res["ci_high"]


def wilson_ci(successes: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a share (``scipy.stats.binomtest``); NaN for n = 0."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=CI_LEVEL, method="wilson")
    return float(ci.low), float(ci.high)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given (NaN stays NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(len(p), np.nan)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (len(ok) - rank) * p[i]))
        out[i] = running
    return out.tolist()


def verdict(lo: float | None, hi: float | None, down: str = "drop", up: str = "rise") -> str:
    """How a 95% interval of a change reads: ``down`` / ``up`` when it excludes 0."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "no interval"
    if hi < 0:
        return down
    if lo > 0:
        return up
    return "no detectable change"


# ---------------------------------------------------------------------------------------------
# Binary classification metrics of one scorer


def as_numpy(x: Any) -> np.ndarray:
    """A float64 numpy array from a tensor or array-like."""
    if hasattr(x, "detach"):
        return x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def roc_auc(scores: Any, labels: Any) -> float:
    """``sklearn.metrics.roc_auc_score`` (ties count half); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    s, y = as_numpy(scores).ravel(), as_numpy(labels).ravel() > 0.5
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def threshold_at_fpr(scores: Any, labels: Any, fpr: float) -> float:
    """The lowest threshold t such that at most ``fpr`` of the negatives score above t."""
    s, y = as_numpy(scores).ravel(), as_numpy(labels).ravel() > 0.5
    neg = np.sort(s[~y])[::-1]
    if len(neg) == 0:
        return float("nan")
    k = int(math.floor(fpr * len(neg)))  # this many negatives may be above the threshold
    return float(neg[min(k, len(neg) - 1)])


def binary_metrics(probs: Any, labels: Any, threshold: float | None = None) -> dict[str, float]:
    """AUROC, accuracy at 0.5, and TPR/FPR when flagging ``prob > threshold``."""
    p, y = as_numpy(probs).ravel(), as_numpy(labels).ravel() > 0.5
    out = {"n": int(len(y)), "positives": int(y.sum()), "auroc": roc_auc(p, y),
           "accuracy": float(((p > 0.5) == y).mean()) if len(y) else float("nan")}
    if threshold is not None and not math.isnan(threshold):
        flagged = p > threshold
        out["tpr"] = float(flagged[y].mean()) if y.any() else float("nan")
        out["fpr"] = float(flagged[~y].mean()) if (~y).any() else float("nan")
    return out
