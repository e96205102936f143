"""The statistics every reported effect rests on: weighted detection metrics, a two-level
(prompts x training seeds) bootstrap and its prompts-only case, and the Holm correction.

Why clusters: the samples of one prompt (its continuations, its probe-test rows) are not
independent, so every interval resamples *prompts* with all of their rows. A resample is
a count per prompt (how often it was drawn); each row takes its prompt's count as its
weight, and every metric here is written for row weights (``weights [..., rows]``), so one
vectorised call evaluates all resamples at once.

Why paired: two models evaluated on the same prompts (an arm and the base model, two arms)
are compared on the same resampled prompts, so prompt-to-prompt variation cancels. Their
rows may differ (each model's own completions): what they share is the prompt.

Why seeds too: an arm is a training procedure and its seeds are a sample of the models it
could have produced, so an arm's interval resamples its seeds as well (``two_level_bootstrap``).

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


def bootstrap_p_value(dist: Any) -> float:
    """Two-sided bootstrap p-value for "the statistic is 0": twice the smaller tail around 0.

    Each tail is ``(b + 1) / (n + 1)`` (b resamples on that side of 0, n finite resamples;
    Davison & Hinkley 1997, Phipson & Smyth 2010): counting the observed data as one more
    resample keeps the p-value valid, never 0 however few resamples were drawn, so a Holm
    correction over many tests cannot be passed on a resample count alone. NaN resamples
    are left out; NaN when none is finite.
    """
    d = np.asarray(dist, dtype=np.float64)
    d = d[np.isfinite(d)]
    if not len(d):
        return float("nan")
    tails = (np.array([(d <= 0).sum(), (d >= 0).sum()]) + 1.0) / (len(d) + 1.0)
    return float(min(1.0, 2.0 * tails.min()))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of ``n`` items is drawn in each row of indices ``idx [B, m]``: ``[B, n]``."""
    offsets = (np.arange(idx.shape[0]) * n)[:, None]
    return np.bincount((idx + offsets).ravel(), minlength=idx.shape[0] * n).reshape(idx.shape[0], n).astype(np.float64)


def _summary(estimate: float, dist: np.ndarray, n_boot: int) -> dict[str, float]:
    """The estimate, its 95% percentile interval and p-value from the finite resamples."""
    finite = dist[np.isfinite(dist)]
    if not len(finite):
        return {"estimate": estimate, "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"),
                "undefined": n_boot, "n_boot": n_boot}
    alpha = (1 - CI_LEVEL) / 2
    lo, hi = np.quantile(finite, [alpha, 1 - alpha])
    return {"estimate": estimate, "ci_low": float(lo), "ci_high": float(hi), "p_value": bootstrap_p_value(finite),
            "undefined": int(n_boot - len(finite)), "n_boot": n_boot}


SeedStatistic = Callable[[np.ndarray, list[np.ndarray]], np.ndarray]


def two_level_bootstrap(n_clusters: int, seed_groups: Sequence[int], statistic: SeedStatistic, *,
                        n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Resample prompts (clusters) and training seeds together, crossed, and summarise ``statistic``.

    Why two levels: an arm is a training *procedure*, and a rerun with another seed is another
    model; an interval that resamples prompts only treats the seeds run as the only ones there
    could be and is too narrow when seeds differ (tests/test_stats.py shows it undercover).
    Crossed: every seed of an arm answered the same prompts, so one prompt draw serves all sides.

    ``seed_groups``: the number of training seeds of each independent side (``[3]`` for an arm
    against the base model, which has none; ``[3, 3]`` for two arms); a one-seed side stays fixed.
    One ``np.random.default_rng(seed)`` draws, in this order, the prompt indices
    ``integers(0, n_clusters, (n_boot, n_clusters))`` (as ``scipy.stats.bootstrap`` draws them),
    then per side ``integers(0, n_s, (n_boot, n_s))``; each becomes counts (how often an item is
    drawn). ``statistic(prompt_counts [B, P], [seed_counts [B, n_s] per side]) -> [B]``: a row
    weighs its prompt's count times its seed's count. The estimate is the statistic at counts of 1.
    Returns the estimate, the 95% percentile interval, the two-sided p-value of
    ``bootstrap_p_value``, ``undefined`` (NaN resamples, left out) and ``n_boot``.
    """
    ones = [np.ones((1, n)) for n in seed_groups]
    estimate = float(np.asarray(statistic(np.ones((1, n_clusters)), ones)).reshape(-1)[0])
    if n_clusters < 2 or not math.isfinite(estimate):
        return _summary(estimate, np.empty(0), n_boot)
    rng = np.random.default_rng(seed)
    prompts = _counts(rng.integers(0, n_clusters, (n_boot, n_clusters)), n_clusters)
    seeds = [_counts(rng.integers(0, n, (n_boot, n)), n) for n in seed_groups]
    return _summary(estimate, np.asarray(statistic(prompts, seeds), dtype=np.float64), n_boot)


def cluster_bootstrap(n_clusters: int, statistic: Callable[[np.ndarray], np.ndarray], *, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """Resample clusters only (``two_level_bootstrap`` with no seeded side) and summarise
    ``statistic(counts [..., n_clusters])``; the draws are ``scipy.stats.bootstrap``'s.

    For what has no training seeds to resample (a data set, one model's rates) or pools seeds
    on purpose. Resamples whose statistic is NaN (no positive drawn, say) are left out.
    """
    return two_level_bootstrap(n_clusters, [], lambda prompts, _: statistic(prompts), n_boot=n_boot, seed=seed)


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
