"""results.json and the report, rebuilt from the run folder: one flat row per trial, per-arm
summaries with seeds pooled, paired arm comparisons, stage timings."""

from __future__ import annotations

import logging
from typing import Any

from probe_dpo import storage
from probe_dpo.data import json_digest
from probe_dpo.workflows.experiment.arms import ARMS, arm_of, target_role
from probe_dpo.workflows.experiment.evaluate import REPLICATE_EVAL, load_eval
from probe_dpo.workflows.experiment.obfuscation_map import cell_point, phase_map

log = logging.getLogger(__name__)


def flat_metrics(m: dict) -> dict:
    """The headline numbers of one trial's evaluation as flat keys (Tune results, results.json):
    toxicity under each judge, retention, and per probe role AUROC / TPR / FPR at the base
    threshold with their changes (fixed texts), and AUROC / TPR on the policy's own completions
    (the first judge's labels, read from the policy)."""
    s = m.get("summary") or {}
    out: dict[str, Any] = {"trial": m.get("trial"), "arm": m.get("arm"), "seed": m.get("seed"),
                           "perplexity": m["perplexity"], "perplexity_change": s.get("perplexity_change"),
                           "kl_to_base": (m.get("kl_to_base") or {}).get("per_token"),
                           "train_seconds": m.get("train_seconds"), "eval_seconds": m.get("eval_seconds"),
                           }
    for judge, t in m["toxicity"].items():
        out[f"toxicity.{judge}.rate"] = t["rate"]
        out[f"toxicity.{judge}.change"] = (s.get("toxicity", {}).get(judge) or {}).get("change")
    for role, by_metric in s.get("fixed", {}).items():
        for metric in ("auroc", "tpr", "fpr"):
            d = by_metric.get(metric) or {}
            out[f"fixed.{role}.{metric}"] = d.get("value")
            out[f"fixed.{role}.{metric}.delta"] = d.get("delta")
    own = (s.get("own", {}).get("policy") or {})
    first = next(iter(own), None)
    for role, by_metric in (own.get(first) or {}).items():
        for metric in ("auroc", "tpr"):
            d = by_metric.get(metric) or {}
            out[f"own.{role}.{metric}"] = d.get("value")
            out[f"own.{role}.{metric}.delta"] = d.get("delta")
    return out


_SUMMARY_CACHE: dict[str, dict] = {}


def summarize(run: str) -> dict:
    """Per-arm summaries (seeds pooled) and the paired arm comparisons, from storage.

    An arm's summary is cached in this process under its trials' evaluation keys, so the
    rewrite after each completed trial only computes the arm that changed."""
    import numpy as np

    from probe_dpo.analysis import PLAN_FILE, read_plan
    from probe_dpo.detection import role_keys
    from probe_dpo.evaluation import judge_threshold
    from probe_dpo.goodhart import (
        REPLICATE,
        arm_summary,
        base_summary,
        comparisons,
        default_pairs,
        judge_agreement,
        outcomes,
    )

    ctx = storage.read_json(storage.join(run, "shared", "context.json"))
    e = ctx["eval"]
    roles = role_keys(ctx)
    base_uri = storage.join(run, "shared", "base-eval")
    if not storage.is_complete(base_uri):
        return {"rows": [], "arms": {}, "comparisons": [], "histograms": {}}
    base = load_eval(base_uri)
    rows, evals, keys = [], {}, {}
    for trial in storage.list_dir(storage.join(run, "trials")):
        uri = storage.join(run, "trials", trial, "eval")
        if not storage.is_complete(uri):
            continue
        m = storage.read_json(storage.join(uri, "metrics.json"))
        rows.append(flat_metrics(m))
        name = m["arm"] if not m.get("overrides") else m["trial"]
        evals.setdefault(name, []).append(load_eval(uri))
        keys.setdefault(name, []).append(storage.read_manifest(uri).get("metadata", {}).get("key"))
    order = {a: i for i, a in enumerate(ARMS)}
    rows.sort(key=lambda r: (order.get(r["arm"], 99), str(r["trial"])))
    arms = {}
    for name in sorted(evals, key=lambda a: (order.get(a, 99), a)):
        arm = name if name in ARMS else evals[name][0]["metrics"]["arm"]
        cache_key = json_digest([run, name, sorted(map(str, keys[name])), e["bootstrap"], e["seed"]])
        if cache_key not in _SUMMARY_CACHE:
            _SUMMARY_CACHE[cache_key] = arm_summary(base, evals[name], roles, target_role(arm), n_boot=e["bootstrap"],
                                                    seed=e["seed"])
        arms[name] = {**_SUMMARY_CACHE[cache_key], "about": arm_of(arm).about}
        first = evals[name][0]["metrics"]
        arms[name]["training"] = {"data": first.get("data"), "steps": (first.get("train") or {}).get("global_step"),
                                  "rounds": first.get("rounds"),
                                  "train_seconds": float(np.mean([r["metrics"].get("train_seconds") or np.nan
                                                                  for r in evals[name]])),
                                  "eval_seconds": float(np.mean([r["metrics"].get("eval_seconds") or np.nan
                                                                 for r in evals[name]]))}
    probe = ctx["best_probe"]
    histograms = {name: (ev.scores[probe], ev.labels, ev.thresholds[probe])
                  for name, ev in [("base", base["fixed"])] + [(a, evals[a][0]["fixed"]) for a in arms]}
    out = {"rows": rows, "base": base_summary(base, roles), "arms": arms, "roles": roles, "histograms": histograms}
    declared = read_plan(run)
    if declared is None:  # a run from before plans were declared: descriptive tables only
        out["comparisons"] = comparisons(evals, default_pairs([a for a in arms if a in ARMS]), roles,
                                         n_boot=e["bootstrap"], seed=e["seed"])
        out["analysis"] = {"sha256": None, "note": "this run declared no analysis plan: no outcome labels"}
        return out
    plan = declared["plan"]
    n_boot = plan["settings"]["bootstrap"]
    pairs = [p for p in plan["comparisons"] if p[0] in evals and p[1] in evals]
    out["comparisons"] = comparisons(evals, pairs, roles, n_boot=n_boot, seed=e["seed"],
                                     outcome_judges=plan["judges"]["outcome"])
    replicate_uri = storage.join(run, "shared", REPLICATE_EVAL)
    replicate = load_eval(replicate_uri) if storage.is_complete(replicate_uri) else None
    # a map's refined cells are declared by its rule (obfuscation_map): they join the family as the coarse ones
    targets = {a: plan["targets"].get(a) or target_role(a) for a in arms
               if a in plan["targets"] or ("map" in plan and cell_point(plan["map"], a) is not None)}
    decided = outcomes(base, evals, replicate, roles, targets, plan, out["comparisons"], seed=e["seed"])
    for name, verdict in decided["labels"].items():
        if name in arms:
            arms[name]["outcome"] = verdict
    out["null_references"] = {REPLICATE: decided["labels"].get(REPLICATE)} if replicate is not None else {}
    for row in rows:
        row["outcome"] = (arms.get(row["arm"], {}).get("outcome") or {}).get("label", "exploratory (not in the plan)")
    exploratory = sorted(set(arms) - set(targets))
    out["analysis"] = {"sha256": declared["sha256"], "plan_file": PLAN_FILE, "family_size": decided["family_size"],
                       "judges": plan["judges"], "alpha": plan["settings"]["alpha"],
                       "min_effect": plan["settings"]["min_effect"], "bootstrap": n_boot,
                       "exploratory": {"arms": exploratory, "rows": "per-probe metrics, in-loop judges' rows and "
                                       "everything not named in the plan are exploratory"},
                       "replication": decided["replication"],
                       "judge_agreement": judge_agreement(base, plan["judges"]["in_loop"], judge_threshold(base))}
    if "map" in plan:
        # per seed: the step the early warning first fired, None (on, never fired) or "off"
        warnings = {a: [(r["metrics"].get("train") or {}).get("early_warning", {"first_fired_step": "off"})
                        .get("first_fired_step") for r in evals[a]] for a in arms}
        out["map"] = phase_map(plan["map"], arms, warnings)
    return out


def training_histories(run: str, rows: list[dict]) -> dict[str, list]:
    """Each arm's training ``log_history`` (its first trial's final policy, ``training_run.json``)."""
    from probe_dpo.training.loop import RUN_FILE

    out: dict[str, list] = {}
    for row in rows:
        uri = storage.join(run, "trials", str(row["trial"]), "train", "policy", RUN_FILE)
        if row["arm"] not in out and storage.exists(uri):
            out[row["arm"]] = storage.read_json(uri).get("log_history") or []
    return out


def write_results(run: str) -> dict:
    """results.json (per trial, per arm, comparisons, timings, each search's trials and Pareto
    set) and the report, from storage."""
    from probe_dpo.report.experiment import experiment_report
    from probe_dpo.storage import json_text

    results = summarize(run)
    histograms = results.pop("histograms")
    timings_uri = storage.join(run, "shared", "timings.json")
    timings = storage.read_json(timings_uri) if storage.exists(timings_uri) else {}
    timings["trials"] = {r["trial"]: {"train": r.get("train_seconds"), "eval": r.get("eval_seconds")}
                         for r in results["rows"]}
    timings["sum_of_stages"] = round(sum(timings.get(k) or 0 for k in ("testbed", "probes_and_pairs",
                                                                       "base_evaluation"))
                                     + sum((t["train"] or 0) + (t["eval"] or 0) for t in timings["trials"].values()), 1)
    results["timings"] = timings
    from probe_dpo.workflows.experiment.search import read_outcomes

    results["searches"] = read_outcomes(run)  # each search's trials and Pareto set
    storage.write_text(storage.join(run, "results.json"), json_text(results))
    ctx = storage.read_json(storage.join(run, "shared", "context.json"))
    paths = experiment_report(run, ctx, results, histograms, training_histories(run, results["rows"])).publish(run)
    return {"rows": results["rows"], "arms": results["arms"], **paths}
