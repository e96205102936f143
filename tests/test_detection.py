"""Detection the way a monitor is used: thresholded metrics, paired changes, the Atlas outcome."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from probe_dpo.detection import Readout, compare, metric_values


def _readout(shift: float = 0.0, seed: int = 0, n_prompts: int = 120, per: int = 3) -> Readout:
    rng = np.random.default_rng(seed)
    y = rng.random(n_prompts * per) < 0.35
    raw = rng.normal(size=y.shape) + 1.6 * y
    groups = [f"p{i // per}" for i in range(len(y))]
    scores = {"probe": 1 / (1 + np.exp(-(raw + shift)))}
    return Readout.build(scores, y, groups, {"probe": 0.7})


def test_thresholded_metrics_are_sklearns():
    r = _readout()
    s, y = r.scores["probe"], r.labels
    tn, fp, fn, tp = confusion_matrix(y, s > 0.7).ravel()
    ones = np.ones(len(y))
    assert metric_values(r, "probe", "tpr", ones) == pytest.approx(tp / (tp + fn))
    assert metric_values(r, "probe", "fpr", ones) == pytest.approx(fp / (fp + tn))
    assert metric_values(r, "probe", "accuracy", ones) == pytest.approx((tp + tn) / len(y))
    assert metric_values(r, "probe", "auroc", ones) == pytest.approx(roc_auc_score(y, s))
    assert metric_values(r, "probe", "mean_pos", ones) == pytest.approx(s[y].mean())


def test_a_shift_along_minus_w_leaves_auroc_and_defeats_the_threshold():
    """The case AUROC alone misreads: every activation moves along -w, the ranking stays."""
    base, shifted = _readout(), _readout(shift=-2.0)
    auroc = compare(base, shifted, ["probe"], "auroc", n_boot=300)
    tpr = compare(base, shifted, ["probe"], "tpr", n_boot=300)
    assert auroc["delta"] == pytest.approx(0.0, abs=1e-12)
    assert tpr["base"] > 0.4 and tpr["delta"] < -0.3 and tpr["delta_ci_high"] < 0 and tpr["p_value"] < 0.01
    same = compare(base, _readout(), ["probe"], "tpr", n_boot=300)  # the control that must not move
    assert same["delta"] == 0.0 and same["delta_ci_low"] == same["delta_ci_high"] == 0.0


def test_seeds_pool_and_readouts_survive_json():
    a, b = _readout(seed=0), _readout(seed=0, shift=-1.0)
    both = Readout.concat([a, b])
    assert len(both.labels) == 2 * len(a.labels)
    back = Readout.from_json(a.to_json())
    np.testing.assert_allclose(back.scores["probe"], a.scores["probe"])
    assert back.thresholds == {"probe": 0.7} and back.groups == [str(g) for g in a.groups]
    pooled = compare(a, both, ["probe"], "tpr", n_boot=200)["value"]
    assert pooled == pytest.approx((metric_values(a, "probe", "tpr", np.ones(360))
                                    + metric_values(b, "probe", "tpr", np.ones(360))) / 2)


def test_bf16_probe_reads_stay_close_to_fp32_and_fit_in_fp32(tiny_model_dir):
    """``read_fixed(dtype="bfloat16")`` runs the forward passes under bf16 autocast (the scores
    move, a little) while the retrained probes are still fitted on float32 features."""
    import torch

    from probe_dpo.detection import read_fixed
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.probes import LinearProbe, ProbeSet

    lm, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    d = lm.config.hidden_size
    probe = LinearProbe(torch.randn(d, generator=gen), 0.0, torch.zeros(d), torch.ones(d), layer=1, name="train-L1")
    words = ["you idiot", "lovely day", "shut up", "thank you", "stupid fool", "kind words"]
    rows = [{"prompt": f"Row {i} says", "completion": f" {words[i % 6]} {i}", "label": int(i % 2 == 0),
             "prompt_id": f"p{i // 2}"} for i in range(24)]
    splits = {"train": rows[:12], "val": rows[12:18], "test": rows[18:] + rows[:6]}
    out = {dt: read_fixed(lm, tok, ProbeSet([probe]), splits, retrain_layers=[1], dtype=dt)
           for dt in ("float32", "bfloat16")}
    a, b = out["float32"][0].scores["train-L1"], out["bfloat16"][0].scores["train-L1"]
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 0.05
    assert out["bfloat16"][1]["retrained:L1"]["layer"] == 1
    assert out["bfloat16"][0].scores["retrained:L1"].dtype == np.float64
