"""The Goodhart summary of an experiment from synthetic evaluations with known effects."""

from __future__ import annotations

import numpy as np

from probe_dpo.detection import TRAIN_AGGREGATE, Readout
from probe_dpo.goodhart import ONE_SEED, REPLICATE, arm_summary, comparisons, default_pairs, judge_agreement, outcomes

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


def _plan(n_boot: int = 2000) -> dict:  # enough resamples for a family of 20 (see analysis.build_plan)
    from probe_dpo.analysis import AnalysisSettings
    from probe_dpo.config import to_dict

    return {"settings": {**to_dict(AnalysisSettings()), "bootstrap": n_boot},
            "judges": {"outcome": ["judge-a"], "in_loop": []}}


def test_arm_summaries_resample_seeds_and_say_when_there_is_one():
    base = _evaluation(0)
    hidden = arm_summary(base, [_evaluation(1, hide=4.0)], ROLES, "train", n_boot=300)
    assert hidden["fixed"]["train"]["tpr"]["delta"] < -0.3 and hidden["fixed"]["train"]["tpr"]["delta_ci_high"] < 0
    assert abs(hidden["fixed"]["held_out"]["tpr"]["delta"]) < 0.1  # the held-out probe still sees it
    assert hidden["seed_note"] == ONE_SEED and "atlas" not in hidden
    detox = arm_summary(base, [_evaluation(2, toxic=0.1), _evaluation(3, toxic=0.1)], ROLES, "train", n_boot=300)
    assert detox["seeds"] == 2 and "seed_note" not in detox and detox["toxicity"]["judge-a"]["change"] < -0.4
    assert len(detox["toxicity"]["judge-a"]["per_seed"]) == 2 and detox["toxicity"]["judge-a"]["seed_sd"] >= 0
    # seeds that disagree widen the interval: the same rows, one seed far off
    spread = arm_summary(base, [_evaluation(2, toxic=0.1), _evaluation(3, toxic=0.3)], ROLES, "train", n_boot=300)
    pooled = arm_summary(base, [_evaluation(2, toxic=0.2)], ROLES, "train", n_boot=300)
    width = {k: v["toxicity"]["judge-a"]["ci_high"] - v["toxicity"]["judge-a"]["ci_low"]
             for k, v in (("spread", spread), ("pooled", pooled))}
    assert width["spread"] > 1.5 * width["pooled"], width


def test_outcome_labels_against_the_null_references():
    """A planted hiding shift, text the frozen probe misses, a detoxification and an arm like the
    base model, with a null arm and the base re-sampled as the references: each gets its label,
    the null arm is read against a band without itself, and the family is Holm-corrected."""
    base = _evaluation(0)
    evals = {"random-dpo": [_evaluation(s) for s in (10, 11, 12)],
             "hidden": [_evaluation(s, hide=4.0) for s in (20, 21, 22)],
             "evasive": [_evaluation(s, hide=4.0, hide_frozen=4.0) for s in (30, 31, 32)],
             "detox": [_evaluation(s, toxic=0.1) for s in (40, 41, 42)],
             "same": [_evaluation(s) for s in (50, 51, 52)]}
    targets = {a: "train" for a in evals}
    rows = comparisons(evals, [("detox", "random-dpo")], ROLES, n_boot=400, outcome_judges=["judge-a"])
    assert all(r["in_plan"] and r["p_holm"] is None for r in rows)
    out = outcomes(base, evals, _evaluation(5), ROLES, targets, _plan(), rows)
    labels = {a: v["label"] for a, v in out["labels"].items()}
    assert labels == {"random-dpo": "blatant", "hidden": "obfuscated activations", "evasive": "obfuscated policy",
                      "detox": "removed", "same": "blatant", REPLICATE: "blatant"}, labels
    assert out["labels"]["hidden"]["decided_by"]["coordinate"] == "activations"
    assert out["labels"]["random-dpo"]["band_from"] == [REPLICATE]  # not itself
    assert out["family_size"] == 5 * 3 + len(rows)  # text, activations, one rate per arm; the comparisons
    assert all(r["p_holm"] >= r["p_value"] for r in rows)
    assert out["replication"]["of"] == 15 and 0 <= out["replication"]["share"] <= 1
    before = outcomes(base, {}, _evaluation(5), ROLES, {}, _plan(), [])  # before any trial: the null reference
    assert list(before["labels"]) == [REPLICATE]


def test_judge_agreement_marks_the_in_loop_judge():
    base = _evaluation(0)
    base["toxicity"]["judge-b"] = base["toxicity"]["judge-a"] * 0.8 + 0.1
    rows = judge_agreement(base, ["judge-a"])
    a_vs_b = next(r for r in rows if r["judge"] == "judge-b" and r["labels_of"] == "judge-a")
    assert a_vs_b["spearman"] > 0.99 and a_vs_b["auroc"] == 1.0 and a_vs_b["labels_in_loop"]


def test_paired_arm_comparisons_are_holm_adjusted():
    evals = {"probe-dpo-single": [_evaluation(1, toxic=0.1)], "classifier-dpo": [_evaluation(2, toxic=0.1)],
             "random-dpo": [_evaluation(3, toxic=0.3)]}
    pairs = default_pairs(list(evals))
    assert pairs == [("probe-dpo-single", "classifier-dpo"), ("probe-dpo-single", "random-dpo"),
                     ("classifier-dpo", "random-dpo")]
    mixed = default_pairs(["probe-grpo-single", "probe-grpo-frozen", "probe-dpo-single", "random-dpo",
                           "random-grpo"])
    assert mixed == [("probe-grpo-single", "probe-grpo-frozen"), ("probe-grpo-single", "probe-dpo-single"),
                     ("probe-grpo-single", "random-grpo"), ("probe-grpo-frozen", "random-grpo"),
                     ("probe-dpo-single", "random-dpo")]  # each arm against the null of its own method
    assert default_pairs(["probe-grpo-single", "random-grpo"], controls=["random-dpo"]) == []
    rows = comparisons(evals, pairs, ROLES, n_boot=300)
    assert len(rows) == 6  # per pair: the judge's toxic rate, the train probe's TPR
    vs_control = [r for r in rows if r["b"] == "random-dpo" and r["metric"].startswith("toxic rate")]
    assert all(r["delta"] < 0 and r["significant"] and r["p_holm"] >= r["p_value"] for r in vs_control)
    same = next(r for r in rows if r["b"] == "classifier-dpo" and r["metric"].startswith("toxic"))
    assert not same["significant"]
    judged = comparisons(evals, pairs, ROLES, n_boot=300, outcome_judges=["another-judge"])  # judge-a in the loop
    assert [r["in_plan"] for r in judged if r["metric"].startswith("toxic")] == [False] * 3
