"""A probe set's training report: the baselines its probes are measured against and the
markdown table the CLI prints."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from probe_dpo.stats import roc_auc


def auroc_subset(probs: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    return roc_auc(probs[mask], labels[mask]) if mask.any() else float("nan")


def probe_baselines(splits: dict, labels: dict, genre: dict | None, info: dict) -> dict:
    """What the probes are measured against on val and test: the prompt genre as a score (a probe
    that only tells toxic prompts from benign ones would match it) and each judge's agreement
    with the labels."""
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        if split not in splits:
            continue
        records = splits[split]
        entry: dict[str, Any] = {}
        if genre is not None:
            entry["genre_indicator_auroc"] = roc_auc(genre[split].astype(float), labels[split])
            mask = genre[split]
            entry["toxic_prompt_share"] = float(mask.mean())
            entry["positive_rate_toxic_prompts"] = float(labels[split][mask].mean()) if mask.any() else None
            entry["positive_rate_benign_prompts"] = float(labels[split][~mask].mean()) if (~mask).any() else None
        columns = sorted({k for r in records for k in r if k.startswith("score_")})
        train_judge = info.get("train_judge")
        judges = {}
        for col in columns:
            if not all(isinstance(r.get(col), (int, float)) for r in records):
                continue
            scores = np.array([float(r[col]) for r in records])
            same = train_judge is not None and col == "score_" + str(train_judge).replace("-", "_")
            judges[col] = {"auroc": roc_auc(scores, labels[split]), "training_judge": same}
            if genre is not None:
                judges[col]["auroc_toxic_prompts"] = auroc_subset(scores, labels[split], genre[split])
        entry["judge_agreement"] = judges
        out[split] = entry
    return out


def format_metric(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.0e}"
    return str(x)


def report_markdown(report: dict) -> str:
    """The report as a markdown table (what the CLI prints)."""
    lines = [f"# Probes on {report['model']} ({report['pooling']} pooling over {report['span']} tokens)", ""]
    sizes = ", ".join(f"{k}: {v['rows']} rows / {v['positives']} positive" for k, v in report["sizes"].items())
    lines += [f"Data: {sizes}. Threshold at {report['fpr']:.0%} FPR on validation negatives.", ""]
    lines += ["| probe | role | layer | C | val AUROC | test AUROC | test AUROC (toxic prompts) | test TPR @ thr |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["probes"], key=lambda r: (r["role"] != "train", r["layer"], r["name"])):
        lines.append(f"| {r['name']} | {r['role']} | {r['layer']} | {format_metric(r['c'])} | {format_metric(r['val_auroc'])} | "
                     f"{format_metric(r['test_auroc'])} | {format_metric(r['test_toxic_prompts_auroc'])} | {format_metric(r['test_tpr_at_fpr'])} |")
    if report.get("train_ensemble"):
        e = report["train_ensemble"]
        lines.append(f"| train ensemble ({report['aggregation']}) | train | - | - | {format_metric(e.get('val'))} | "
                     f"{format_metric(e.get('test'))} | {format_metric(e.get('test_toxic_prompts'))} | - |")
    split = "test" if "test" in report["baselines"] else "val"
    base = report["baselines"].get(split, {})
    lines += ["", f"Baselines on {split}:", ""]
    if "genre_indicator_auroc" in base:
        lines.append(f"- prompt-genre indicator (toxic-prompt vs benign-prompt) AUROC: {format_metric(base['genre_indicator_auroc'])}")
    for col, j in base.get("judge_agreement", {}).items():
        tag = " (the training judge)" if j.get("training_judge") else ""
        lines.append(f"- {col}{tag} AUROC against the labels: {format_metric(j['auroc'])} "
                     f"(toxic prompts only: {format_metric(j.get('auroc_toxic_prompts'))})")
    return "\n".join(lines) + "\n"
