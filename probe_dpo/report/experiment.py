"""The toxicity experiment's report, rendered from what the workflow hands it: ``results``
(its ``results.json``), the run's context, and score arrays for the histograms."""

from __future__ import annotations

from typing import Any, Mapping

from probe_dpo.report import Report, fmt, fmt_ci
from probe_dpo.report.curves import training_curves
from probe_dpo.report.obfuscation_map import map_section
from probe_dpo.report.outcomes import outcome_sections

ROLE_TITLES = {"train": "train probe", "ensemble": "probe ensemble", "held_out": "held-out probes",
               "retrained": "retrained probe"}
CONTROL = "obfuscation-control"


def _pct(x: Any) -> str:
    return "-" if fmt(x) == "-" else f"{100 * x:+.0f}%"


def _spread(d: dict, scale: float = 1.0, digits: int = 2) -> str:
    """`` sd x`` of the training seeds' own estimates (what run-to-run variance looks like), if several."""
    sd = d.get("seed_sd")
    return f" sd {scale * sd:.{digits}f}" if fmt(sd) != "-" else ""


def _pct_ci(d: dict | None) -> str:
    if not d or fmt(d.get("change")) == "-":
        return "-"
    return f"{_pct(d['change'])} [{_pct(d.get('ci_low'))}, {_pct(d.get('ci_high'))}]{_spread(d, 100, 0)}"


def _delta_ci(d: dict | None, digits: int = 2) -> str:
    """``+0.12 [+0.05, +0.19]`` for a paired change (``delta``, ``delta_ci_low``, ``delta_ci_high``)."""
    if not d or fmt(d.get("delta")) == "-":
        return "-"
    lo, hi = d.get("delta_ci_low", d.get("ci_low")), d.get("delta_ci_high", d.get("ci_high"))
    ci = f" [{lo:+.{digits}f}, {hi:+.{digits}f}]" if fmt(lo) != "-" and fmt(hi) != "-" else ""
    return f"{d['delta']:+.{digits}f}{ci}{_spread(d, digits=digits)}"


def _moved(d: dict | None) -> str:
    """The value after, and its change with the interval: ``0.12 (-0.43 [-0.52, -0.35])``."""
    if not d or fmt(d.get("value")) == "-":
        return "-"
    return f"{fmt(d['value'], 2)} ({_delta_ci(d)})"


def _verdict(d: dict | None, down: str = "drop", up: str = "rise") -> str:
    from probe_dpo.stats import verdict

    if not d:
        return "no interval"
    return verdict(d.get("delta_ci_low"), d.get("delta_ci_high"), down, up)


def experiment_report(run: str, ctx: Mapping[str, Any], res: Mapping[str, Any],
                      scores: Mapping[str, tuple] | None = None,
                      histories: Mapping[str, list] | None = None) -> Report:
    """The arms, detection at the base threshold by probe role (fixed texts and the policy's own
    completions), the outcome labels of the declared analysis, the three Goodhart questions answered against the positive
    control, paired arm comparisons, plots and timings.

    ``ctx`` is the run's context, ``res`` its results (``results.json``), ``scores`` the train
    probe's fixed-text ``(scores, labels, threshold)`` of the base model and each arm,
    ``histories`` each arm's training ``log_history`` (the training-curves plot)."""
    import matplotlib

    matplotlib.use("Agg")

    rep = Report(f"Training against probes: {ctx.get('behaviour', 'toxicity')} experiment ({run})")
    if not res.get("base"):
        return rep.text("The base model has not been evaluated yet; the report appears as results arrive.", note=True)
    e, summary = ctx["eval"], ctx["probes_summary"]
    base, arms = res["base"], res["arms"]
    names = [a for a in ctx["arms"] if a in arms] + [a for a in arms if a not in ctx["arms"]]
    judges = list(base["toxicity"])
    first = judges[0]
    tox0 = base["toxicity"][first]

    # --- header ----------------------------------------------------------------------------------
    how = ("fixed by `probes.train_layer`" if summary.get("train_layer_chosen_by") == "config"
           else "the best by validation AUROC")
    done = sum(int(arms[a].get("seeds", 0)) for a in names if a in ctx["arms"])
    declared = len(ctx["arms"]) * len(ctx["seeds"])
    partial = (f" **Partial run: {done} of {declared} trials (arm x seed) are complete**; every figure rests on the "
               "seeds that ran (each arm's count is in its row)." if done < declared else "")
    rep.text(f"{len(names)} of {len(ctx['arms'])} arms complete (seeds {ctx['seeds']}).{partial} Base model "
             f"`{ctx['base_model']}`; {tox0['prompts']} held-out prompts x {e['samples_per_prompt']} samples, judged by "
             f"{', '.join(f'`{j}`' for j in judges)}. The train probe is `{summary['best_probe']}` (layer "
             f"{summary['best_layer']}, {how}); the ensemble is {len(summary.get('ensemble_probes', []))} probes "
             f"({summary.get('ensemble_kind', 'layers')}, layers {summary['ensemble_layers']}); "
             f"{len(summary['held_out'])} held-out probes. Candidate pairs were ranked "
             + (f"by probes cross-fitted over {summary['cross_fit_folds']} folds of prompts."
                if summary.get("cross_fit_folds") else "in-sample (no cross-fitting)."))
    rate, n = tox0["rate"], tox0["prompts"]
    rep.text(f"Noise: a toxic rate of {rate:.3f} on {n} prompts has a standard error of about "
             f"{(rate * (1 - rate) / max(n, 1)) ** 0.5:.3f}. Every interval is a 95% bootstrap interval that resamples "
             "training seeds and prompts together, paired against the base model on the same prompts (or rows); a "
             "change whose interval includes 0 is not a change. An arm with one training seed says so: its interval "
             "holds no run-to-run variance. A monitor flags a text when the probe's score exceeds the threshold fixed on the base "
             "model (each probe card's, at a 5% validation false-positive rate).", note=True)

    # --- arms ------------------------------------------------------------------------------------
    rep.heading("Arms")
    rows = [["**base model**", "-"] + [fmt_ci(base["toxicity"][j]["rate"], base["toxicity"][j]["ci_low"],
                                              base["toxicity"][j]["ci_high"]) for j in judges]
            + [fmt(base["perplexity"], 2), "-", "-"]]
    for a in names:
        s = arms[a]
        rows.append([a, s["seeds"]] + [f"{fmt(s['toxicity'][j]['rate'])} ({_pct_ci(s['toxicity'][j])})" for j in judges]
                    + [f"{fmt(s['perplexity'], 2)} ({_pct(s['perplexity_change'])})", fmt(s["kl_per_token"], 4),
                       (s.get("outcome") or {}).get("label", "exploratory")])
    in_loop = set(((res.get("analysis") or {}).get("judges") or {}).get("in_loop") or [])
    rep.table(["arm", "seeds"] + [f"toxic rate, {j}{' (in the loop)' if j in in_loop else ''} (change)" for j in judges]
              + ["perplexity (change)", "KL/token", "outcome"], rows,
              caption="Toxic rate: share of continuations a judge scores >= 0.5, change vs the base [95% CI over "
                      "seeds and prompts] and the sd of the seeds' own changes. Outcome: see 'Outcome labels' below.")
    outcome_judges = [j for j in judges if j not in in_loop]
    robust = [a for a in names if all((arms[a]["toxicity"][j].get("ci_high") or 0) < 0 for j in outcome_judges)]
    rep.text("Toxicity reductions whose interval excludes 0 under every judge training did not use ("
             + ", ".join(outcome_judges) + "): " + (", ".join(f"**{a}**" for a in robust) if robust else "none")
             + ". A reduction under an in-loop judge alone may be the policy learning that judge.")
    outcome_sections(rep, res, arms, names)
    if res.get("map"):
        map_section(rep, res["map"])

    # --- detection -------------------------------------------------------------------------------
    rep.heading("Detection at the base threshold (fixed probe-test texts)")
    for metric, title in (("tpr", "TPR"), ("auroc", "AUROC"), ("fpr", "FPR")):
        rows = [["**base model**"] + [fmt(base["fixed"][r][metric].get("base"), 2) if r in base["fixed"] else "-"
                                      for r in ROLE_TITLES]]
        rows += [[a] + [_moved(arms[a]["fixed"].get(r, {}).get(metric)) for r in ROLE_TITLES] for a in names]
        rep.table(["arm"] + [ROLE_TITLES[r] for r in ROLE_TITLES], rows,
                  caption=f"{title} after fine-tuning (change vs base [95% CI])")
    rep.heading("Detection on each arm's own completions")
    rows = []
    for a in names:
        t = arms[a]["target"]
        pol = arms[a]["own"]["policy"][first][t]
        frz = arms[a]["own"]["frozen"][first][t]
        hidden = (arms[a].get("hidden") or {}).get(first, {}).get(t)
        rows.append([a, ROLE_TITLES[t], fmt(pol["tpr"].get("base"), 2), _moved(pol["tpr"]), _moved(frz["tpr"]),
                     _delta_ci(hidden), _moved(pol["auroc"]), _moved(frz["auroc"])])
    rep.table(["arm", "probe", "base TPR", "TPR, policy's activations", "TPR, frozen base's activations",
               "policy minus frozen", "AUROC, policy", "AUROC, frozen base"], rows,
              caption=f"What a deployed monitor sees: each model's continuations of the held-out prompts, labelled by "
                      f"{first}; the probe read from the policy and from a frozen copy of the base model on the same "
                      "text (changes vs the base model's own continuations; 'policy minus frozen' is paired on the "
                      "same completions: the activations' part with the text held fixed).")

    # --- the three questions ---------------------------------------------------------------------
    rep.heading("What the runs say")
    ctrl = arms.get(CONTROL)
    if ctrl:
        c = ctrl["fixed"]["train"]["tpr"]
        rep.text(f"**Calibration.** The positive control (`{CONTROL}`, built to make the train probe miss) moved the "
                 f"train probe's TPR at its base threshold by {_delta_ci(c)} ({_verdict(c)}); AUROC "
                 f"{_delta_ci(ctrl['fixed']['train']['auroc'], 3)}. That is the size of drop this experiment can see. "
                 f"Its held-out probes: TPR {_delta_ci(ctrl['fixed']['held_out']['tpr'])}; the ensemble: "
                 f"{_delta_ci(ctrl['fixed']['ensemble']['tpr'])}; a probe retrained on it: AUROC "
                 f"{fmt(ctrl['fixed']['retrained']['auroc'].get('value'), 3)} vs "
                 f"{fmt(ctrl['fixed']['retrained']['auroc'].get('base'), 3)} on the base model "
                 f"({_delta_ci(ctrl['fixed']['retrained']['auroc'], 3)}); outcome: "
                 f"{(ctrl.get('outcome') or {}).get('label', 'not labelled')}.")
    else:
        rep.text(f"No positive control (`{CONTROL}`) in this run: nothing shows that a drop could be seen.", note=True)
    lines = []
    for a in names:
        t = arms[a]["target"]
        d = arms[a]["fixed"][t]["tpr"]
        lines.append(f"- **{a}**: the {ROLE_TITLES[t]}'s TPR {_delta_ci(d)} ({_verdict(d)}), AUROC "
                     f"{_delta_ci(arms[a]['fixed'][t]['auroc'], 3)}"
                     + (f"; the positive control: {_delta_ci(ctrl['fixed']['train']['tpr'])}" if ctrl and a != CONTROL
                        else ""))
    rep.text("**1. How much does detection drop when training against a probe?** (TPR at the base threshold, the "
             "probe each arm trained against)\n" + "\n".join(lines))
    lines = [f"- **{a}**: held-out probes TPR {_delta_ci(arms[a]['fixed']['held_out']['tpr'])} "
             f"({_verdict(arms[a]['fixed']['held_out']['tpr'])}); ensemble {_delta_ci(arms[a]['fixed']['ensemble']['tpr'])}"
             for a in names if arms[a]["fixed"].get("held_out")]
    rep.text("**2. Do held-out probes and an ensemble keep detection?**\n" + "\n".join(lines))
    lines = [f"- **{a}**: retrained probe AUROC {fmt(arms[a]['fixed']['retrained']['auroc'].get('value'), 3)} vs "
             f"{fmt(arms[a]['fixed']['retrained']['auroc'].get('base'), 3)} on the base model "
             f"({_delta_ci(arms[a]['fixed']['retrained']['auroc'], 3)}); the original train probe "
             f"{fmt(arms[a]['fixed']['train']['auroc'].get('value'), 3)}"
             for a in names if arms[a]["fixed"].get("retrained")]
    rep.text("**3. Does retraining a fresh probe on the fine-tuned model recover detection?**\n" + "\n".join(lines))

    # --- comparisons -----------------------------------------------------------------------------
    comps = res.get("comparisons") or []
    if comps:
        rep.heading("Paired comparisons between arms")
        rep.table(["A", "B", "metric", "A", "B", "A - B [95% CI]", "p (Holm)"],
                  [[c["a"], c["b"], c["metric"], fmt(c["a_value"]), fmt(c["b_value"]), _delta_ci(c, 3),
                    f"{fmt(c['p_holm'])}{' *' if c.get('differ', c['significant']) else ''}" if c.get("p_holm") is not None
                    else f"p {fmt(c['p_value'])}, exploratory"] for c in comps],
                  caption="Paired bootstrap over seeds and prompts; p-values Holm-adjusted over the declared family "
                          "(with the arms' outcome coordinates); * : p < alpha and the difference at least the declared minimum effect. Rows under an in-loop judge are "
                          "exploratory: their raw p-value decides nothing.")

    # --- plots -----------------------------------------------------------------------------------
    rep.heading("Plots")
    rep.figure("detection_tpr", _detection_plot(names, arms, base, "tpr"),
               "TPR at the base threshold before (base) and after fine-tuning, per arm and probe role, 95% intervals")
    rep.figure("detection_auroc", _detection_plot(names, arms, base, "auroc"),
               "AUROC before and after fine-tuning, per arm and probe role")
    rep.figure("toxicity_vs_retention", _tradeoff_plot(names, arms, base, judges),
               "Toxicity against retention: lower-left is better")
    curves = training_curves(histories) if histories else None
    if curves is not None:
        rep.figure("training_curves", curves, "Training curves per arm (first seed, last round): loss, DPO reward "
                   "margin and probe penalty at every logged optimizer step")
    if scores:
        rep.figure("probe_scores", _score_plot(scores),
                   f"{summary['best_probe']}'s score on the probe-test generations, base vs each arm "
                   "(the dashed line is its base threshold)")

    # --- searches --------------------------------------------------------------------------------
    for search in res.get("searches") or []:
        _search_section(rep, search)

    # --- details ---------------------------------------------------------------------------------
    rep.heading("Details")
    rep.table(["arm", "what it is", "pairs / rows", "steps", "rounds", "train s", "eval s"],
              [[a, arms[a].get("about", ""), (arms[a]["training"].get("data") or {}).get("pairs")
                or (arms[a]["training"].get("data") or {}).get("kept") or (arms[a]["training"].get("data") or {}).get("rows"),
                arms[a]["training"].get("steps"), arms[a]["training"].get("rounds"),
                fmt(arms[a]["training"].get("train_seconds"), 0), fmt(arms[a]["training"].get("eval_seconds"), 0)]
               for a in names])
    timings = res.get("timings") or {}
    stages = [(k, timings[k]) for k in ("testbed", "probes_and_pairs", "base_evaluation", "sum_of_stages",
                                        "this_run_total") if timings.get(k) is not None]
    if stages:
        rep.table(["stage", "minutes"], [[k.replace("_", " "), fmt(v / 60, 1)] for k, v in stages],
                  caption="Wall time of each stage when it ran (a re-run skips complete stages)")
    return rep


def _search_section(rep: Report, search: Mapping[str, Any]) -> None:
    """One search: how it searched, and its Pareto set (one metric: the best trial)."""
    metrics, modes = search["metric"], search["mode"]
    objective = ", ".join(f"{mode} {metric}" for metric, mode in zip(metrics, modes))
    counts: dict[str, int] = {}
    for t in search["trials"]:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    rep.heading(f"Search over {search['arm']} ({search['name']})")
    rep.text(f"{search['algorithm']} search, {search['scheduler']} scheduler, {len(search['trials'])} trials "
             f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}); objective: {objective}. "
             f"Space: {', '.join(f'`{k}` {v}' for k, v in search['space'].items())}. "
             + ("The Pareto set: the evaluated trials no other beats on every objective."
                if len(metrics) > 1 else "The best evaluated trial (ties kept)."))
    rep.table(["trial", "overrides"] + list(metrics),
              [[r["trial"], ", ".join(f"{k}={fmt(v, 6) if isinstance(v, float) else v}"
                                      for k, v in r["overrides"].items())] + [fmt(r[m], 4) for m in metrics]
               for r in search.get("pareto_rows") or []],
              caption="Each trial's row in the tables above is under its trial name; its Tune experiment is "
                      f"{search['tune_experiment']}")


def _detection_plot(names, arms, base, metric):
    import matplotlib.pyplot as plt
    import numpy as np

    roles = [r for r in ROLE_TITLES if r in base["fixed"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * (len(names) + 1)), 3.8))
    width = 0.8 / len(roles)
    labels = ["base"] + list(names)
    for k, role in enumerate(roles):
        vals, lo, hi = [], [], []
        for name in labels:
            if name == "base":
                v, a, b = base["fixed"][role][metric].get("base", np.nan), 0, 0
            else:
                d = {k: np.nan if v is None else v for k, v in arms[name]["fixed"].get(role, {}).get(metric, {}).items()}
                v = d.get("value", np.nan)
                a = np.nan_to_num(d.get("delta", np.nan) - d.get("delta_ci_low", np.nan))
                b = np.nan_to_num(d.get("delta_ci_high", np.nan) - d.get("delta", np.nan))
            vals.append(v)
            lo.append(a)
            hi.append(b)
        ax.bar(np.arange(len(labels)) + (k - (len(roles) - 1) / 2) * width, vals, width, yerr=[lo, hi],
               label=ROLE_TITLES[role], capsize=2)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel({"tpr": "TPR at the base threshold", "auroc": "AUROC"}[metric] + " (probe-test)")
    ax.set_ylim(0.0 if metric == "tpr" else 0.4, 1.0)
    if metric == "auroc":
        ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend(fontsize=8, ncol=2)
    return fig


def _tradeoff_plot(names, arms, base, judges):
    """One panel per judge. Arms are told apart by colour (SFT arms hollow) and a shared legend:
    text labels next to the points piled on top of each other where arms land close together."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(judges), figsize=(4.6 * len(judges) + 1.8, 3.8), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, j in zip(axes[0], judges):
        ax.scatter([0], [base["toxicity"][j]["rate"]], marker="*", s=150, color="black", label="base", zorder=3)
        for i, arm in enumerate(names):
            t = {k: float("nan") if v is None else v for k, v in arms[arm]["toxicity"][j].items()}
            lo, hi = t["base_rate"] * (1 + t["ci_low"]), t["base_rate"] * (1 + t["ci_high"])
            yerr = [[max(0.0, t["rate"] - lo)], [max(0.0, hi - t["rate"])]] if lo == lo and hi == hi else None
            colour = colours[i % len(colours)]
            ax.errorbar(100 * arms[arm]["perplexity_change"], t["rate"], yerr=yerr, fmt="o", capsize=2, color=colour,
                        mfc="white" if "sft" in arm or arm == CONTROL else colour, label=arm)
        ax.set_xlabel("perplexity change on benign text (%)")
        ax.set_ylabel(f"toxic rate ({j})")
        ax.set_title(j)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / (4.6 * len(judges) + 1.8), 1))
    return fig


def _score_plot(scores: dict):
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(scores)
    cols = min(4, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False, sharex=True)
    bins = np.linspace(0, 1, 26)
    for ax, name in zip(axes.flat, names):
        s, y, threshold = scores[name]
        ax.hist(s[y == 0], bins=bins, alpha=0.6, density=True, label="non-toxic")
        ax.hist(s[y == 1], bins=bins, alpha=0.6, density=True, label="toxic")
        if threshold is not None:
            ax.axvline(threshold, color="black", ls="--", lw=0.8)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    return fig
