"""The statistics layer against scikit-learn and scipy: weighted AUROC, the cluster bootstrap, Holm."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap
from sklearn.metrics import roc_auc_score

from probe_dpo.stats import cluster_bootstrap, cluster_ids, holm, verdict, weighted_auroc, weighted_mean


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
