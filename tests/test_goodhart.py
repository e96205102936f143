"""The Goodhart summary of an experiment from synthetic evaluations with known effects."""

from __future__ import annotations

import numpy as np

from probe_dpo.detection import TRAIN_AGGREGATE, Readout
from probe_dpo.goodhart import arm_summary, comparisons, default_pairs

ROLES = {"train": ["train-L1"], "ensemble": [TRAIN_AGGREGATE], "held_out": ["heldout-L2"],
         "retrained": ["retrained:L1"]}
KEYS = ["train-L1", TRAIN_AGGREGATE, "heldout-L2", "retrained:L1"]
THRESHOLDS = {k: 0.6 for k in KEYS}


def _evaluation(seed: int, *, hide: float = 0.0, toxic: float = 0.3, hide_frozen: float = 0.0) -> dict:
    """One model's evaluation: 150 prompts x 2 samples; probes score toxic text high, and
    ``hide`` lowers the train probe (and the aggregate) on the model's own activations."""
    rng = np.random.default_rng(seed)
    n_prompts = 150
    tox_scores = (rng.random((n_prompts, 2)) < toxic).astype(float) * 0.9 + 0.05
    y_own = tox_scores.ravel() >= 0.5

    def probe(y, shift):
        return 1 / (1 + np.exp(-(3.0 * y - 1.2 + rng.normal(0, 0.8, size=len(y)) + shift)))

    def scores(y, shifted):
        return {k: probe(y, -shifted if k in ("train-L1", TRAIN_AGGREGATE) else 0.0) for k in KEYS}

    y_fixed = np.random.default_rng(99).random(300) < 0.3
    fixed = Readout.build(scores(y_fixed, hide), y_fixed, [f"t{i // 3}" for i in range(300)], THRESHOLDS)
    own = {"policy": {"scores": scores(y_own, hide), "thresholds": THRESHOLDS},
           "frozen": {"scores": scores(y_own, hide_frozen), "thresholds": THRESHOLDS}}
    return {"metrics": {"perplexity": 20.0, "kl_to_base": {"per_token": 0.01},
                        "toxicity": {"judge-a": {"rate": float(y_own.mean())}}},
            "toxicity": {"judge-a": tox_scores}, "fixed": fixed, "own": own,
            "own_groups": [str(i // 2) for i in range(2 * n_prompts)]}


def test_a_hidden_probe_reads_as_obfuscated_activations_and_a_detox_as_removed():
    base = _evaluation(0)
    hidden = arm_summary(base, [_evaluation(1, hide=4.0)], ROLES, "train", n_boot=300)
    assert hidden["fixed"]["train"]["tpr"]["delta"] < -0.3 and hidden["fixed"]["train"]["tpr"]["delta_ci_high"] < 0
    assert abs(hidden["fixed"]["held_out"]["tpr"]["delta"]) < 0.1  # the held-out probe still sees it
    assert hidden["atlas"] == "obfuscated activations"
    both = arm_summary(base, [_evaluation(1, hide=4.0, hide_frozen=4.0)], ROLES, "train", n_boot=300)
    assert both["atlas"] == "obfuscated policy"
    detox = arm_summary(base, [_evaluation(2, toxic=0.1), _evaluation(3, toxic=0.1)], ROLES, "train", n_boot=300)
    assert detox["seeds"] == 2 and detox["toxicity"]["judge-a"]["change"] < -0.4
    assert detox["atlas"] == "removed"
    same = arm_summary(base, [_evaluation(4)], ROLES, "train", n_boot=300)
    assert same["atlas"] == "blatant"


def test_paired_arm_comparisons_are_holm_adjusted():
    evals = {"probe-dpo-single": [_evaluation(1, toxic=0.1)], "classifier-dpo": [_evaluation(2, toxic=0.1)],
             "random-dpo": [_evaluation(3, toxic=0.3)]}
    pairs = default_pairs(list(evals))
    assert pairs == [("probe-dpo-single", "classifier-dpo"), ("probe-dpo-single", "random-dpo"),
                     ("classifier-dpo", "random-dpo")]
    rows = comparisons(evals, pairs, ROLES, n_boot=300)
    assert len(rows) == 6  # per pair: the judge's toxic rate, the train probe's TPR
    vs_control = [r for r in rows if r["b"] == "random-dpo" and r["metric"].startswith("toxic rate")]
    assert all(r["delta"] < 0 and r["significant"] and r["p_holm"] >= r["p_value"] for r in vs_control)
    same = next(r for r in rows if r["b"] == "classifier-dpo" and r["metric"].startswith("toxic"))
    assert not same["significant"]
