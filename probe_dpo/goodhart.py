"""The Goodhart measurement of an experiment, from its evaluations: what each arm did to the
behaviour and to the probes that watch it, and how arms compare.

Inputs are evaluations as ``load_evaluation`` returns them (one per model: the base model,
each trial), all made on the same held-out prompts and probe-test rows, so every change is
paired. For each arm (its seeds pooled):

- the toxic rate under every judge of the panel, with its change against the base model;
- detection by each probe *role* (the train probe, the ensemble, the held-out probes, a
  probe retrained on the fine-tuned model) on fixed texts: AUROC, TPR / FPR / accuracy at the
  threshold fixed on the base model, mean score on positives and on negatives; and each
  probe's own AUROC and TPR (``per_probe``);
- detection on the arm's own completions, labelled by each judge, read from the policy's
  activations and from a frozen copy of the base model's (AUROC, TPR);
- the Obfuscation-Atlas outcome (``probe_dpo.detection.atlas_outcome``) for the probe the arm
  trained against.

``comparisons`` gives paired differences between arms (toxic rate under each judge, the
train probe's TPR on fixed texts) with Holm-adjusted p-values over all of them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from probe_dpo.detection import Readout, atlas_outcome, compare
from probe_dpo.evaluation import DEFAULT_THRESHOLD, paired_relative_change
from probe_dpo.stats import cluster_bootstrap, holm

FIXED_METRICS = ("auroc", "tpr", "fpr", "accuracy", "mean_pos", "mean_neg")
# The arm comparisons' p-values are bootstrap tail shares, so their resolution is 1/resamples;
# Holm multiplies the smallest by the number of rows (48 in the demo): 1000 resamples could not
# show anything below 0.048. 10x the interval's resamples is cheap (per-prompt sums only).
COMPARISON_RESAMPLES_FACTOR = 10
OWN_METRICS = ("auroc", "tpr")
OWN_ROLES = ("train", "ensemble", "held_out")
READERS = ("policy", "frozen")


def evaluation_files(toxicity: Mapping[str, Any], fixed: Readout, own: Mapping[str, Mapping[str, Any]],
                     own_groups: Sequence[Any]) -> dict:
    """The raw arrays of one evaluation as JSON (``scores.json``), what ``load_evaluation`` reads."""
    return {"toxicity": {j: np.asarray(s).tolist() for j, s in toxicity.items()}, "fixed": fixed.to_json(),
            "own": {reader: {"scores": {k: np.asarray(v).tolist() for k, v in r["scores"].items()},
                             "thresholds": dict(r["thresholds"])} for reader, r in own.items()},
            "own_groups": [str(g) for g in own_groups]}


def load_evaluation(metrics: Mapping[str, Any], scores: Mapping[str, Any]) -> dict:
    """An evaluation for the functions here, from its ``metrics.json`` and ``scores.json``."""
    return {"metrics": dict(metrics), "toxicity": {j: np.asarray(s, dtype=np.float64)
                                                     for j, s in scores["toxicity"].items()},
            "fixed": Readout.from_json(scores["fixed"]), "own": scores["own"], "own_groups": scores["own_groups"]}


def own_readout(ev: Mapping[str, Any], reader: str, judge: str) -> Readout:
    """An evaluation's own completions, read by ``reader`` (the base model has one reading, its
    own, which serves as both), labelled by ``judge``."""
    r = ev["own"].get(reader) or ev["own"]["policy"]
    labels = np.asarray(ev["toxicity"][judge]).ravel() >= DEFAULT_THRESHOLD
    return Readout.build(r["scores"], labels, ev["own_groups"], r["thresholds"])


def arm_summary(base: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], roles: Mapping[str, list[str]],
                target: str, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """One arm against the base model (``runs``: its seeds); ``target`` is the role it trained
    against (``train`` or ``ensemble``), whose own-completion TPR decides the Atlas outcome."""
    judges = list(base["toxicity"])
    out: dict[str, Any] = {"seeds": len(runs), "toxicity": {}, "fixed": {}, "own": {}}
    for j in judges:
        out["toxicity"][j] = paired_relative_change(base["toxicity"][j], [r["toxicity"][j] for r in runs],
                                                    n_boot=n_boot, seed=seed)
    ms = [r["metrics"] for r in runs]
    out["perplexity"] = float(np.mean([m["perplexity"] for m in ms]))
    out["perplexity_change"] = out["perplexity"] / base["metrics"]["perplexity"] - 1.0
    out["kl_per_token"] = float(np.mean([(m.get("kl_to_base") or {}).get("per_token", np.nan) for m in ms]))
    fixed = Readout.concat([r["fixed"] for r in runs])
    for role, keys in roles.items():
        out["fixed"][role] = {m: compare(base["fixed"], fixed, keys, m, n_boot=n_boot, seed=seed)
                              for m in FIXED_METRICS}
    out["per_probe"] = {k: {m: compare(base["fixed"], fixed, [k], m, n_boot=n_boot, seed=seed) for m in ("auroc", "tpr")}
                        for k in base["fixed"].scores if k in fixed.scores}
    for reader in READERS:
        out["own"][reader] = {}
        for j in judges:
            new = Readout.concat([own_readout(r, reader, j) for r in runs])
            ref = own_readout(base, "policy", j)
            out["own"][reader][j] = {role: {m: compare(ref, new, roles[role], m, n_boot=n_boot, seed=seed)
                                            for m in OWN_METRICS} for role in OWN_ROLES if role in roles}
    # the activations' part on the arm's own completions: policy reading minus frozen reading,
    # same rows (the text held fixed)
    out["hidden"] = {}
    for j in judges:
        policy = Readout.concat([own_readout(r, "policy", j) for r in runs])
        frozen = Readout.concat([own_readout(r, "frozen", j) for r in runs])
        out["hidden"][j] = {role: compare(frozen, policy, roles[role], "tpr", n_boot=n_boot, seed=seed)
                            for role in OWN_ROLES if role in roles}
    atlas_judge = judges[0]
    out["target"] = target
    out["atlas"] = atlas_outcome(out["toxicity"], out["hidden"][atlas_judge][target],
                                 out["own"]["frozen"][atlas_judge][target]["tpr"])
    out["atlas_judge"] = atlas_judge
    return out


def base_summary(base: Mapping[str, Any], roles: Mapping[str, list[str]]) -> dict:
    """The base model's own values (no change, no interval)."""
    judges = list(base["toxicity"])
    return {"toxicity": {j: base["metrics"]["toxicity"][j] for j in judges},
            "perplexity": base["metrics"]["perplexity"],
            "fixed": {role: {m: compare(base["fixed"], None, keys, m) for m in FIXED_METRICS}
                      for role, keys in roles.items()},
            "own": {j: {role: {m: compare(own_readout(base, "policy", j), None, roles[role], m) for m in OWN_METRICS}
                        for role in OWN_ROLES if role in roles} for j in judges}}


def _rate_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray], *, n_boot: int, seed: int) -> dict:
    """Toxic rate of arm A minus arm B on the same prompts (seeds averaged per prompt), paired."""
    ra = np.mean([(np.asarray(x) >= DEFAULT_THRESHOLD).mean(1) for x in a], axis=0)
    rb = np.mean([(np.asarray(x) >= DEFAULT_THRESHOLD).mean(1) for x in b], axis=0)
    res = cluster_bootstrap(len(ra), lambda c: (c * (ra - rb)).sum(-1) / c.sum(-1), n_boot=n_boot, seed=seed)
    return {"a_value": float(ra.mean()), "b_value": float(rb.mean()), "delta": res["estimate"], "ci_low": res["ci_low"],
            "ci_high": res["ci_high"], "p_value": res["p_value"]}


def default_pairs(arms: Sequence[str], control: str = "random-dpo") -> list[tuple[str, str]]:
    """The comparisons the experiment asks for, among the arms present: probe- vs classifier-
    signal DPO, probe-SFT vs plain SFT, on-policy vs offline probe-DPO, and every arm vs the
    random-label control."""
    wanted = [("probe-dpo-single", "classifier-dpo"), ("probe-dpo-ensemble", "classifier-dpo"),
              ("probe-dpo-single", "probe-dpo-ensemble"), ("probe-dpo-onpolicy", "probe-dpo-single"),
              ("probe-dpo-penalty", "probe-dpo-single"), ("probe-sft-single", "sft"),
              ("probe-sft-ensemble", "sft")]
    wanted += [(a, control) for a in arms if a != control]
    present = set(arms)
    return [p for p in dict.fromkeys(wanted) if p[0] in present and p[1] in present]


def comparisons(evals: Mapping[str, Sequence[Mapping[str, Any]]], pairs: Sequence[tuple[str, str]],
                roles: Mapping[str, list[str]], *, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Paired differences between arms: the toxic rate under each judge, and the train probe's
    TPR at its base threshold on fixed texts; p-values Holm-adjusted over every row."""
    rows = []
    n_boot = n_boot * COMPARISON_RESAMPLES_FACTOR
    for a, b in pairs:
        judges = list(evals[a][0]["toxicity"])
        for j in judges:
            d = _rate_difference([r["toxicity"][j] for r in evals[a]], [r["toxicity"][j] for r in evals[b]],
                                 n_boot=n_boot, seed=seed)
            rows.append({"a": a, "b": b, "metric": f"toxic rate ({j})", **d})
        fa = Readout.concat([r["fixed"] for r in evals[a]])
        fb = Readout.concat([r["fixed"] for r in evals[b]])
        d = compare(fb, fa, roles["train"], "tpr", n_boot=n_boot, seed=seed)
        if d:
            rows.append({"a": a, "b": b, "metric": "train probe TPR (fixed texts)", "a_value": d["value"],
                         "b_value": d["base"], "delta": d["delta"], "ci_low": d["delta_ci_low"],
                         "ci_high": d["delta_ci_high"], "p_value": d["p_value"]})
    for row, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
        row["p_holm"] = adjusted
        row["significant"] = bool(adjusted < 0.05)
    return rows
