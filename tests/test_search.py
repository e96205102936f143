"""Hyperparameter searches as Ray Tune users write them: the space in Tune's words, Optuna's TPE,
ASHA on a training metric reported while trials train, several objectives with the Pareto set
in results.json, and a re-run that resumes the search's Tune experiment (``Tuner.restore``).

The searches run the experiment on the tiny random model (tests/test_experiment_driver.py's
``tiny_config``) with no arms besides the search, sharing one run folder (the testbed, probes
and base evaluation are built once)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_experiment_driver import tiny_config


def test_pareto_front_keeps_the_non_dominated_points():
    from probe_dpo.workflows.experiment.search import pareto_front

    points = [{"tox": 0.1, "tpr": 0.9},  # 0: best tox among high-tpr points
              {"tox": 0.2, "tpr": 0.95},  # 1: worse tox, better tpr: on the front
              {"tox": 0.2, "tpr": 0.8},  # 2: dominated by 0
              {"tox": 0.1, "tpr": 0.9},  # 3: equal to 0: kept with it
              {"tox": 0.05, "tpr": None},  # 4: a missing value: in no front
              {"tox": float("nan"), "tpr": 1.0},  # 5: NaN: in no front
              {"tox": 0.3, "tpr": 0.99}]  # 6: worst tox, best tpr: on the front
    assert pareto_front(points, ["tox", "tpr"], ["min", "max"]) == [0, 1, 3, 6]
    assert pareto_front(points, ["tox"], ["min"]) == [4]  # one objective: the best (4 lacks only tpr)
    assert pareto_front(points[:4], ["tox"], ["min"]) == [0, 3]  # ties kept
    assert pareto_front(points, ["tox", "tpr"], ["max", "min"]) == [2, 6]
    assert pareto_front([], ["tox"], ["min"]) == []


def test_the_space_reads_tunes_names_in_either_form():
    from ray import tune

    from probe_dpo.config import load_config
    from probe_dpo.workflows import bundled_config
    from probe_dpo.workflows.experiment.config import ExperimentConfig
    from probe_dpo.workflows.experiment.search import tune_space

    mapping = ("search.space={train.lr: {loguniform: [1e-6, 1e-4]}, penalty.weight: {uniform: [0, 2]}, "
               "dpo.beta: {quniform: [0.1, 0.5, 0.1]}, train.max_steps: {randint: [2, 9]}, "
               "penalty.form: {choice: [bce, logit]}, train.warmup_ratio: {qloguniform: [0.01, 0.1, 0.01]}}")
    listed = ("search.space={train.lr: [loguniform, 1e-6, 1e-4], penalty.weight: [uniform, 0, 2], "
              "dpo.beta: [quniform, 0.1, 0.5, 0.1], train.max_steps: [randint, 2, 9], "
              "penalty.form: [choice, [bce, logit]], train.warmup_ratio: [qloguniform, 0.01, 0.1, 0.01]}")
    search = [load_config(ExperimentConfig, bundled_config("toxicity"), ["search.arm=probe-sft-single", o]).search
              for o in (mapping, listed)]
    assert search[0].space == search[1].space
    assert search[0].space["train.lr"] == {"loguniform": [1e-6, 1e-4]}  # YAML 1.1's "1e-6" string, as a number
    assert search[0].space["train.max_steps"] == {"randint": [2, 9]}
    space = tune_space(search[0])
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert isinstance(space["train.max_steps"], tune.search.sample.Integer)
    assert space["penalty.form"].categories == ["bce", "logit"]
    grid = load_config(ExperimentConfig, bundled_config("toxicity"),
                       ["search.arm=probe-sft-single", "search.space={train.lr: {grid_search: [1e-5, 1e-4]}}",
                        "search.metric=[kl_to_base, perplexity]", "search.mode=[min, min]"]).search
    assert tune_space(grid)["train.lr"] == {"grid_search": [1e-5, 1e-4]}
    assert grid.metrics == ["kl_to_base", "perplexity"] and grid.modes == ["min", "min"]


# Optuna's TPE starts with seeded random samples: two searches of this space draw the same first
# points, and a point whose training config was evaluated already is not trained again.
SPACE = {"penalty.weight": {"uniform": [0.1, 2.0]}, "train.lr": {"loguniform": [1e-5, 1e-2]}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("search") / "run"


def _search(model: Path, run: Path, max_steps: int, **search) -> dict:
    raw = tiny_config(str(model), str(run), [])
    raw["distributed"] = {"workers": 1}
    raw["sft_train"]["max_steps"] = max_steps
    raw["search"] = {"arm": "probe-sft-single", "algorithm": "optuna", **search}
    return raw


def _run(raw: dict) -> tuple[dict, dict]:
    from probe_dpo.config import from_dict
    from probe_dpo.workflows.experiment.config import ExperimentConfig
    from probe_dpo.workflows.experiment.driver import run

    run(from_dict(ExperimentConfig, raw, "test config"))
    results = json.loads((Path(raw["storage"]) / "results.json").read_text())
    (search,) = [s for s in results["searches"] if s["metric"] == list(
        [raw["search"]["metric"]] if isinstance(raw["search"]["metric"], str) else raw["search"]["metric"])]
    return results, search


def test_optuna_with_asha_on_the_training_loss_then_a_rerun_resumes_it(ray_cluster, tiny_model_dir, run_dir):
    """Optuna's TPE over penalty.weight x train.lr, ASHA stopping trials on train.loss, which each
    trial reports at every optimizer step while it trains; a trial ASHA stops is not evaluated.
    The same search run again resumes its Tune experiment: no trial runs again."""
    raw = _search(tiny_model_dir, run_dir, 4, num_samples=3, scheduler="asha", metric="train.loss",
                  asha={"grace_period": 1, "reduction_factor": 2}, space=SPACE)
    results, search = _run(raw)
    assert search["algorithm"] == "optuna" and search["scheduler"] == "asha" and not search["resumed"]
    trials = search["trials"]
    assert len(trials) == 3 and len({t["tune_trial"] for t in trials}) == 3
    for t in trials:
        assert set(t["overrides"]) == {"penalty.weight", "train.lr"} and 0.1 <= t["overrides"]["penalty.weight"] <= 2.0
        assert math.isfinite(t["train.loss"]) and t["train.step"] >= 1
        if t["status"] == "evaluated":  # trained to step 4: 3 reports while training + the evaluation's
            assert t["train.step"] == 4 and t["reports"] == 4
        else:  # ASHA stopped it at a rung: reported while training, never evaluated
            assert t["status"] == "stopped early" and t["train.step"] < 4 and t["reports"] == t["train.step"]
            assert t["trial"] is None
    evaluated = [t for t in trials if t["status"] == "evaluated"]
    assert evaluated, "the first trial has no rival at any rung: it always trains to the end"
    rows = {r["trial"]: r for r in results["rows"]}
    assert {t["trial"] for t in evaluated} == set(rows)
    best = min(evaluated, key=lambda t: t["train.loss"])
    assert search["pareto"] == [best["trial"]]  # one objective: the best
    assert "Search over probe-sft-single" in (run_dir / "report.md").read_text()
    tune_dir = run_dir / "tune" / search["name"]
    before = sorted(p.name for p in tune_dir.iterdir() if p.is_dir())
    evals = {t: (run_dir / "trials" / t / "eval" / "metrics.json").stat().st_mtime_ns for t in rows}

    results, again = _run(raw)  # the same search: Tuner.restore, nothing left to run
    assert again["resumed"] and again["name"] == search["name"]
    assert [(t["tune_trial"], t["status"], t["trial"]) for t in again["trials"]] == \
        [(t["tune_trial"], t["status"], t["trial"]) for t in trials]
    assert sorted(p.name for p in tune_dir.iterdir() if p.is_dir()) == before  # no new trial folder
    assert {t: (run_dir / "trials" / t / "eval" / "metrics.json").stat().st_mtime_ns for t in rows} == evals


def test_a_multi_objective_optuna_search_lists_its_pareto_set(ray_cluster, tiny_model_dir, run_dir):
    """Optuna's multi-objective TPE over the same space (after the test above, its first points
    were evaluated there already: the trials reuse those evaluations); results.json lists the
    trials no other beats on KL, the train probe's AUROC and perplexity together."""
    metrics, modes = ["kl_to_base", "fixed.train.auroc", "perplexity"], ["min", "max", "min"]
    raw = _search(tiny_model_dir, run_dir, 4, num_samples=2, metric=metrics, mode=modes, space=SPACE)
    results, search = _run(raw)
    assert search["mode"] == modes and search["scheduler"] == "fifo"
    trials = search["trials"]
    assert len(trials) == 2 and all(t["status"] == "evaluated" for t in trials)
    from probe_dpo.workflows.experiment.search import pareto_front

    rows = {r["trial"]: r for r in results["rows"]}
    mine = [rows[t["trial"]] for t in trials]
    expected = [mine[i]["trial"] for i in pareto_front(mine, metrics, modes)]
    assert search["pareto"] == expected and expected  # recomputed from results.json's own rows
    assert [r["trial"] for r in search["pareto_rows"]] == expected
    assert all(set(metrics) <= set(r) for r in search["pareto_rows"])
    assert "The Pareto set" in (run_dir / "report.md").read_text()
