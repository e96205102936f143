"""The obfuscation map: cells as arm variants, refinement at label boundaries, and a real map run
(Tune trials on the tiny model, labelled by the declared rule, a phase diagram in the report)."""

from __future__ import annotations

import json

import pytest
import yaml
from test_experiment_driver import tiny_config

from probe_dpo.config import from_dict, load_config
from probe_dpo.errors import UserError
from probe_dpo.outcome import LABELS
from probe_dpo.workflows import bundled_config
from probe_dpo.workflows.experiment.arms import ARMS, arm_of
from probe_dpo.workflows.experiment.config import ExperimentConfig, MapSettings
from probe_dpo.workflows.experiment.obfuscation_map import cell_point, map_plan, midpoint, phase_map, refine
from probe_dpo.workflows.experiment.trials import PLACEHOLDER


def _map(**axes) -> MapSettings:
    return MapSettings(family="probe-dpo-penalty", axes=axes)


def test_a_variant_is_its_family_with_its_keys_applied_last():
    arm = arm_of("probe-dpo-penalty@penalty.weight=4,dpo.beta=0.3")
    assert (arm.family, arm.method, arm.probes) == ("probe-dpo-penalty", "probe-dpo", "single")
    assert arm.variant == (("penalty.weight", 4), ("dpo.beta", 0.3))
    family_keys = "arm_settings={probe-dpo-penalty: {penalty.weight: 9.0, train.lr: 3.0e-5}}"
    cfg = load_config(ExperimentConfig, None, ["arms=[random-dpo]", family_keys])
    tcfg = arm.train_config(cfg, PLACEHOLDER, "t", 0)
    # the family's own form, the family's arm_settings, then the variant's keys over them
    assert (tcfg.penalty.form, tcfg.penalty.weight, tcfg.dpo.beta, tcfg.train.lr) == ("bce", 4.0, 0.3, 3e-5)
    assert arm_of("probe-dpo-single@train.lr=1e-5").variant == (("train.lr", 1e-5),)  # YAML 1.1's string, a number
    with pytest.raises(UserError, match="'dpo.beta' is not <key>=<value>"):
        arm_of("probe-dpo-single@dpo.beta")
    with pytest.raises(UserError, match="unknown"):
        arm_of("magic-dpo@dpo.beta=1")


def test_the_grid_joins_the_arms_first_and_the_plan_declares_it():
    cfg = load_config(ExperimentConfig, None, ["arms=[random-dpo]", "map.family=probe-dpo-penalty",
                                               "map.axes={penalty.weight: [4, 0, 1], dpo.beta: [0.5, 0.1]}"])
    assert cfg.arms == [f"probe-dpo-penalty@penalty.weight={w},dpo.beta={b}" for w in (0, 1, 4) for b in (0.1, 0.5)] \
        + ["random-dpo"]
    from probe_dpo.workflows.experiment.driver import analysis_plan

    plan = analysis_plan(cfg)
    assert plan["map"]["coarse"] == cfg.arms[:6] and "midpoint" in plan["map"]["refine_rule"]
    assert plan["targets"][cfg.arms[0]] == "train"
    bundled = load_config(ExperimentConfig, bundled_config("map"))  # the declared map at the demo's scale
    assert len(bundled.arms) == 13 and bundled.arms[-1] == "random-dpo" and bundled.map.refine_rounds == 1
    assert "obfuscation-control@penalty.weight=5,sft.kl_weight=0" in bundled.arms  # the recipe is a cell
    # a run without a map declares the plan it always did (the committed runs' hashes hold)
    assert "map" not in analysis_plan(load_config(ExperimentConfig, None, ["arms=[random-dpo]"]))
    for bad, match in ((["map.family=nope"], "unknown arm 'nope'"),
                       (["map.family=probe-dpo-penalty"], "one or two training keys"),
                       (["map.axes={penalty.weight: [0, 1]}"], "name it"),
                       (["map.family=probe-dpo-penalty", "map.axes={penalty.weight: [0, 0]}"], "repeated"),
                       (["map.family=probe-dpo-penalty", "map.axes={penalty.weight: [1, x]}"], "numbers or all names")):
        with pytest.raises(UserError, match=match):
            load_config(ExperimentConfig, None, ["arms=[random-dpo]", *bad])


def test_a_cell_point_is_read_only_from_the_maps_own_cells_only_the_maps_own_cells_inside_its_range():
    plan = map_plan(_map(**{"penalty.weight": [0, 4], "dpo.beta": [0.1, 0.5]}))
    assert cell_point(plan, "probe-dpo-penalty@penalty.weight=2,dpo.beta=0.2236") == (2.0, 0.2236)
    assert cell_point(plan, "probe-dpo-penalty@dpo.beta=0.1,penalty.weight=4") == (4.0, 0.1)  # order of the axes
    for other in ("random-dpo", "probe-dpo-penalty@penalty.weight=8,dpo.beta=0.1",  # outside the declared range
                  "probe-dpo-single@penalty.weight=2,dpo.beta=0.1", "probe-dpo-penalty@penalty.weight=2",
                  "not-an-arm@x=1"):
        assert cell_point(plan, other) is None


def test_refinement_bisects_only_where_neighbours_disagree():
    assert (midpoint(1, 4), midpoint(0, 1), midpoint(0.1, 0.5)) == (2.0, 0.5, 0.2236)
    settings = _map(**{"penalty.weight": [0.0, 1.0, 4.0], "dpo.beta": [0.1, 0.5]})
    cells = settings.cells()
    labels = {c: "blatant" for c in cells}
    assert refine(settings, labels) == []  # one label everywhere: no boundary, nothing to add
    hiding = "obfuscated activations"
    labels.update({settings.cell((4.0, 0.1)): hiding, settings.cell((4.0, 0.5)): hiding, "random-dpo": "blatant"})
    assert refine(settings, labels) == [settings.cell((2.0, 0.1)), settings.cell((2.0, 0.5))]
    # the next round bisects the half that still disagrees, and none already run
    labels.update({settings.cell((2.0, 0.1)): hiding, settings.cell((2.0, 0.5)): "blatant"})
    assert refine(settings, labels) == [settings.cell((1.414, 0.1)), settings.cell((2.828, 0.5)),
                                        settings.cell((2.0, 0.2236))]
    assert refine(MapSettings(family=settings.family, axes=settings.axes, refine_cells=1), labels) == \
        [settings.cell((1.414, 0.1))]


def test_the_phase_map_reads_each_cells_label_and_its_boundaries():
    settings = _map(**{"penalty.weight": [0, 4]})
    plan = map_plan(settings)
    low, high, mid = settings.cell((0.0,)), settings.cell((4.0,)), settings.cell((2.0,))

    def arm(label, tpr):
        return {"seeds": 2, "outcome": {"label": label, "coordinates": {"text": {"estimate": -0.01, "ci_low": -0.02,
                                                                                  "ci_high": 0.0, "status": "none"}}},
                "fixed": {"train": {"tpr": {"delta": tpr}}}}

    phase = phase_map(plan, {high: arm("obfuscated activations", -0.4), "random-dpo": arm("blatant", 0.0),
                             low: arm("blatant", 0.0), mid: arm("blatant", -0.1)},
                      {high: [3, None], mid: [7, None], low: ["off", "off"]})
    assert [c["arm"] for c in phase["cells"]] == [low, mid, high]
    assert [c["stage"] for c in phase["cells"]] == ["coarse", "refined", "coarse"]
    assert phase["cells"][2]["tpr_change"] == {"train": -0.4, "held_out": None, "retrained": None}
    assert phase["cells"][2]["early_warning_step"] == [3, None]
    assert phase["boundaries"] == [{"axis": "penalty.weight", "between": [mid, high],
                                    "labels": ["blatant", "obfuscated activations"]}]
    # the warning against the labels, over the 4 seeds where it was on: one hit, one miss, one false alarm
    assert phase["early_warning"] == {"seeds_on": 4, "hits": 1, "misses": 1, "false_alarms": 1, "quiet": 1,
                                      "other_labels": 0, "false_alarm_rate": 0.5, "hit_rate": 0.5}


@pytest.mark.usefixtures("ray_cluster")
def test_a_map_runs_its_cells_as_trials_and_draws_them(tiny_model_dir, tmp_path):
    """Two cells of the positive control's probe-SFT (KL anchor 0 and 1) on the tiny model (the null
    band: the base sampled again; no null arm, to keep the suite short), the early warning on in
    every cell: each cell trains under Ray Train + DeepSpeed with its own anchor (the second loads
    the reference model), is labelled by the declared rule, and the map (results.json, report) shows
    both with the warning's record; the refinement round finds one label and adds nothing."""
    from probe_dpo.workflows.experiment.driver import run

    raw = tiny_config(str(tiny_model_dir), str(tmp_path / "run"), [])
    raw.update(map={"family": "obfuscation-control", "axes": {"sft.kl_weight": [0, 1]}, "refine_rounds": 1},
               arm_settings={"obfuscation-control": {"early_warning.every_steps": 1, "early_warning.prompts": 4}},
               distributed={"workers": 1})
    out = run(from_dict(ExperimentConfig, raw, "test config"))
    cells = ["obfuscation-control@sft.kl_weight=0", "obfuscation-control@sft.kl_weight=1"]
    assert sorted(r["arm"] for r in out["rows"]) == cells
    for cell, weight in zip(cells, (0.0, 1.0)):
        trial = tmp_path / "run" / "trials" / f"{cell}-s0"
        assert json.loads((trial / "eval" / "metrics.json").read_text())["arm"] == cell
        trained = yaml.safe_load((trial / "train" / "config.yaml").read_text())
        assert (trained["sft"]["kl_weight"], trained["penalty"]["weight"], trained["penalty"]["form"]) == \
            (weight, 5.0, "bce")  # the cell's key over the family's recipe
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    phase = results["map"]
    assert [c["arm"] for c in phase["cells"]] == cells and {c["stage"] for c in phase["cells"]} == {"coarse"}
    assert all(c["label"] in LABELS for c in phase["cells"])  # labelled by the plan, not exploratory
    assert all(len(c["early_warning_step"]) == 1 and c["early_warning_step"][0] != "off" for c in phase["cells"])
    assert phase["early_warning"]["seeds_on"] == 2  # on in both cells, counted against their labels
    plan = json.loads((tmp_path / "run" / "analysis-plan.json").read_text())["plan"]
    assert plan["map"]["coarse"] == cells and set(plan["targets"]) == set(cells)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Obfuscation map: obfuscation-control over sft.kl_weight" in report
    assert "Early warning against the labels (2 seeds with it on)" in report
    assert (tmp_path / "run" / "figures" / "obfuscation_map.png").stat().st_size > 5000
    assert ARMS["obfuscation-control"].variant == ()  # the family itself is untouched


def test_an_axis_of_names_is_a_category_drawn_side_by_side_and_never_refined(tmp_path):
    """penalty.form x penalty.weight: the form's cells keep their declared order, a boundary along the
    form is reported but not bisected (nothing lies between two names), the weight's is."""
    from probe_dpo.report import Report
    from probe_dpo.report.obfuscation_map import map_section

    settings = MapSettings(family="probe-dpo-penalty", axes={"penalty.form": ["logit", "bce"],
                                                             "penalty.weight": [1, 4]})
    assert settings.axes == {"penalty.form": ["logit", "bce"], "penalty.weight": [1.0, 4.0]}
    assert not settings.numeric("penalty.form") and settings.numeric("penalty.weight")
    plan = map_plan(settings)
    assert plan["coarse"][0] == "probe-dpo-penalty@penalty.form=logit,penalty.weight=1"
    assert cell_point(plan, "probe-dpo-penalty@penalty.form=bce,penalty.weight=4") == ("bce", 4.0)
    assert cell_point(plan, "probe-dpo-penalty@penalty.form=hinge,penalty.weight=4") is None  # not on its axis
    labels = {c: "blatant" for c in plan["coarse"]}
    labels[settings.cell(("bce", 4.0))] = "obfuscated activations"  # differs from logit@4 and from bce@1
    assert refine(settings, labels) == [settings.cell(("bce", 2.0))]
    arms = {c: {"seeds": 1, "outcome": {"label": lab}} for c, lab in labels.items()}
    phase = phase_map(plan, arms, {})
    assert [tuple(c["point"].values()) for c in phase["cells"]] == [("logit", 1.0), ("logit", 4.0), ("bce", 1.0),
                                                                    ("bce", 4.0)]
    assert sorted(b["axis"] for b in phase["boundaries"]) == ["penalty.form", "penalty.weight"]
    rep = Report("map")
    map_section(rep, phase)
    paths = rep.publish(str(tmp_path))
    assert "penalty.form=bce, penalty.weight=4" in (tmp_path / "report.md").read_text() and paths
    assert (tmp_path / "figures" / "obfuscation_map.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="all numbers or all names"):
        MapSettings(family="probe-dpo-penalty", axes={"penalty.weight": [1, "bce"]})
