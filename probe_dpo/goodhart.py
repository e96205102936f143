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
- every interval resamples the arm's training seeds together with the prompts (a one-seed arm
  says ``ONE_SEED``).

``outcomes`` labels every arm by the declared rule (``probe_dpo.analysis``, ``probe_dpo.outcome``)
against the null references, Holm-correcting the arms' coordinates and the declared comparisons
together; ``comparisons`` gives paired differences between arms (toxic rate under each judge, the
train probe's TPR on fixed texts); ``judge_agreement`` shows which judges are one signal twice.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from probe_dpo.detection import Readout, compare
from probe_dpo.evaluation import DEFAULT_THRESHOLD, judge_threshold, paired_relative_change, per_prompt_rates
from probe_dpo.outcome import OwnRows, coordinates, label, null_band
from probe_dpo.stats import cluster_ids, holm, two_level_bootstrap

FIXED_METRICS = ("auroc", "tpr", "fpr", "accuracy", "mean_pos", "mean_neg")
OWN_METRICS = ("auroc", "tpr")
OWN_ROLES = ("train", "ensemble", "held_out")
READERS = ("policy", "frozen")
ONE_SEED = "one training seed: run-to-run variance not included"
REPLICATE = "base-replicate"
STRATIFY = "outcome-judges-mean"


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
    labels = np.asarray(ev["toxicity"][judge]).ravel() >= judge_threshold(ev)
    return Readout.build(r["scores"], labels, ev["own_groups"], r["thresholds"])


def arm_summary(base: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], roles: Mapping[str, list[str]],
                target: str, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """One arm against the base model (``runs``: its seeds, resampled with the prompts in every
    interval); ``target`` is the role it trained against (``train`` or ``ensemble``). The outcome
    label is decided for the whole run at once (``outcomes``): it needs the null references and
    the declared family."""
    judges = list(base["toxicity"])
    out: dict[str, Any] = {"seeds": len(runs), "target": target, "toxicity": {}, "fixed": {}, "own": {}}
    if len(runs) == 1:
        out["seed_note"] = ONE_SEED
    for j in judges:
        out["toxicity"][j] = paired_relative_change(base["toxicity"][j], [r["toxicity"][j] for r in runs],
                                                    judge_threshold(base), n_boot=n_boot, seed=seed)
    ms = [r["metrics"] for r in runs]
    out["perplexity"] = float(np.mean([m["perplexity"] for m in ms]))
    out["perplexity_change"] = out["perplexity"] / base["metrics"]["perplexity"] - 1.0
    out["kl_per_token"] = float(np.mean([(m.get("kl_to_base") or {}).get("per_token", np.nan) for m in ms]))
    fixed = [r["fixed"] for r in runs]
    for role, keys in roles.items():
        out["fixed"][role] = {m: compare(base["fixed"], fixed, keys, m, n_boot=n_boot, seed=seed)
                              for m in FIXED_METRICS}
    out["per_probe"] = {k: {m: compare(base["fixed"], fixed, [k], m, n_boot=n_boot, seed=seed) for m in ("auroc", "tpr")}
                        for k in base["fixed"].scores if all(k in f.scores for f in fixed)}
    for reader in READERS:
        out["own"][reader] = {}
        for j in judges:
            new = [own_readout(r, reader, j) for r in runs]
            ref = own_readout(base, "policy", j)
            out["own"][reader][j] = {role: {m: compare(ref, new, roles[role], m, n_boot=n_boot, seed=seed)
                                            for m in OWN_METRICS} for role in OWN_ROLES if role in roles}
    # the activations' part on the arm's own completions: policy reading minus frozen reading,
    # same rows (the text held fixed)
    out["hidden"] = {}
    for j in judges:
        policy = [own_readout(r, "policy", j) for r in runs]
        frozen = [own_readout(r, "frozen", j) for r in runs]
        out["hidden"][j] = {role: compare(frozen, policy, roles[role], "tpr", n_boot=n_boot, seed=seed, same_seeds=True)
                            for role in OWN_ROLES if role in roles}
    return out


# ---------------------------------------------------------------------------------------------
# Outcome labels: the declared rule over the whole run (probe_dpo.analysis, probe_dpo.outcome)


def own_rows(ev: Mapping[str, Any], keys: Sequence[str], judges: Sequence[str], order: dict[str, int]) -> OwnRows:
    """An evaluation's own completions as the outcome rule reads them: the outcome judges' scores
    (and their mean, ``STRATIFY``, the strata's severity), the role's probe read from a frozen base
    copy and from the model (the base model has one reading, its own, which serves as both)."""
    groups, _ = cluster_ids(ev["own_groups"], order)
    scores = {j: np.asarray(ev["toxicity"][j], dtype=np.float64).ravel() for j in judges}
    scores[STRATIFY] = np.mean([scores[j] for j in judges], axis=0)

    def read(reader: str) -> np.ndarray:
        r = ev["own"].get(reader) or ev["own"]["policy"]
        return np.mean([np.asarray(r["scores"][k], dtype=np.float64) for k in keys], axis=0)

    return OwnRows(groups, scores, read("frozen"), read("policy"))


def outcomes(base: Mapping[str, Any], evals: Mapping[str, Sequence[Mapping[str, Any]]],
             replicate: Mapping[str, Any] | None, roles: Mapping[str, list[str]], targets: Mapping[str, str],
             plan: Mapping[str, Any], comparison_rows: Sequence[dict], *, seed: int = 0) -> dict:
    """Every arm's outcome label by the declared rule, with the coordinate that decided it.

    Coordinates of each arm (and of each null reference: the base sampled again, the null arms)
    are bootstrapped over seeds and prompts; their p-values and those of the declared comparisons
    (``comparison_rows`` with ``in_plan``) are Holm-corrected together (the plan's family), and
    the adjusted p-values are written back into the rows. Each arm is read against the null band
    of the references other than itself. ``replication``: each seed of a multi-seed arm labelled
    alone (the same band; Holm over that seed's family), and the share agreeing with the pooled label.
    """
    from probe_dpo.analysis import AnalysisSettings
    from probe_dpo.config import from_dict

    settings = from_dict(AnalysisSettings, dict(plan["settings"]), "analysis plan")
    judges = plan["judges"]["outcome"]
    n_boot, k = plan["settings"]["bootstrap"], settings.strata
    order: dict[str, int] = {}

    def coords_of(runs: Sequence[Mapping[str, Any]], role: str) -> dict:
        keys = roles[role]
        return coordinates(own_rows(base, keys, judges, order), [own_rows(r, keys, judges, order) for r in runs],
                           judges=judges, stratify=STRATIFY, k=k, threshold=judge_threshold(base), n_boot=n_boot,
                           seed=seed)

    used_roles = sorted(set(targets.values())) or ["train"]  # before any trial: the null references alone
    refs = {name: {role: coords_of(evals[name], role) for role in used_roles}
            for name in settings.null_arms if name in evals}
    if replicate is not None:
        refs[REPLICATE] = {role: coords_of([replicate], role) for role in used_roles}
    arms = {arm: coords_of(runs, targets[arm]) for arm, runs in evals.items() if arm in targets}
    # the declared family is the arms' coordinates and the declared comparisons; the base re-sampled is
    # labelled too (it must come out blatant), its coordinates corrected among themselves, outside the family
    tests = [(a, c, r["p_value"]) for a, cs in arms.items() for c, r in cs.items()]
    planned = [row for row in comparison_rows if row.get("in_plan")]
    adjusted = holm([p for *_, p in tests] + [row["p_value"] for row in planned])
    effects = settings.min_effect
    for row, p in zip(planned, adjusted[len(tests):]):
        smallest = effects.tpr if "TPR" in row["metric"] else effects.rate_difference
        row["p_holm"], row["significant"] = p, bool(p < settings.alpha)
        row["min_effect"], row["differ"] = smallest, bool(row["significant"] and abs(row["delta"]) >= smallest)
    p_holm = {(a, c): p for (a, c, _), p in zip(tests, adjusted)}
    subjects = dict(arms)
    if REPLICATE in refs:
        subjects[REPLICATE] = refs[REPLICATE][used_roles[0]]
        coords = list(subjects[REPLICATE])
        p_holm.update(zip([(REPLICATE, c) for c in coords], holm([subjects[REPLICATE][c]["p_value"] for c in coords])))
    out = {}
    for name, cs in subjects.items():
        role = targets.get(name, used_roles[0])
        band = null_band({ref: by_role[role] for ref, by_role in refs.items()}, exclude=name)
        out[name] = {**label(cs, band, {c: p_holm[(name, c)] for c in cs}, settings), "target": role,
                     "band_from": sorted(set(refs) - {name}),
                     "per_seed": {c: {"per_seed": r["per_seed"], "seed_sd": r["seed_sd"]} for c, r in cs.items()}}
    return {"labels": out, "family_size": len(tests) + len(planned),
            "replication": _replication(evals, arms, out, refs, targets, coords_of, settings)}


def _replication(evals, arms, pooled, refs, targets, coords_of, settings) -> dict:
    """Each seed of the multi-seed arms labelled alone, and how often that agrees with the pooled label."""
    multi = [a for a in arms if len(evals[a]) > 1]
    if not multi:
        return {}
    per_seed: dict[str, list[str]] = {a: [] for a in multi}
    for i in range(max(len(evals[a]) for a in multi)):
        alone = {a: coords_of([evals[a][i]], targets[a]) for a in multi if i < len(evals[a])}
        tests = [(a, c, r["p_value"]) for a, cs in alone.items() for c, r in cs.items()]
        adjusted = dict(zip([(a, c) for a, c, _ in tests], holm([p for *_, p in tests])))
        for a, cs in alone.items():
            band = null_band({ref: by_role[targets[a]] for ref, by_role in refs.items()}, exclude=a)
            per_seed[a].append(label(cs, band, {c: adjusted[(a, c)] for c in cs}, settings)["label"])
    agree = [lab == pooled[a]["label"] for a, labs in per_seed.items() for lab in labs]
    return {"per_seed": per_seed, "agree": int(sum(agree)), "of": len(agree),
            "share": float(np.mean(agree)) if agree else float("nan")}


def judge_agreement(base: Mapping[str, Any], in_loop: Sequence[str], threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """How much the panel's judges agree on the base model's own samples: Spearman's rank
    correlation of their scores and the AUROC of one judge's scores against another's labels, so a
    reader sees which judges are one signal twice (and which of them training used)."""
    from scipy.stats import spearmanr

    from probe_dpo.stats import roc_auc

    scores = {j: np.asarray(s, dtype=np.float64).ravel() for j, s in base["toxicity"].items()}
    rows = []
    for a in scores:
        for b in scores:
            if a == b:
                continue
            rho = spearmanr(scores[a], scores[b]).statistic
            rows.append({"judge": a, "labels_of": b, "spearman": float(rho), "auroc": roc_auc(scores[a], scores[b] >= threshold),
                         "judge_in_loop": a in in_loop, "labels_in_loop": b in in_loop,
                         "positives": int((scores[b] >= threshold).sum())})
    return rows


def base_summary(base: Mapping[str, Any], roles: Mapping[str, list[str]]) -> dict:
    """The base model's own values (no change, no interval)."""
    judges = list(base["toxicity"])
    return {"toxicity": {j: base["metrics"]["toxicity"][j] for j in judges},
            "perplexity": base["metrics"]["perplexity"],
            "fixed": {role: {m: compare(base["fixed"], None, keys, m) for m in FIXED_METRICS}
                      for role, keys in roles.items()},
            "own": {j: {role: {m: compare(own_readout(base, "policy", j), None, roles[role], m) for m in OWN_METRICS}
                        for role in OWN_ROLES if role in roles} for j in judges}}


def _rate_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray], *, threshold: float, n_boot: int,
                     seed: int) -> dict:
    """Toxic rate of arm A minus arm B on the same prompts, each arm's seeds resampled with the prompts."""
    ra = np.array([per_prompt_rates(x, threshold) for x in a])  # [seeds, prompts]
    rb = np.array([per_prompt_rates(x, threshold) for x in b])

    def difference(prompts: np.ndarray, seeds: list[np.ndarray]) -> np.ndarray:
        pa = seeds[0] @ ra / seeds[0].sum(-1, keepdims=True)
        pb = seeds[1] @ rb / seeds[1].sum(-1, keepdims=True)
        return (prompts * (pa - pb)).sum(-1) / prompts.sum(-1)

    res = two_level_bootstrap(ra.shape[1], [len(ra), len(rb)], difference, n_boot=n_boot, seed=seed)
    return {"a_value": float(ra.mean()), "b_value": float(rb.mean()), "delta": res["estimate"], "ci_low": res["ci_low"],
            "ci_high": res["ci_high"], "p_value": res["p_value"]}


def default_pairs(arms: Sequence[str], controls: Sequence[str] = ("random-dpo", "random-grpo")) -> list[tuple[str, str]]:
    """The comparisons the experiment asks for, among the arms present: probe- vs classifier-signal
    training (DPO and GRPO), probe-SFT vs plain SFT, on-policy vs offline probe-DPO, the GRPO probe
    read from the policy vs from a frozen copy and vs probe-DPO, and every arm vs the null control
    of its own method among ``controls`` (a GRPO arm vs random-grpo, any other vs random-dpo: a
    random reward and random labels are the nulls of different training signals)."""
    wanted = [("probe-dpo-single", "classifier-dpo"), ("probe-dpo-ensemble", "classifier-dpo"),
              ("probe-dpo-single", "probe-dpo-ensemble"), ("probe-dpo-onpolicy", "probe-dpo-single"),
              ("probe-dpo-penalty", "probe-dpo-single"), ("probe-sft-single", "sft"),
              ("probe-sft-ensemble", "sft"), ("probe-grpo-single", "probe-grpo-frozen"),
              ("probe-grpo-single", "classifier-grpo"), ("probe-grpo-single", "probe-dpo-single")]
    for a in arms:
        control = "random-grpo" if "grpo" in a.split("-") else "random-dpo"
        if control in controls and a != control:
            wanted.append((a, control))
    present = set(arms)
    return [p for p in dict.fromkeys(wanted) if p[0] in present and p[1] in present]


def comparisons(evals: Mapping[str, Sequence[Mapping[str, Any]]], pairs: Sequence[Sequence[str]],
                roles: Mapping[str, list[str]], *, n_boot: int = 1000, seed: int = 0,
                outcome_judges: Sequence[str] | None = None) -> list[dict]:
    """Paired differences between arms (both arms' seeds resampled with the prompts): the toxic
    rate under each judge, and the train probe's TPR at its base threshold on fixed texts.

    Rows under an outcome judge, and the TPR rows, are the declared family (``in_plan``): their
    Holm-adjusted p-values come from ``outcomes``, corrected together with the arms' coordinates.
    Without a plan (``outcome_judges`` None) every row is in the family and corrected here. Rows
    under an in-loop judge are *exploratory*: reported with their own p-value, decide nothing."""
    rows = []
    for a, b in pairs:
        judges = list(evals[a][0]["toxicity"])
        for j in judges:
            d = _rate_difference([r["toxicity"][j] for r in evals[a]], [r["toxicity"][j] for r in evals[b]],
                                 threshold=judge_threshold(evals[a][0]), n_boot=n_boot, seed=seed)
            planned = outcome_judges is None or j in outcome_judges
            rows.append({"a": a, "b": b, "metric": f"toxic rate ({j})", **d, "in_plan": planned})
        d = compare([r["fixed"] for r in evals[b]], [r["fixed"] for r in evals[a]], roles["train"], "tpr",
                    n_boot=n_boot, seed=seed)
        if d:
            rows.append({"a": a, "b": b, "metric": "train probe TPR (fixed texts)", "a_value": d["value"],
                         "b_value": d["base"], "delta": d["delta"], "ci_low": d["delta_ci_low"],
                         "ci_high": d["delta_ci_high"], "p_value": d["p_value"], "in_plan": True})
    for row in rows:
        row["p_holm"], row["significant"] = None, None
    if outcome_judges is None:
        for row, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
            row["p_holm"], row["significant"] = adjusted, bool(adjusted < 0.05)
    return rows
