"""The judge threshold an evaluation cuts at: the testbed's (or the behaviour's), recorded with
every rate, not a fixed 0.5. No model, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from probe_dpo.errors import UserError
from probe_dpo.evaluation import DEFAULT_THRESHOLD, judge_threshold, rate_with_ci


def test_rates_cut_at_the_given_threshold_and_record_it():
    scores = np.array([[0.2, 0.6], [0.75, 0.9], [0.1, 0.55]])  # [prompts, samples]
    at_half, at_07 = rate_with_ci(scores, n_boot=200), rate_with_ci(scores, 0.7, n_boot=200)
    assert (at_half["rate"], at_half["threshold"]) == (pytest.approx(4 / 6), DEFAULT_THRESHOLD)
    assert (at_07["rate"], at_07["threshold"]) == (pytest.approx(2 / 6), 0.7)


def test_judge_threshold_reads_what_the_testbed_and_the_evaluation_recorded():
    assert judge_threshold({"content_hash": "x", "threshold": 0.7}) == 0.7  # testbed.json
    assert judge_threshold({"toxicity": {}, "threshold": 0.3}) == 0.3  # metrics.json
    assert judge_threshold({"metrics": {"threshold": 0.8}, "toxicity": {}}) == 0.8  # a loaded evaluation
    assert judge_threshold(None) == judge_threshold({"content_hash": "old"}) == DEFAULT_THRESHOLD
    for bad in (1.5, 0, "high", True):
        with pytest.raises(UserError, match="judge threshold"):
            judge_threshold({"threshold": bad})
