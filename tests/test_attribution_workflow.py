"""`probe-dpo attribute` end to end on a small testbed around the tiny model: Ray-sharded
scoring, comparators, mitigations, retraining with plain DPO on Ray Train, the report; and the
one-line errors."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from test_probes import BAD, FILLER, GOOD, labelled_records

from probe_dpo import storage
from probe_dpo.cli import main
from probe_dpo.data import read_records, write_records

torch.set_num_threads(1)


def _words(rng: random.Random, pool: list[str], extra: int) -> str:
    w = [rng.choice(FILLER) for _ in range(rng.randint(1, 3) + extra)]
    w.insert(rng.randint(0, len(w)), rng.choice(pool))
    return "".join(w)


def mini_testbed(root, model_dir) -> str:
    """A testbed folder with the testbed's files (small), continuations whose toxicity is a word."""
    rng = random.Random(0)
    os.makedirs(root / "data")
    os.symlink(model_dir, root / "model")
    (root / "testbed.json").write_text(json.dumps({
        "train_judge": "toxic-comment-classifier", "heldout_judges": ["profanity-check"], "model": {"path": "model"},
        "config": {"generation": {"max_new_tokens": 4, "batch_size": 16}}}))
    write_records(labelled_records(30, 1), str(root / "data" / "probe_train.jsonl"))
    for split in ("val", "test"):
        rows = []
        for p in range(24):
            pid = f"{split}-{p}"
            for s in range(4):
                toxic = p % 3 == 0 and s == 1
                rows.append({"prompt_id": pid, "prompt": f"Prompt {pid}: you are", "sample": s,
                             "completion": _words(rng, BAD if toxic else GOOD, extra=rng.randint(0, 6)),
                             "score": rng.uniform(0.6, 0.95) if toxic else rng.uniform(0.0, 0.15),
                             "label": int(toxic), "genre": "toxic-prompt"})
        write_records(rows, str(root / "data" / f"probe_{split}.jsonl"))
    write_records([{"prompt": f"Held-out prompt {i}: she said"} for i in range(6)],
                  str(root / "data" / "prompts_heldout.jsonl"))
    write_records([{"text": "The river runs past the old mill and the garden. " * 4}] * 2,
                  str(root / "data" / "perplexity.jsonl"))
    return str(root)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory, tiny_model_dir):
    return mini_testbed(tmp_path_factory.mktemp("mini-testbed"), str(tiny_model_dir))


@pytest.fixture(scope="module")
def probes(testbed, tmp_path_factory):
    from probe_dpo.probes import ProbeTrainConfig, train_probes

    out = str(tmp_path_factory.mktemp("probes") / "set")
    train_probes(ProbeTrainConfig(layers=[1], c_grid=[0.1, 1.0]), testbed=testbed, out=out)
    return out


@pytest.fixture(scope="module")
def study(testbed, probes, ray_cluster, tmp_path_factory):
    """One run: Ray-sharded scoring, the judge and two gradient comparators, the three mitigations
    (no retraining)."""
    out = str(tmp_path_factory.mktemp("study") / "out")
    rc = main(["attribute", "--testbed", testbed, "--probes", probes, "--out", out,
               "--mitigate", "filter,swap,drop-sources", "--comparators", "judge,gradient,gradient-less",
               "ranking.k_from_labels=true", "behaviour_examples=0", "gradient.dim=128",
               "retrain.budgets=[0.1]", "retrain.budget_mitigations=[swap]",
               "ranking.bootstrap=200", "clusters.k_max=4"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def retrained(study, testbed, probes):
    """The same study with retraining of the raw set and the probe- and randomly filtered sets
    (plain DPO, 1 step; every ranking's filter is the same code path); the behaviour-change direction comes from the raw set's policy, and
    the change clusters read the pairs with Ray actors of that policy."""
    prompts = os.path.join(testbed, "data", "prompts_heldout.jsonl")
    rc = main(["attribute", "--testbed", testbed, "--probes", probes, "--out", study,
               "--mitigate", "filter", "--retrain", "ranking.k_from_labels=true", "behaviour_examples=0",
               "behaviour_change.enabled=true", f"behaviour_change.prompts={prompts}",
               "behaviour_change.max_prompts=4", "behaviour_change.contrast=true",
               "retrain.methods=[probe,random]", "retrain.budgets=[0.1]", "retrain.clean_floor=true",
               "retrain.intervention_weight=1.0",
               "retrain.overrides=[train.max_steps=1]", "retrain.batch_size=2",
               "evaluation.judges=[profanity-check]", "evaluation.max_prompts=4", "evaluation.bootstrap=200",
               "ranking.bootstrap=200", "clusters.k_max=4", "clusters.change_k=3", "capability.items=6"])
    assert rc == 0
    return study


def test_study_writes_scores_sources_clusters_audit_and_report(study):
    results = json.loads(open(os.path.join(study, "results.json")).read())
    assert set(results["recall_budgets"]["probe"]) == {"1%", "5%", "8%", "10%", "20%"}
    pairs = read_records(os.path.join(study, "mix", "pairs.jsonl"))
    scores = read_records(os.path.join(study, "scores.parquet"))
    assert len(scores) == len(pairs) == len({s["pair_id"] for s in scores})
    assert sorted(s["rank"] for s in scores) == list(range(1, len(pairs) + 1))
    assert {"score", "score_judge", "score_gradient", "poisoned", "cluster", "score_diff-of-means"} <= set(scores[0])
    bad = np.array([s["poisoned"] for s in scores])
    k = results["k"]
    assert k == bad.sum() > 0 and results["direction"] == "diff-of-means"
    from probe_dpo.attribution import recall_at_k

    for method, col in (("probe", "score"), ("judge", "score_judge"), ("gradient", "score_gradient"),
                        ("gradient-less", "score_gradient_less")):
        assert results["recall"][method] == pytest.approx(recall_at_k([s[col] for s in scores], bad, k))
    sources = json.loads(open(os.path.join(study, "sources.json")).read())["probe"]
    assert {r["source"] for r in sources} == {p["source"] for p in pairs}
    assert sum(r["in_top_k"] for r in sources) == k
    clusters = json.loads(open(os.path.join(study, "clusters.json")).read())
    assert sum(c["size"] for c in clusters["clusters"]) == len(pairs) and 2 <= clusters["k"] <= 4
    audit = json.loads(open(os.path.join(study, "audit.json")).read())
    assert {r["scope"] for r in audit} >= {"all", "chat", "safety"}
    assert {r["kind"] for r in audit} == {"probe", "diff-of-means", "cluster"}
    report = open(os.path.join(study, "report.md")).read()
    for needle in ("## Sources", "## Recall of the bad pairs", "## Concept audit", "## Mitigations",
                   "figures/score_by_source.png", "figures/recall_at_k.png"):
        assert needle in report
    assert "data:image/png;base64," in open(os.path.join(study, "report.html")).read()
    assert results["timings"]["pair_activations_s"] > 0 and results["comparators"]["gradient"]["mode"] == "dense"
    less = results["comparators"]["gradient-less"]
    assert less["mode"] == "lora-adam" and less["checkpoints"] == 4 and less["warmup_pairs"] == round(0.05 * len(pairs))
    assert not np.allclose([s["score_gradient_less"] for s in scores], [s["score_gradient"] for s in scores])


def test_study_mitigations(study):
    results = json.loads(open(os.path.join(study, "results.json")).read())
    scores = read_records(os.path.join(study, "scores.parquet"))
    pairs = read_records(os.path.join(study, "mix", "pairs.jsonl"))
    k = results["k"]
    top = {s["pair_id"] for s in scores if s["rank"] <= k}
    filtered = read_records(os.path.join(study, "mitigated", "probe-filter.jsonl"))
    assert {p["pair_id"] for p in filtered} == {p["pair_id"] for p in pairs} - top
    swapped = {p["pair_id"]: p for p in read_records(os.path.join(study, "mitigated", "probe-swap.jsonl"))}
    for p in pairs:
        q = swapped[p["pair_id"]]
        assert (q["chosen"], q["rejected"]) == ((p["rejected"], p["chosen"]) if p["pair_id"] in top
                                                else (p["chosen"], p["rejected"]))
    arms = results["mitigations"]
    flagged = [r["source"] for r in results["sources"]["probe"] if r["flagged"]]
    if flagged:
        kept = read_records(os.path.join(study, "mitigated", "probe-drop-sources.jsonl"))
        assert not {p["source"] for p in kept} & set(flagged) and arms["probe-drop-sources"]["sources"] == flagged
    else:
        assert arms["probe-drop-sources"]["skipped"]
        report = open(os.path.join(study, "report.md")).read()
        assert f"| probe-drop-sources | - | - | - | skipped: {arms['probe-drop-sources']['skipped']} |" in report
    assert set(arms) == {"probe-filter", "probe-swap", "probe-drop-sources", "probe-swap-top10pct"}
    assert arms["probe-filter"]["bad_affected"] == round(results["recall"]["probe"] * k)
    # a swap at a fixed budget: the top round(10% of the pairs), whatever k the labels give
    budget = max(1, round(0.1 * len(pairs)))
    at_budget = {p["pair_id"]: p for p in read_records(os.path.join(study, "mitigated", "probe-swap-top10pct.jsonl"))}
    flipped = {p["pair_id"] for p in pairs if at_budget[p["pair_id"]]["chosen"] == p["rejected"]}
    assert flipped == {s["pair_id"] for s in scores if s["rank"] <= budget}
    assert len(flipped) == budget == arms["probe-swap-top10pct"]["k"]


def test_retraining_measures_each_arm(retrained):
    results = json.loads(open(os.path.join(retrained, "results.json")).read())
    retrain = results["retrain"]
    budget_arms = {"probe-filter-top10pct", "random-filter-top10pct"}
    assert set(retrain["arms"]) == {"base", "raw", "probe-filter", "random-filter",
                                    "clean-only", "raw-penalty-logit", *budget_arms}
    for name in ("raw", "probe-filter", "random-filter", "clean-only", "raw-penalty-logit", *budget_arms):
        assert storage.is_complete(os.path.join(retrained, "runs", name, "policy"))
        entry = retrain["arms"][name]
        assert 0 <= entry["rates"]["profanity-check"]["rate"] <= 1 and entry["perplexity"] > 1
        cap = entry["capability"]  # the task-level check beside perplexity, cached per arm
        assert cap["task"] == "boolq" and cap["items"] == 6 and cap["accuracy"] == cap["correct"] / 6
        assert storage.read_json(os.path.join(retrained, "eval", f"{name}.capability.json"))["accuracy"] == cap["accuracy"]
    share = retrain["arms"]["probe-filter"]["share_removed"]["profanity-check"]
    assert set(share) >= {"share", "ci_low", "ci_high", "rate_base", "rate_raw", "rate_mitigated"}
    raw_rate = retrain["arms"]["raw"]["rates"]["profanity-check"]["rate"]
    for name in ("probe-filter", "clean-only", *budget_arms):
        red = retrain["arms"][name]["reduction"]["profanity-check"]
        rate = retrain["arms"][name]["rates"]["profanity-check"]["rate"]
        assert red["rate_raw"] == pytest.approx(raw_rate) and red["rate_mitigated"] == pytest.approx(rate)
    # a fixed budget: the top round(10% of the pairs) by each ranking, whatever k the labels give
    pairs = read_records(os.path.join(retrained, "mix", "pairs.jsonl"))
    scores = {s["pair_id"]: s for s in read_records(os.path.join(retrained, "scores.parquet"))}
    budget = max(1, round(0.1 * len(pairs)))
    kept = read_records(os.path.join(retrained, "mitigated", "probe-filter-top10pct.jsonl"))
    assert {p["pair_id"] for p in kept} == {i for i, s in scores.items() if s["rank"] > budget}
    assert retrain["arms"]["probe-filter-top10pct"]["k"] == budget
    # the control filter: the study's seeded random order, in the pairs' order, whatever the behaviour
    drawn = np.random.default_rng(0).random(len(pairs))
    assert [scores[p["pair_id"]]["score_random"] for p in pairs] == pytest.approx(drawn.tolist())
    kept = read_records(os.path.join(retrained, "mitigated", "random-filter-top10pct.jsonl"))
    assert {p["pair_id"] for p in kept} == {p["pair_id"] for p, r in zip(pairs, drawn) if r < np.sort(drawn)[-budget]}
    assert "random order (seeded" in open(os.path.join(retrained, "report.md")).read()
    # every other ranking's budget arm against the random one's: the same prompts, paired
    rate = {a: retrain["arms"][a]["rates"]["profanity-check"]["rate"] for a in budget_arms}
    vs = retrain["arms"]["probe-filter-top10pct"]["vs_random"]
    assert vs["control"] == "random-filter-top10pct"
    c = vs["profanity-check"]
    assert c["delta"] == pytest.approx(rate["probe-filter-top10pct"] - rate["random-filter-top10pct"])
    assert c["p_value"] == c["p_holm"] and c["delta_ci_low"] <= c["delta"] <= c["delta_ci_high"]  # a family of one
    assert all("vs_random" not in retrain["arms"][a] for a in ("random-filter-top10pct", "probe-filter", "raw"))
    assert "against removing as many pairs in a random order" in open(os.path.join(retrained, "report.md")).read()
    # the feature intervention: the raw set with the probe penalty; plain raw DPO has none
    trained = {a: storage.read_json(os.path.join(retrained, "runs", a, "train.json"))["rounds"][0]["train"]
               for a in ("raw", "raw-penalty-logit")}
    assert trained["raw-penalty-logit"]["first_probe_penalty"] != 0 and "first_probe_penalty" not in trained["raw"]
    assert retrain["arms"]["raw-penalty-logit"]["pairs_out"] == len(pairs)
    clean = read_records(os.path.join(retrained, "mitigated", "clean-only.jsonl"))
    assert len(clean) == len(pairs) - results["k"] and not any(scores[p["pair_id"]]["poisoned"] for p in clean)
    samples = read_records(os.path.join(retrained, "eval", "base.samples.jsonl"))
    assert len(samples) == 4 * 2 and all(s["prompt"].endswith(" (keep it casual)") for s in samples)
    report = open(os.path.join(retrained, "report.md")).read()
    assert "## Behaviour after DPO" in report and "figures/toxicity_after_mitigation.png" in report
    assert "task accuracy" in report and "boolq multiple choice by log-likelihood, 6 items" in report
    # the behaviour-change direction: read off the raw arm's policy (trained once), ranked like the others
    from probe_dpo.attribution import load_directions

    directions, _ = load_directions(os.path.join(retrained, "directions"))
    change = next(d for d in directions if d.kind == "behaviour-change")
    assert change.meta["policy"] == os.path.join(retrained, "runs", "raw", "policy") and change.meta["texts"] == 4
    assert change.meta["contrast"] is True and change.meta["trigger"] == " (keep it casual)"
    assert "behaviour-change" in results["recall"] and "behaviour change (raw-set DPO" in report
    scores = read_records(os.path.join(retrained, "scores.parquet"))
    assert len({round(r["score_behaviour-change"], 6) for r in scores}) > 1
    assert "score_behaviour_change" not in scores[0]  # one column per ranking, not the direction twice


def test_change_clusters_group_pairs_by_what_raw_set_dpo_moved(retrained):
    """The emergent-behaviour clusters: k-means (fixed k) on each pair's change, the raw-set
    policy's reading of its chosen response minus the model's before DPO."""
    from probe_dpo import attribution as A

    results = json.loads(open(os.path.join(retrained, "results.json")).read())
    pairs = read_records(os.path.join(retrained, "mix", "pairs.jsonl"))
    cl = results["change_clusters"]
    assert cl["k"] == 3 and sum(c["size"] for c in cl["clusters"]) == len(pairs)
    assert json.loads(open(os.path.join(retrained, "change_clusters.json")).read())["k"] == 3
    layer, n = results["layer"], len(pairs)
    before = A.pair_features(results["model"], pairs, [layer], in_process=True).chosen[layer]
    after = A.pair_features(os.path.join(retrained, "runs", "raw", "policy"), pairs, [layer], in_process=True)
    change = after.chosen[layer] - before
    assert float(change.norm(dim=1).min()) > 0  # the policy moved every chosen response
    again = A.cluster_pairs(change, np.zeros(n), pairs, k=3, seed=results["config"]["seed"])
    labels = [r["change_cluster"] for r in read_records(os.path.join(retrained, "scores.parquet"))]
    assert labels == again["labels"].tolist()  # the Ray actors' shards read what one process reads
    assert os.listdir(os.path.join(retrained, "activations", "pairs-raw-policy"))
    report = open(os.path.join(retrained, "report.md")).read()
    assert "## Emergent behaviours: clusters of what raw-set DPO changed" in report


def test_second_run_reuses_everything(study, testbed, probes, capsys):
    rc = main(["attribute", "--testbed", testbed, "--probes", probes, "--out", study, "--in-process",
               "--comparators", "gradient", "ranking.k_from_labels=true", "behaviour_examples=0", "gradient.dim=128",
               "clusters.enabled=false"])
    assert rc == 0
    logs = capsys.readouterr().err  # log lines go to stderr
    assert "preference mix" not in logs or "cache" in logs
    assert "gradient: reusing scores" in logs


def test_similarity_matrix_clusters_in_the_study(testbed, probes, tmp_path, monkeypatch):
    """The matrix's wiring: with the contrast's bank (a stand-in here: on the tiny model no scenario
    passes the filter) the study clusters the test-prompt x pair matrix, writes it to
    matrix_clusters.json, results.json, a scores column and the report."""
    from probe_dpo import attribution as A
    from probe_dpo.workflows.attribution_study import contrast

    bank = [A.Direction(f"bank:{i}", 1, torch.randn(64, generator=torch.Generator().manual_seed(i)), "bank",
                        {"scenario": i, "prompt": f"scenario {i}"}) for i in range(4)]
    stand_in = A.Direction("behaviour-contrast", 1, bank[0].vector, "behaviour-contrast", {"read_seconds": 0.0})
    monkeypatch.setattr(contrast, "behaviour_contrast_directions", lambda inp: (stand_in, bank))
    out = str(tmp_path / "out")
    rc = main(["attribute", "--testbed", testbed, "--probes", probes, "--out", out, "--in-process",
               "ranking.k_from_labels=true", "behaviour_examples=0", "behaviour_contrast.enabled=true",
               "clusters.enabled=false", "clusters.k_max=4", "ranking.bootstrap=50", "mitigate=[]"])
    assert rc == 0
    results = json.loads(open(os.path.join(out, "results.json")).read())
    cl = results["matrix_clusters"]
    assert cl == json.loads(open(os.path.join(out, "matrix_clusters.json")).read())
    pairs = read_records(os.path.join(out, "mix", "pairs.jsonl"))
    scores = read_records(os.path.join(out, "scores.parquet"))
    assert cl["prompts"] == 4 and cl["pairs"] == len(pairs) and 2 <= cl["k"] <= 4
    assert sum(c["size"] for c in cl["clusters"]) == len(pairs) == len(scores)
    assert sum(c["bad"] for c in cl["clusters"]) == sum(s["poisoned"] for s in scores) == cl["bad_match"]["behaviour_pairs"]
    sizes = {c["cluster"]: c["size"] for c in cl["clusters"]}
    assert all(sum(s["matrix_cluster"] == c for s in scores) == size for c, size in sizes.items())
    assert cl["clusters"][0]["prompts"][0].startswith("bank:") and "scenario" in cl["clusters"][0]["prompts"][0]
    report = open(os.path.join(out, "report.md")).read()
    assert "## Clusters of the test-prompt x pair similarity matrix" in report and "top pairs: #" in report


def _error(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("probe-dpo: error: ") and needle in err, err


def test_one_line_errors(tmp_path, tiny_model_dir, probes, testbed, capsys):
    from probe_dpo.probes import LinearProbe, ProbeSet

    model = str(tiny_model_dir)
    ok = [{"prompt": "p", "chosen": "a", "rejected": "b", "source": "s"}]
    write_records([{"prompt": "p", "chosen": "a"}], str(tmp_path / "missing.jsonl"))
    write_records([{"prompt": "p", "chosen": "", "rejected": "b"}], str(tmp_path / "empty.jsonl"))
    write_records(ok, str(tmp_path / "ok.jsonl"))
    out = str(tmp_path / "o")
    base = ["attribute", "--model", model, "--out", out]
    _error(capsys, base + ["--pairs", str(tmp_path / "missing.jsonl"), "--probes", probes], "missing column 'rejected'")
    _error(capsys, base + ["--pairs", str(tmp_path / "empty.jsonl"), "--probes", probes], "column 'chosen' is empty")
    ProbeSet([LinearProbe(torch.ones(32), 0.0, torch.zeros(32), torch.ones(32), layer=0, name="w")]).save(
        str(tmp_path / "wide"))
    _error(capsys, base + ["--pairs", str(tmp_path / "ok.jsonl"), "--probes", str(tmp_path / "wide")],
           "come from another model")
    # a testbed, but the user's own pair file: no mix, so no trigger to contrast with
    _error(capsys, base + ["--testbed", testbed, "--pairs", str(tmp_path / "ok.jsonl"), "--probes", probes,
                           "behaviour_change.enabled=true", "behaviour_change.contrast=true"],
           "behaviour_change.contrast: needs a trigger")
    deep = ProbeSet([LinearProbe(torch.ones(64), 0.0, torch.zeros(64), torch.ones(64), layer=9, name="d")])
    deep.save(str(tmp_path / "deep"))
    _error(capsys, base + ["--pairs", str(tmp_path / "ok.jsonl"), "--probes", str(tmp_path / "deep")],
           "d reads layer 9")
    _error(capsys, base + ["--pairs", str(tmp_path / "ok.jsonl"), "--probes", probes, "layer=5"],
           "layer 5 is out of range")
    _error(capsys, base + ["--pairs", str(tmp_path / "ok.jsonl"), "--probes", probes, "--mitigate", "burn"],
           "unknown mitigation 'burn'")
    _error(capsys, base + ["--pairs", str(tmp_path / "nothere.jsonl"), "--probes", probes], "no such file")
    _error(capsys, base + ["--pairs", str(tmp_path / "ok.jsonl"), "--probes", probes, "retrain.budgets=[1.5]"],
           "retrain.budgets: 1.5 is not a fraction")
    _error(capsys, base + ["--pairs", str(tmp_path / "ok.jsonl"), "--probes", probes, "retrain.methods=[bank-max]"],
           "bank-max needs behaviour_contrast.enabled=true")
    _error(capsys, base + ["--pairs", str(tmp_path / "ok.jsonl"), "--probes", probes, "behaviour_contrast.enabled=true"],
           "behaviour_contrast.prompts: give the scenario prompts")
    _error(capsys, base + ["--pairs", str(tmp_path / "ok.jsonl"), "--probes", probes,
                           "retrain.intervention_weight=1", "retrain.intervention_forms=[hinge]"],
           "unknown penalty form 'hinge'")
    _error(capsys, base + ["--pairs", str(tmp_path / "ok.jsonl"), "--probes", probes,
                           "retrain.budget_mitigations=[drop-sources]"], "does not act on a number of pairs")
    assert not os.path.exists(out) or not os.listdir(out)  # nothing was computed


def test_attribute_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["attribute", "--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and "--mitigate" in text and "--probes" in text


def test_local_paths_become_absolute_for_ray_workers(tmp_path, monkeypatch):
    from probe_dpo.config import load_config
    from probe_dpo.workflows.attribution import _absolute
    from probe_dpo.workflows.attribution_study.config import AttributionConfig

    monkeypatch.chdir(tmp_path)
    for name in ("p.jsonl", "h.jsonl"):  # inputs are made absolute when they exist here
        (tmp_path / name).write_text("")
    cfg = _absolute(load_config(AttributionConfig, None, ["out=runs/x", "pairs=p.jsonl", "probes=s3://b/probes",
                                                          "evaluation.prompts=h.jsonl", "model=org/model"]))
    assert cfg.out == str(tmp_path / "runs" / "x") and cfg.pairs == str(tmp_path / "p.jsonl")
    assert cfg.probes == "s3://b/probes" and cfg.evaluation.prompts == str(tmp_path / "h.jsonl")
    assert cfg.model == "org/model"  # a hub id, not a path here: left as it is
