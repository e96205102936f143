"""The committed reference run (examples/demo) is what the README cites, and it is complete:
the plan it declared, its hash in the results, the seeds the conclusions need."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "examples" / "demo"
HEADLINE = ["probe-dpo-single", "classifier-dpo", "random-dpo", "obfuscation-control"]


def _reference(name: str = "reference"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reproduction_check_finds_every_changed_value_and_only_those():
    differences = _reference("reproduce").differences
    ref = {"toxicity": {"hatesonar": {"rate": 0.1475, "ci": [0.11, 0.18]}}, "kl": float("nan"), "eval_seconds": 371.0}
    assert differences(ref, json.loads(json.dumps(ref))) == []  # NaN equals NaN; a JSON round trip changes nothing
    assert differences(ref, {**ref, "eval_seconds": 9.0}) == []  # wall-clock times are not behaviour
    moved = {**ref, "toxicity": {"hatesonar": {"rate": 0.1475 + 1e-17 + 2.8e-17, "ci": [0.11, 0.18, 0.2]}}}
    assert differences(ref, moved) == [".toxicity.hatesonar.ci: 2 items in the reference, 3 here",
                                       ".toxicity.hatesonar.rate: 0.1475 in the reference, 0.14750000000000002 here"]
    assert differences(ref, {"kl": float("nan")}) == [".toxicity: only in the reference"]


def test_readme_table_is_the_committed_results():
    ref = _reference()
    results = json.loads((BUNDLE / "results.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert ref.readme_with_table(readme, ref.readme_table(results)) == readme, \
        "README.md's reference-run table differs from examples/demo/results.json: run examples/reference.py --skip-run"
    assert ref.main(["--check"]) == 0


def test_the_bundle_declares_its_plan_and_has_the_seeds():
    results = json.loads((BUNDLE / "results.json").read_text())
    plan = json.loads((BUNDLE / "analysis-plan.json").read_text())
    provenance = json.loads((BUNDLE / "provenance.json").read_text())
    assert results["analysis"]["sha256"] == plan["sha256"] == provenance["plan_sha256"]
    from probe_dpo.analysis import plan_hash

    assert plan_hash(plan["plan"]) == plan["sha256"]  # the plan file is the one that was hashed
    assert results["analysis"]["family_size"] == plan["plan"]["family_size"]  # corrected over the declared family
    assert plan["plan"]["judges"]["in_loop"] and not set(plan["plan"]["judges"]["outcome"]) & set(
        plan["plan"]["judges"]["in_loop"])
    for arm in HEADLINE:
        assert results["arms"][arm]["seeds"] >= 3, arm
        verdict = results["arms"][arm]["outcome"]
        assert verdict["label"] and verdict["decided_by"]["why"]
    assert results["null_references"]["base-replicate"]["label"]
    report = (BUNDLE / "report.md").read_text()
    assert plan["sha256"][:16] in report and "Outcome labels (declared before the runs)" in report
    for figure in (BUNDLE / "figures").iterdir():
        assert f"figures/{figure.name}" in report


def test_a_study_bundles_only_when_it_ran_its_declared_config(tmp_path):
    import pytest

    from probe_dpo.config import load_config, to_dict
    from probe_dpo.workflows import bundled_config
    from probe_dpo.workflows.attribution_study.config import AttributionConfig

    ref = _reference()
    config = to_dict(load_config(AttributionConfig, bundled_config("attribution-lean"), []))
    run = tmp_path / "study"
    (run / "figures").mkdir(parents=True)
    (run / "figures" / "recall_at_k.png").write_bytes(b"png")
    (run / "directions").mkdir()
    for name in ref.STUDY_FILES:
        (run / name).write_text("{}")
    ran = {**config, "testbed": "/elsewhere/testbed", "out": str(run)}  # where things are is not what it does
    clusters = {"clusters": [{"size": 3, "examples": [{"prompt": "a testbed prompt", "chosen": "a response"}]}]}
    (run / "results.json").write_text(json.dumps({"config": ran, "clusters": clusters}))
    provenance = ref.bundle_study(run, tmp_path / "bundle", "attribution-lean")
    bundled = json.loads((tmp_path / "bundle" / "results.json").read_text())
    assert bundled == {"config": ran, "clusters": {"clusters": [
        {"size": 3, "examples": "(withheld: 1 from the testbed's data)"}]}}  # the numbers, not the packages' texts
    assert provenance["declared_config"] == "probe_dpo/workflows/attribution-lean.yaml"
    assert sorted(p.relative_to(tmp_path / "bundle").as_posix() for p in (tmp_path / "bundle").rglob("*.*")) == sorted(
        [*ref.STUDY_FILES, "figures/recall_at_k.png", "provenance.json"])
    assert ref.undeclared("attribution-lean", {**ran, "retrain": {**ran["retrain"], "seed": 1}}) == ["retrain.seed"]
    (run / "results.json").write_text(json.dumps({"config": {**ran, "retrain": {**ran["retrain"], "budgets": [0.1]}}}))
    with pytest.raises(SystemExit, match="differs from the declared attribution-lean in retrain.budgets"):
        ref.bundle_study(run, tmp_path / "other", "attribution-lean")
    assert not (tmp_path / "other").exists()


def test_the_readme_map_table_puts_each_cell_at_its_point():
    from probe_dpo.workflows.experiment.config import MapSettings
    from probe_dpo.workflows.experiment.obfuscation_map import map_plan, phase_map

    settings = MapSettings(family="obfuscation-control", axes={"penalty.weight": [0, 4], "sft.kl_weight": [0, 1]})
    plan = map_plan(settings)

    def arm(label, tpr):
        return {"seeds": 2, "outcome": {"label": label}, "fixed": {"train": {"tpr": {"delta": tpr}}}}

    cells = {settings.cell((0.0, 0.0)): arm("removed", 0.0), settings.cell((4.0, 0.0)): arm("obfuscated activations", -0.4),
             settings.cell((0.0, 1.0)): arm("removed", 0.01), settings.cell((4.0, 1.0)): arm("removed", -0.02),
             settings.cell((2.0, 0.0)): arm("removed", -0.1)}
    phase = phase_map(plan, cells, {settings.cell((4.0, 0.0)): [20, None], settings.cell((0.0, 0.0)): [None, None]})
    table = _reference().map_table({"map": phase}, "examples/map/results.json").splitlines()
    assert table[:5] == ["| penalty.weight \\ sft.kl_weight | 0.0 | 1.0 |", "| --- | --- | --- |",
                         "| 0.0 | removed, TPR +0.00, warned at -/- | removed, TPR +0.01 |",
                         "| 2.0 | removed*, TPR -0.10 | - |",
                         "| 4.0 | obfuscated activations, TPR -0.40, warned at 20/- | removed, TPR -0.02 |"]
    assert ("fired in 1 of 2 obfuscated seeds, false alarms in 0 of 2 removed or blatant seeds (rate 0.00)"
            in table[-1])
    assert ("penalty.weight 2.0 (removed) to 4.0 (obfuscated activations) at sft.kl_weight=0.0; sft.kl_weight 0.0 "
            "(obfuscated activations) to 1.0 (removed) at penalty.weight=4.0") in table[-1]


def test_the_readme_study_table_reads_each_budget_arm_against_the_random_one():
    def rate(r):
        return {"tcc": {"rate": r, "ci_low": r - 0.02, "ci_high": r + 0.02}}

    arms = {"base": {"rates": rate(0.125)}, "raw": {"rates": rate(0.2)},
            "probe-filter-top8pct": {"ranking": "probe", "budget": 0.08, "k": 11, "bad_affected": 10,
                                     "rates": rate(0.15), "reduction": {"tcc": {"reduction": 0.25, "ci_low": 0.05,
                                                                                 "ci_high": 0.4}},
                                     "vs_random": {"control": "random-filter-top8pct",
                                                   "tcc": {"delta": -0.04, "delta_ci_low": -0.07,
                                                           "delta_ci_high": -0.01, "p_holm": 0.012}},
                                     "capability": {"accuracy": 0.6, "ci_low": 0.53, "ci_high": 0.67}},
            "random-filter-top8pct": {"ranking": "random", "budget": 0.08, "k": 11, "bad_affected": 7,
                                      "rates": rate(0.19), "reduction": {"tcc": {"reduction": 0.05, "ci_low": -0.1,
                                                                                  "ci_high": 0.2}}}}
    results = {"k": 82, "direction": "diff-of-means", "retrain": {"judges": ["tcc"], "arms": arms},
               "recall": {"probe": 0.817, "random": 0.6, "chance": 0.612},
               "recall_ci": {"probe": [0.72, 0.886], "random": [0.5, 0.7]}}
    table = _reference().study_table(results, "examples/attribution-lean/results.json").splitlines()
    assert table[2:4] == [
        "| probe (diff-of-means) | 0.817 [0.720, 0.886] | top 8% | 11 (10) | 0.150 [0.130, 0.170] | +25% [+5%, +40%] "
        "| -0.040 [-0.070, -0.010], 0.012 | 0.600 [0.530, 0.670] |",
        "| random | 0.600 [0.500, 0.700] | top 8% | 11 (7) | 0.190 [0.170, 0.210] | +5% [-10%, +20%] | control | - |"]
    assert "base model 0.125 [0.105, 0.145], DPO on the raw set 0.200 [0.180, 0.220]" in table[-1]
    assert "expected recall@82 0.612" in table[-1]
