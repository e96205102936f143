"""The report's account of the declared analysis: the plan and its hash, which judges decide,
each arm's outcome label with the coordinate that decided it against its null band, the
between-seed spread, the per-seed replication, and how much the judges agree.

Why a section of its own: a reader must be able to check a label without reading code: what was
declared before the runs, what the null references did, and which numbers crossed which bar."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from probe_dpo.report import Report, fmt

COORDINATE_TITLES = {"text": "text (frozen probe, equal judged behaviour)",
                     "activations": "activations (policy minus frozen probe)"}


def _coordinate(name: str) -> str:
    return COORDINATE_TITLES.get(name, name.replace("toxicity:", "rate, ") if name else "-")


def _value(name: str, x: Any) -> str:
    if fmt(x) == "-":
        return "-"
    return f"{100 * x:+.0f}%" if name.startswith("toxicity:") else f"{x:+.3f}"


def _interval(name: str, lo: Any, hi: Any) -> str:
    return f"[{_value(name, lo)}, {_value(name, hi)}]"


def _seeds(row: Mapping[str, Any], name: str) -> str:
    per = [x for x in row.get("per_seed") or [] if x is not None]
    if len(per) < 2:
        return "one seed"
    return ", ".join(_value(name, x) for x in per)


def outcome_sections(rep: Report, res: Mapping[str, Any], arms: Mapping[str, Any], names: Sequence[str]) -> None:
    """Add the analysis plan, the outcome labels and the judges' agreement to ``rep``."""
    from probe_dpo.outcome import LABELS

    analysis = res.get("analysis") or {}
    rep.heading("Outcome labels (declared before the runs)")
    if not analysis.get("sha256"):
        rep.text(analysis.get("note", "No analysis plan: no outcome labels."), note=True)
        return
    judges = analysis["judges"]
    effects = analysis["min_effect"]
    rep.text(f"The analysis plan `{analysis['plan_file']}` (sha256 `{analysis['sha256'][:16]}`) was written to the run "
             f"folder before anything was measured. Outcome labels and verdicts are decided by "
             f"{', '.join(f'`{j}`' for j in judges['outcome'])}; "
             + (f"{', '.join(f'`{j}`' for j in judges['in_loop'])} labelled the probe data or ranked the classifier "
                f"arm's pairs (**in the loop**): its rows are reported but decide nothing. "
                if not judges.get("in_loop_decides") else
                "**these judges were used in training (in the loop)**: every label below rests on them. ")
             + f"A coordinate moves when its Holm-corrected p (family of {analysis['family_size']} tests, alpha "
             f"{analysis['alpha']}) is below alpha, it is at least the minimum effect ({100 * effects['toxicity_relative']:.0f}% "
             f"of a rate, {effects['probe_score']} in probe score) and it lies outside the null band (the union of "
             f"the null references' 95% intervals). Intervals resample training seeds and prompts together "
             f"({analysis['bootstrap']} resamples).")
    rep.text("Labels:\n" + "\n".join(f"- **{k}**: {v}" for k, v in LABELS.items()))
    rows = []
    subjects = [(a, arms[a].get("outcome")) for a in names if arms[a].get("outcome")]
    subjects += [(f"{k} (null reference)", v) for k, v in (res.get("null_references") or {}).items() if v]
    for name, verdict in subjects:
        d = verdict["decided_by"]
        c = d.get("coordinate") or ""
        rows.append([name, f"**{verdict['label']}**", _coordinate(c), _value(c, d.get("estimate")),
                     _interval(c, d.get("ci_low"), d.get("ci_high")), _interval(c, d.get("band_low"), d.get("band_high")),
                     fmt(d.get("p_holm"), 4), arms.get(name, {}).get("seeds", 1), d.get("why", "")])
    rep.table(["arm", "label", "decided by", "estimate", "95% CI (seeds x prompts)", "null band", "p (Holm)", "seeds",
               "why"], rows, caption="Each arm's label and the coordinate that decided it. Exploratory arms (outside "
                                      f"the plan): {', '.join(analysis['exploratory']['arms']) or 'none'}.")
    rows = []
    for a in names:
        verdict = arms[a].get("outcome")
        if not verdict:
            continue
        for c, row in verdict["coordinates"].items():
            rows.append([a, _coordinate(c), row["status"], _value(c, row["estimate"]),
                         _interval(c, row["ci_low"], row["ci_high"]), _seeds(_per_seed(arms[a], c), c),
                         _interval(c, row["band_low"], row["band_high"]), fmt(row["p_holm"], 4)])
    rep.table(["arm", "coordinate", "status", "estimate", "95% CI", "each seed alone", "null band", "p (Holm)"], rows,
              caption="Every coordinate of every arm: moved (significant, large, outside the band), ambiguous "
                      "(significant and large, inside the band) or none. 'Each seed alone' is the between-seed spread.")
    rep_ = analysis.get("replication") or {}
    if rep_.get("of"):
        rep.text(f"**Replication across seeds.** Each seed of each arm labelled alone (same band; Holm over that "
                 f"seed's family): {rep_['agree']} of {rep_['of']} seed labels ({100 * rep_['share']:.0f}%) agree with "
                 "the pooled label. " + "; ".join(f"{a}: {', '.join(labs)}" for a, labs in rep_["per_seed"].items())
                 + ". A single seed has less power, so a seed's 'blatant' beside a pooled 'removed' is expected.")
    agreement = analysis.get("judge_agreement") or []
    if agreement:
        rep.table(["judge", "against the labels of", "Spearman", "AUROC", "positives"],
                  [[_judge(r["judge"], r["judge_in_loop"]), _judge(r["labels_of"], r["labels_in_loop"]),
                    fmt(r["spearman"], 2), fmt(r["auroc"], 3), r["positives"]] for r in agreement],
                  caption="How much the judges agree on the base model's own samples (in-loop judges marked). Two "
                          "judges with a high AUROC against each other's labels are one signal counted twice.")


def _judge(name: str, in_loop: bool) -> str:
    return f"{name} (in the loop)" if in_loop else name


def _per_seed(arm: Mapping[str, Any], coordinate: str) -> Mapping[str, Any]:
    """The per-seed estimates of a coordinate, kept by ``probe_dpo.outcome.coordinates``."""
    return ((arm.get("outcome") or {}).get("per_seed") or {}).get(coordinate, {})
