"""The statistics layer against scikit-learn, scipy and brute force: weighted AUROC, the bootstrap
p-value, the two-level (prompts x seeds) bootstrap and its prompts-only case, Holm."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap
from sklearn.metrics import roc_auc_score

from probe_dpo.stats import (
    bootstrap_p_value,
    cluster_bootstrap,
    cluster_ids,
    holm,
    two_level_bootstrap,
    verdict,
    weighted_auroc,
    weighted_mean,
)


def test_weighted_auroc_is_sklearns_with_sample_weights_ties_included():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=400), 1)  # many ties
    y = rng.random(400) < 0.3
    w = rng.integers(0, 4, size=(6, 400)).astype(float)
    want = [roc_auc_score(y, s, sample_weight=row) for row in w]
    np.testing.assert_allclose(weighted_auroc(s, y, w), want, atol=1e-12)
    assert weighted_auroc(s, y, np.ones(400)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(weighted_auroc(s, np.ones(400, bool), np.ones(400)))  # one class: undefined


def test_cluster_bootstrap_of_singletons_is_scipys_paired_percentile_bootstrap():
    rng = np.random.default_rng(1)
    a = rng.normal(size=60)
    b = a + rng.normal(0.4, 1.0, size=60)
    want = bootstrap((a, b), lambda x, y, axis=-1: y.mean(axis) - x.mean(axis), paired=True, vectorized=True,
                     method="percentile", n_resamples=1000, random_state=np.random.default_rng(7))
    got = cluster_bootstrap(60, lambda c: (c * (b - a)).sum(-1) / c.sum(-1), n_boot=1000, seed=7)
    assert got["estimate"] == pytest.approx(float((b - a).mean()))
    assert got["ci_low"] == pytest.approx(want.confidence_interval.low, abs=1e-12)
    assert got["ci_high"] == pytest.approx(want.confidence_interval.high, abs=1e-12)
    assert got["p_value"] < 0.05  # a clear shift


def test_cluster_counts_weigh_every_row_of_a_drawn_cluster():
    groups = ["p1", "p1", "p2", "p3", "p3", "p3"]
    ids, order = cluster_ids(groups)
    assert ids.tolist() == [0, 0, 1, 2, 2, 2] and order == {"p1": 0, "p2": 1, "p3": 2}
    other, _ = cluster_ids(["p3", "p9"], order)  # a second dataset over the same prompts shares ids
    assert other.tolist() == [2, 3]
    values = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    counts = np.array([[2.0, 0.0, 1.0]])  # p1 drawn twice, p3 once
    assert weighted_mean(values, counts[..., ids])[0] == pytest.approx((2 * 1 + 2 * 0 + 0 + 0 + 1) / 7)
    # a statistic with no defined value in some resamples: those are left out, not counted as 0
    res = cluster_bootstrap(3, lambda c: weighted_mean(values, c[..., ids], where=values > 0.5), n_boot=200)
    assert res["ci_low"] == res["ci_high"] == 1.0


def test_holm_adjusts_in_step_down_order():
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]
    got = holm(p)
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> kept monotone: 0.06
    assert got[4] == pytest.approx(0.02) and got[0] == pytest.approx(0.03)
    assert got[2] == pytest.approx(0.06) and got[1] == pytest.approx(0.06) and np.isnan(got[3])


def test_verdict_reads_an_interval():
    assert verdict(-0.3, -0.1) == "drop" and verdict(0.1, 0.2) == "rise"
    assert verdict(-0.1, 0.1) == "no detectable change" and verdict(None, 0.1) == "no interval"


def test_bootstrap_p_value_counts_the_data_as_one_more_resample():
    # 9 finite resamples, 1 at or below 0, 9 at or above: tails 2/10 and 10/10 -> p = 2 * 0.2
    assert bootstrap_p_value([-0.5, 1, 2, 3, 4, 5, 6, 7, 8, np.nan]) == pytest.approx(0.4)
    assert bootstrap_p_value(np.arange(1.0, 10.0)) == pytest.approx(2 * 1 / 10)  # none below 0: never 0
    assert bootstrap_p_value([-1.0, 0.0, 2.0, 3.0]) == 1.0  # 2*min(3/5, 4/5) capped at 1
    assert np.isnan(bootstrap_p_value([np.nan, np.inf]))


def _ratio_data(rng: np.random.Generator, seeds: int, prompts: int = 12, samples: int = 2):
    """x > 0 and y per [seed, prompt, sample]; the statistic is the ratio of means sum(y) / sum(x)."""
    x = rng.uniform(0.5, 2.0, (seeds, prompts, samples))
    return x, 0.3 * x + rng.normal(size=(seeds, prompts, samples)) + rng.normal(size=(seeds, 1, 1))


def _ratio(x: np.ndarray, y: np.ndarray, prompts: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """sum(y) / sum(x) with a row weighed by its prompt's count [B, P] times its seed's count [B, S]."""
    xs, ys = x.sum(-1), y.sum(-1)  # [S, P]
    return np.einsum("bp,sp,bs->b", prompts, ys, seeds) / np.einsum("bp,sp,bs->b", prompts, xs, seeds)


def test_two_level_bootstrap_is_the_explicit_resampling_of_seeds_and_prompts():
    rng = np.random.default_rng(3)
    (xa, ya), (xb, yb) = _ratio_data(rng, 3), _ratio_data(rng, 2)
    seen = []

    def statistic(prompts, seeds):
        out = _ratio(xa, ya, prompts, seeds[0]) - _ratio(xb, yb, prompts, seeds[1])
        seen.append(out)
        return out

    n_boot = 300
    got = two_level_bootstrap(12, [3, 2], statistic, n_boot=n_boot, seed=11)
    draws = np.random.default_rng(11)  # the documented order: prompts, then each side's seeds
    p_idx, a_idx, b_idx = draws.integers(0, 12, (n_boot, 12)), draws.integers(0, 3, (n_boot, 3)), \
        draws.integers(0, 2, (n_boot, 2))

    def explicit(x, y, seed_idx, prompt_idx):
        rows = [(x[s, p, r], y[s, p, r]) for s in seed_idx for p in prompt_idx for r in range(x.shape[2])]
        return sum(r[1] for r in rows) / sum(r[0] for r in rows)

    want = np.array([explicit(xa, ya, a_idx[b], p_idx[b]) - explicit(xb, yb, b_idx[b], p_idx[b])
                     for b in range(n_boot)])
    np.testing.assert_allclose(seen[-1], want, rtol=0, atol=1e-12)
    assert got["estimate"] == pytest.approx(ya.sum() / xa.sum() - yb.sum() / xb.sum(), abs=1e-12)
    lo, hi = np.quantile(want, [0.025, 0.975])
    assert got["ci_low"] == pytest.approx(lo, abs=1e-12) and got["ci_high"] == pytest.approx(hi, abs=1e-12)
    assert got["p_value"] == pytest.approx(bootstrap_p_value(want)) and got["n_boot"] == n_boot


def test_one_seed_per_side_is_the_paired_prompt_bootstrap():
    rng = np.random.default_rng(4)
    (xa, ya), (xb, yb) = _ratio_data(rng, 1, prompts=40), _ratio_data(rng, 1, prompts=40)
    got = two_level_bootstrap(40, [1, 1], lambda p, s: _ratio(xa, ya, p, s[0]) - _ratio(xb, yb, p, s[1]),
                              n_boot=500, seed=5)
    per_prompt = [v[0].sum(-1) for v in (xa, ya, xb, yb)]
    want = bootstrap(per_prompt, lambda a, b, c, d, axis=-1: b.sum(axis) / a.sum(axis) - d.sum(axis) / c.sum(axis),
                     paired=True, vectorized=True, method="percentile", n_resamples=500,
                     random_state=np.random.default_rng(5))
    assert got["ci_low"] == pytest.approx(want.confidence_interval.low, abs=1e-12)
    assert got["ci_high"] == pytest.approx(want.confidence_interval.high, abs=1e-12)
    assert got["p_value"] == pytest.approx(bootstrap_p_value(want.bootstrap_distribution))


def test_resampling_seeds_covers_what_resampling_prompts_alone_misses():
    """A seed random effect whose share of the mean's error equals the prompts' share: the
    prompts-only interval is about sqrt(2) too narrow, the two-level one is not."""
    rng = np.random.default_rng(12)
    n_seeds, n_prompts, samples, replicates = 6, 40, 2, 1000
    prompt_se = np.sqrt(1 / n_prompts + 1 / (n_prompts * samples * n_seeds))  # prompt sd 1, row noise sd 1
    seed_sd = prompt_se * np.sqrt(n_seeds)
    hits = {"prompts only": 0, "two-level": 0}
    for r in range(replicates):
        y = (rng.normal(0, seed_sd, (n_seeds, 1, 1)) + rng.normal(0, 1, (1, n_prompts, 1))
             + rng.normal(0, 1, (n_seeds, n_prompts, samples)))  # true mean 0
        ones = np.ones_like(y)
        two = two_level_bootstrap(n_prompts, [n_seeds], lambda p, s: _ratio(ones, y, p, s[0]), n_boot=500, seed=r)
        pooled = cluster_bootstrap(n_prompts, lambda p: _ratio(ones, y, p, np.ones((len(p), n_seeds))), n_boot=500,
                                   seed=r)
        hits["two-level"] += two["ci_low"] <= 0 <= two["ci_high"]
        hits["prompts only"] += pooled["ci_low"] <= 0 <= pooled["ci_high"]
    rates = {k: v / replicates for k, v in hits.items()}
    print(f"95% interval coverage over {replicates} replicates, {n_seeds} seeds: {rates}")
    assert rates["two-level"] >= 0.9
    assert rates["prompts only"] <= 0.88 and rates["two-level"] - rates["prompts only"] >= 0.05
