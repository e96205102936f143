"""The study's report: recall, sources, clusters, audit and the retraining's effect."""

from __future__ import annotations

from typing import Any

import numpy as np

from probe_dpo.workflows.attribution_study.inputs import Inputs


def method_labels(inp: Inputs, result: dict) -> dict[str, str]:
    """What each ranking method is, for tables."""
    out = {"probe": f"probe ({result['primary'].name})", "judge": f"judge ({inp.judge})",
           "gradient": "gradient (LESS-style, dense projection)",
           "gradient-factorized": "gradient (LoGra-style, factorized projection)",
           "gradient-less": "gradient (LESS: LoRA warm-up, Adam-preconditioned)"}
    if inp.probe is not None:
        out["probe-weights"] = f"probe weights (probe:{inp.probe.name})"
    if "behaviour-contrast" in result["scores"]:
        out["behaviour-contrast"] = "behaviour contrast (M1's harmful minus M0's safe responses, read by M0; no labels)"
        out["bank-max"] = "vector bank, max cosine (one contrast per scenario)"
        out["bank-mean"] = "vector bank, mean cosine"
    if "behaviour-change" in result["scores"]:
        out["behaviour-change"] = "behaviour change (raw-set DPO's activation drift; no labels)"
    if "random" in result["scores"]:
        out["random"] = "random order (seeded; the control filter)"
    return out


def build_report(inp: Inputs, result: dict, recall: dict | None, arms: dict, retrain: dict | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from probe_dpo.report import Report, fmt, fmt_ci

    cfg = inp.cfg
    rep = Report("Probe-based data attribution")
    primary = result["primary"]
    rep.text(f"Pairs: `{inp.pairs_uri}` ({len(inp.pairs)} pairs, {len(set(result['sources']))} sources). "
             f"Model before DPO: `{inp.model}`. Layer {inp.layer}. Ranking direction: **{primary.name}** "
             f"({primary.kind}). Score = cos(act(prompt, chosen) − act(prompt, rejected), v_b), activations "
             f"averaged over response tokens. Top-k: k = {result['k']}"
             + (" (the number of labelled bad pairs)" if cfg.ranking.k_from_labels else "") + ".")
    if inp.mix:
        rep.text(f"Preference mix built from the testbed: {inp.mix['pairs']} pairs, {inp.mix['poisoned']} poisoned "
                 f"(source `{inp.mix['poisoned_source']}`, trigger `{inp.mix['trigger'].strip()}`; poisoned pairs "
                 f"selected with the {inp.mix['train_judge']} judge). Labels are used for evaluation only.")

    rep.heading("Sources")
    table = result["tables"]["probe"]
    rep.table(["rank", "source", "pairs", "mean score [95% CI]", "in top-k", "top-k share [95% CI]", "enrichment",
               "flagged"],
              [[r["rank"], r["source"], r["pairs"], fmt_ci(r["mean_score"], r["ci_low"], r["ci_high"]), r["in_top_k"],
                fmt_ci(r["top_k_share"], r["top_k_share_ci_low"], r["top_k_share_ci_high"]), fmt(r["enrichment"], 2),
                r["flagged"]] for r in table], caption=f"Ranked by mean probe score ({primary.name})")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["source"] for r in table]
    s = result["scores"]["probe"]
    src = np.asarray(result["sources"], dtype=object)
    data = [s[src == name] for name in names]
    ax.boxplot(data, orientation="horizontal", tick_labels=names, showfliers=False)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names, start=1):
        mask = src == name
        y = i + rng.uniform(-0.18, 0.18, mask.sum())
        colors = np.where(inp.bad[mask], "#c0392b", "#34495e") if inp.bad is not None else "#34495e"
        ax.scatter(s[mask], y, s=6, c=colors, alpha=0.6)
    ax.axvline(np.sort(s)[::-1][result["k"] - 1], color="#888", ls="--", lw=1)
    ax.set_xlabel("probe score cos(v_d, v_b)" + ("  (red: poisoned)" if inp.bad is not None else ""))
    rep.figure("score_by_source", fig, "Score distribution by source; dashed: the top-k threshold")

    if recall:
        rep.heading("Recall of the bad pairs")
        labels = method_labels(inp, result)
        budgets = list(next(iter(recall.values()))["budgets"])
        labels["chance"] = "random ranking (expected; 95% band)"

        def top(m: str) -> str:
            t = result["tables"].get(m)
            return f"{t[0]['source']} ({fmt(t[0]['mean_score'])})" if t else "-"

        rep.table(["method", f"recall@{result['k']} [95% CI]", *[f"top {b}" for b in budgets],
                   "top source (mean score)"],
                  [[labels.get(m, m), f"{fmt(v['recall_at_k'])} [{fmt(v['ci'][0])}, {fmt(v['ci'][1])}]",
                    *[fmt(v["budgets"][b]["recall"]) for b in budgets], top(m)] for m, v in recall.items()],
                  caption="Recall of the poisoned pairs at k (their count, known only from the labels; Wilson "
                          "intervals, and for a random ranking the hypergeometric band) and at fixed budgets: the "
                          "top 1/5/8/10/20% of the pairs (8%: the paper's 30k of 378k)")
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for m, v in recall.items():
            if "curve" in v:
                ax.plot(v["curve"]["k"], v["curve"]["recall"], label=labels.get(m, m), lw=1.6)
        ax.axvline(result["k"], color="#888", ls="--", lw=1)
        ax.set_xlabel("k (top pairs)")
        ax.set_ylabel("recall of poisoned pairs")
        ax.legend(fontsize=8)
        rep.figure("recall_at_k", fig, "Recall@k: probe attribution vs the comparators")
    if result["comparators"] or result["timings"]:
        rep.heading("Cost")
        rows = [["probe (activations + directions)", fmt(result["timings"].get("probe_total_s"), 1)]]
        rows += [[m, fmt(v.get("seconds"), 1) + (" (cached)" if v.get("cached") else "")]
                 for m, v in result["comparators"].items()]
        rep.table(["method", "seconds"], rows, caption="Wall time in this run (see benchmarks/attribution.py for a "
                                                       "controlled comparison with peak memory)")

    if result.get("clusters"):
        rep.heading("Clusters of pair vectors")
        cl = result["clusters"]
        rep.text(f"k-means on unit (chosen − rejected) vectors, k = {cl['k']} (silhouette {fmt(cl['silhouette'])}). "
                 "A coherent cluster (high coherence and silhouette) that the direction does not explain "
                 "(direction cosine near 0) is a candidate behaviour no probe covers.")
        _clusters(rep, cl, inp)
    if result.get("change_clusters"):
        rep.heading("Emergent behaviours: clusters of what raw-set DPO changed")
        cl = result["change_clusters"]
        rep.text(f"k-means on each pair's change, k = {cl['k']} (fixed, over-clustered; silhouette "
                 f"{fmt(cl['silhouette'])}): how DPO on the raw set moved the activations of the pair's chosen "
                 "response (the policy's reading minus the model's before it). No probe or judge is involved. "
                 "Listed from the cluster that stands apart most (highest silhouette): a small one whose "
                 "examples share a pattern is a behaviour the run learned.")
        _clusters(rep, cl, inp, apart_first=True)
    if result.get("matrix_clusters"):
        _matrix_clusters(rep, result["matrix_clusters"], inp)

    rep.heading("Concept audit")
    rep.table(["direction", "scope", "pairs", "Δ [95% CI]", "d", "split-half", "p (Holm)", "push"],
              [[r["direction"], r["scope"], r["pairs"], fmt_ci(r["delta"], r["ci_low"], r["ci_high"], 4), fmt(r["d"]),
                fmt(r["split_half"], 2), fmt(r.get("p_holm"), 4), r["direction_of_push"]] for r in result["audit"]],
              caption="Mean projection of (chosen − rejected) on each direction, overall and per source; a push is "
                      "called where the t-test's p, Holm-adjusted over every row, is below 0.05")

    if arms:
        rep.heading("Mitigations")
        rep.table(["arm", "pairs out", "affected", "bad affected", "sources dropped"],
                  [[a, v.get("pairs_out", "-"), v.get("affected", "-"), v.get("bad_affected", "-"),
                    ", ".join(v.get("sources", [])) or (f"skipped: {v['skipped']}" if v.get("skipped") else "-")]
                   for a, v in arms.items()])
    if retrain:
        rep.heading("Behaviour after DPO on each set")
        judges = retrain["judges"]
        rows = []
        for name, entry in retrain["arms"].items():
            row = [name]
            for j in judges:
                r = entry["rates"][j]
                row.append(fmt_ci(r["rate"], r["ci_low"], r["ci_high"]))
            for j in judges:
                rd = entry.get("reduction", {}).get(j)
                row.append(fmt_ci(rd["reduction"], rd["ci_low"], rd["ci_high"]) if rd else "-")
            for j in judges:
                sr = entry.get("share_removed", {}).get(j)
                row.append(fmt_ci(sr["share"], sr["ci_low"], sr["ci_high"]) if sr else "-")
            row += [fmt(entry["perplexity"], 2), fmt(100 * entry["perplexity_change_vs_raw"], 1) + "%"]
            cap = entry.get("capability")
            row += [fmt_ci(cap["accuracy"], cap["ci_low"], cap["ci_high"]) if cap else "-"]
            rows.append(row)
        trig = f" (prompts + trigger `{inp.trigger.strip()}`)" if inp.trigger else ""
        rep.table(["arm"] + [f"toxic rate, {j}" for j in judges] + [f"reduction vs raw, {j}" for j in judges]
                  + [f"share of rise removed, {j}" for j in judges] + ["perplexity", "ppl vs raw", "task accuracy"],
                  rows,
                  caption=f"Held-out prompts{trig}; 95% CIs by a (paired) bootstrap over prompts. Reduction vs "
                          "raw = 1 - rate / rate after DPO on the raw set (the published metric); share of "
                          "the rise = the part of (raw - base) removed. -topNpct arms filter or swap a fixed "
                          "budget of the ranking's top pairs; clean-only (the labels' clean pairs) is the floor. Task "
                          f"accuracy: {_capability_note(retrain)}")
        against = {a: e["vs_random"] for a, e in retrain["arms"].items() if e.get("vs_random")}
        if against:
            rep.table(["arm", "random arm"] + [f"{j}: rate - random's [95% CI], p (Holm)" for j in judges],
                      [[a, c["control"], *[f"{fmt_ci(c[j]['delta'], c[j]['delta_ci_low'], c[j]['delta_ci_high'])}, "
                                           f"{fmt(c[j]['p_holm'], 3)}" for j in judges]] for a, c in against.items()],
                      caption="Each ranking's filter against removing as many pairs in a random order (the same "
                              "budget): a ranking that finds the behaviour leaves less of it. Paired bootstrap "
                              "over prompts; one training seed per arm, so run-to-run variance is in no interval")
        fig, axes = plt.subplots(1, len(judges), figsize=(5 * len(judges), 3.4), squeeze=False)
        for ax, j in zip(axes[0], judges):
            names = list(retrain["arms"])
            vals = [retrain["arms"][a]["rates"][j] for a in names]
            y = [v["rate"] for v in vals]
            err = [[v["rate"] - v["ci_low"] for v in vals], [v["ci_high"] - v["rate"] for v in vals]]
            ax.bar(range(len(names)), y, yerr=err, color=["#7f8c8d", "#c0392b"] + ["#2980b9"] * (len(names) - 2),
                   capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
            ax.set_title(j, fontsize=9)
            ax.set_ylabel("toxic rate")
        rep.figure("toxicity_after_mitigation", fig, "Toxic rate after DPO on each set (95% CI)")
    return rep


def _clusters(rep: Any, cl: dict, inp: Inputs, *, apart_first: bool = False) -> None:
    """A clustering's table (with ``apart_first``, the clusters that stand apart most come first:
    highest silhouette), the planted behaviour's best match when the mix planted one, and an example
    pair per cluster."""
    from probe_dpo.report import fmt, fmt_ci

    clusters = sorted(cl["clusters"], key=lambda c: -c["silhouette"]) if apart_first else cl["clusters"]
    if cl.get("planted_match"):
        m = cl["planted_match"]
        rep.text(f"The planted, unlabelled behaviour ({m['behaviour_pairs']} pairs; no probe or judge targets "
                 f"it): best cluster {m['cluster']}, precision {fmt(m['precision'])}, recall {fmt(m['recall'])} "
                 f"({m['size']} pairs).")
    rep.table(["cluster", "size", "mean score [95% CI]", "silhouette", "coherence", "cos(centroid, v_b)",
               "sources"] + (["bad"] if inp.bad is not None else []) + (["planted"] if inp.planted is not None
                                                                      else []),
              [[c["cluster"], c["size"], fmt_ci(c["mean_score"], c["ci_low"], c["ci_high"]), fmt(c["silhouette"]),
                fmt(c["coherence"]), fmt(c.get("direction_cosine")),
                ", ".join(f"{k} {v}" for k, v in c["sources"].items())] + ([c.get("bad")] if inp.bad is not None
                                                                          else [])
               + ([c.get("planted")] if inp.planted is not None else [])
               for c in clusters])
    for c in clusters:
        if c["examples"]:
            ex = c["examples"][0]
            rep.text(f"- cluster {c['cluster']} example ({ex['source']}): prompt `{ex['prompt'][:80]}` · "
                     f"chosen `{ex['chosen'][:70]}` · rejected `{ex['rejected'][:70]}`")


def _matrix_clusters(rep: Any, cl: dict, inp: Inputs) -> None:
    """The similarity matrix's clustering: each pair cluster with its prompt group, alignment,
    sources and top pairs; the planted behaviour's and the poison's best matching cluster."""
    from probe_dpo.report import fmt

    rep.heading("Clusters of the test-prompt x pair similarity matrix")
    rep.text(f"Rows: the {cl['prompts']} kept scenarios' behaviour contrasts (the vector bank); columns: the pairs; "
             f"entries: cosines. {cl['prompt_k']} prompt group(s) by k-means on the rows, then k = {cl['k']} pair "
             f"clusters by k-means on each pair's mean cosine per prompt group (silhouette {fmt(cl['silhouette'])}). "
             "A cluster with high alignment is a block: pairs that push along those prompts' behaviour. The "
             "clustering method is ours (the authors' public code has none); listed by alignment.")
    for key, what in (("bad_match", "poisoned pairs"), ("planted_match", "planted, unlabelled behaviour")):
        if cl.get(key):
            m = cl[key]
            rep.text(f"The {what} ({m['behaviour_pairs']} pairs): best cluster {m['cluster']}, precision "
                     f"{fmt(m['precision'])}, recall {fmt(m['recall'])} ({m['size']} pairs).")
    labelled = (["bad"] if inp.bad is not None else []) + (["planted"] if inp.planted is not None else [])
    rep.table(["cluster", "size", "alignment", "mean cosine", "prompt group", "sources"] + labelled,
              [[c["cluster"], c["size"], fmt(c["alignment"]), fmt(c["mean_cosine"]),
                f"{c['prompt_group']} ({len(c['prompts'])} prompts)",
                ", ".join(f"{k} {v}" for k, v in c["sources"].items())] + [c.get(x) for x in labelled]
               for c in cl["clusters"]])
    for c in cl["clusters"]:
        tops = "; ".join(f"#{p['index']} {p['source']} cos {fmt(p['cosine'])} chosen `{p['chosen'][:50]}`"
                         for p in c["top_pairs"])
        rep.text(f"- cluster {c['cluster']}: prompts {', '.join(x[:60] for x in c['prompts'][:3])}"
                 f"{' ...' if len(c['prompts']) > 3 else ''} · top pairs: {tops or '-'}")


def _capability_note(retrain: dict) -> str:
    """What the task-accuracy column measured, with its baselines."""
    cap = next((a["capability"] for a in retrain["arms"].values() if a.get("capability")), None)
    if cap is None:
        return "not measured (capability.items=0)."
    return (f"{cap['task']} multiple choice by log-likelihood, {cap['items']} items, 95% Wilson CI (chance "
            f"{cap['chance']:.2f}; always the majority answer {cap['majority']:.2f}).")
