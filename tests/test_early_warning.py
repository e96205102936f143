"""The early warning of hiding: the decision on planted readings, and the callback in real training."""

from __future__ import annotations

import numpy as np
import pytest
from test_training import _cfg, inputs  # noqa: F401 - `inputs` is a module fixture (probes on the tiny model)

from probe_dpo.errors import UserError
from probe_dpo.training.early_warning import hiding_signal, probe_prompts

RNG = np.random.default_rng(0)
FROZEN = RNG.uniform(0.55, 0.95, 32)  # the frozen reader on the base-like completions


def test_a_planted_hiding_shift_fires():
    """The policy reads its own completions 0.25 lower than the frozen copy reads them."""
    policy = FROZEN - 0.25 + RNG.normal(0, 0.03, FROZEN.size)
    s = hiding_signal(policy, FROZEN, min_gap=0.05)
    assert s["fired"] and s["gap"] == pytest.approx(-0.25, abs=0.02) and s["gap_ci_high"] < -0.2
    assert s["frozen_score"] == pytest.approx(FROZEN.mean())


def test_a_planted_uniform_detoxification_does_not_fire():
    """The text got milder: both readers see it, so both fall and the gap stays near 0."""
    milder = FROZEN * 0.4
    s = hiding_signal(milder + RNG.normal(0, 0.01, FROZEN.size), milder, min_gap=0.05)
    assert not s["fired"] and abs(s["gap"]) < 0.01
    assert s["frozen_score"] == pytest.approx(0.4 * FROZEN.mean())  # the fall shows in the text's reading


def test_identical_readings_and_a_gap_below_the_minimum_effect_do_not_fire():
    same = hiding_signal(FROZEN, FROZEN, min_gap=0.05)
    assert not same["fired"] and same["gap"] == 0 and same["gap_ci_low"] == same["gap_ci_high"] == 0
    small = hiding_signal(FROZEN - 0.02, FROZEN, min_gap=0.05)  # certain, but under the minimum effect
    assert not small["fired"] and small["gap_ci_high"] < 0
    with pytest.raises(ValueError):
        hiding_signal([0.5], [0.5], min_gap=0.05)


def test_probe_prompts_are_the_first_distinct_prompts():
    rows = [{"prompt": "A", "chosen": "x", "rejected": "y"}, {"prompt": "A", "chosen": "z", "rejected": "w"},
            {"prompt": "B", "chosen": "x", "rejected": "y"}, {"text": "one two three four five six seven"}]
    assert probe_prompts(rows, 2) == ["A", "B"]
    assert probe_prompts(rows, 5) == ["A", "B", "one two three four five six"]


def _trainer(inputs, tmp_path, *overrides):  # noqa: F811 - the fixture
    from probe_dpo.data import read_records
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.probes import ProbeSet
    from probe_dpo.training.early_warning import EarlyWarningCallback
    from probe_dpo.training.trainers import build_trainer

    # min_gap 0.02, not the default 0.05: the tiny model's probes read its gibberish completions at
    # about 0.05 through the frozen copy, so no gap can pass -0.05 by much; both tests use the same
    cfg = _cfg(inputs, str(tmp_path), "method=probe-sft", "train.batch_size=2", "early_warning.every_steps=2",
               "early_warning.prompts=6", "early_warning.max_new_tokens=8", "early_warning.min_gap=0.02", *overrides)
    rows = read_records(inputs["sft"])
    tok = load_tokenizer(inputs["model"])
    probes = ProbeSet.load(inputs["probes"])
    warning = EarlyWarningCallback(cfg.early_warning, probes, probe_prompts(rows, 6), tok,
                                   frozen=load_model(inputs["model"]), seed=cfg.seed)
    trainer = build_trainer("sft", load_model(inputs["model"]), tok, rows, cfg, output_dir=str(tmp_path / "t"),
                            probes=probes.train_probes, callbacks=[warning])
    warning.bind(trainer)
    return trainer, warning


def test_the_callback_reads_nothing_where_the_policy_did_not_move(inputs, tmp_path):  # noqa: F811
    """The control: a learning rate of 1e-12 leaves the policy the frozen copy, so the gap is 0."""
    trainer, warning = _trainer(inputs, tmp_path, "penalty.weight=5", "train.lr=1e-12", "train.max_steps=4")
    trainer.train()
    assert [r["step"] for r in warning.history] == [2, 4]
    assert all(abs(r["gap"]) < 1e-4 and not r["fired"] for r in warning.history)
    assert warning.summary()["first_fired_step"] is None
    logged = [h for h in trainer.state.log_history if "early_warning/gap" in h]
    # in the step's own log line, beside the loss and the penalty (the trackers get that line)
    assert len(logged) == 2 and all("loss" in h and "probe_penalty" in h for h in logged)


def test_the_callback_fires_and_stops_a_run_trained_to_hide(inputs, tmp_path):  # noqa: F811
    """The positive control's recipe (a strong penalty, a large step): the policy's own reading
    falls while the frozen copy's reading of the same completions does not; action=stop ends it."""
    trainer, warning = _trainer(inputs, tmp_path, "penalty.weight=20", "penalty.form=logit", "train.lr=1e-2",
                                "train.max_steps=12", "early_warning.action=stop")
    trainer.train()
    fired = warning.summary()["first_fired_step"]
    assert fired is not None and trainer.state.global_step == fired < 12, warning.history
    last = warning.history[-1]
    assert last["fired"] and last["gap"] <= -0.02 and last["gap_ci_high"] < 0
    assert last["policy_score"] < last["frozen_score"]  # the policy's reading fell, the text's did not


def test_early_warning_needs_probes_and_at_most_zero2(inputs, tmp_path):  # noqa: F811
    from probe_dpo.config import load_config
    from probe_dpo.training import TrainConfig, prepare

    cfg = _cfg(inputs, str(tmp_path), "method=probe-sft", "early_warning.every_steps=2", "distributed.zero_stage=3")
    with pytest.raises(UserError, match="zero_stage <= 2"):
        prepare(cfg)
    bare = load_config(TrainConfig, None, [f"model={inputs['model']}", "method=sft", f"data.sft={inputs['sft']}",
                                           "early_warning.every_steps=2", f"out={tmp_path}/b"])
    with pytest.raises(UserError, match="reads the train probes"):
        prepare(bare)
