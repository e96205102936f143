"""Reading probe sets as tables: the training report, and measuring saved probes on any model and
labelled file (``probe-dpo probes eval``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from probe_dpo.probes.probe import ROLES, ProbeSet
from probe_dpo.probes.report import auroc_subset, format_metric
from probe_dpo.probes.train import ProbeTrainConfig, extract_records, labels_of, read_split
from probe_dpo.stats import as_numpy as _np
from probe_dpo.stats import binary_metrics, roc_auc


def evaluate_probes(probeset: ProbeSet, model: str, data: str, *, label_column: str = "label",
                    batch_size: int = 32, max_length: int = 256, device: str = "auto",
                    dtype: str = "float32", same_weights: bool = False) -> dict:
    """AUROC (and TPR at each probe's saved threshold) of every probe on ``model`` and ``data``."""
    from probe_dpo.model import load_model, load_tokenizer

    spans = {p.span for p in probeset.probes}
    poolings = {p.pooling for p in probeset.probes}
    dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    lm = load_model(model, dtype=dtype, device=dev)
    probeset.check_compatible(lm, same_weights=same_weights)
    tok = load_tokenizer(model)
    results: dict[str, Any] = {"model": str(model), "data": str(data), "probes": {}}
    labels_done = None
    for span in sorted(spans):
        for pooling in sorted(poolings):
            group = [p for p in probeset.probes if p.span == span and p.pooling == pooling]
            if not group:
                continue
            cfg = ProbeTrainConfig(span=span, label_column=label_column)  # type: ignore[arg-type]
            records = read_split(data, cfg, "labelled data")
            labels = labels_of(records, cfg)
            labels_done = labels
            feats = extract_records(model, lm, tok, records, sorted({p.layer for p in group}), pooling=pooling,
                                    span=span, batch_size=batch_size, max_length=max_length)
            genre = np.array([r.get("genre") == "toxic-prompt" for r in records])
            has_genre = all("genre" in r for r in records)
            for probe in group:
                p = _np(probe.prob(feats[probe.layer]))
                m = binary_metrics(p, labels, probe.card.get("threshold"))
                if has_genre:
                    m["auroc_toxic_prompts"] = auroc_subset(p, labels, genre)
                results["probes"][probe.name] = {"role": probe.role, "layer": probe.layer, **m}
            for role in ROLES:
                members = [p for p in group if p.role == role]
                if len(members) > 1 and len(group) == len(probeset.probes):
                    agg = _np(probeset.score(feats, role))
                    results[f"{role}_aggregate_auroc"] = roc_auc(agg, labels)
    if labels_done is not None:
        results["rows"] = int(len(labels_done))
        results["positives"] = int(labels_done.sum())
    return results


def eval_markdown(results: dict) -> str:
    lines = [f"Probe AUROC on {results['data']} ({results.get('rows')} rows, {results.get('positives')} positive) "
             f"with model {results['model']}", "",
             "| probe | role | layer | AUROC | AUROC (toxic prompts) | accuracy | TPR @ thr | FPR @ thr |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results["probes"].items(), key=lambda kv: (kv[1]["role"] != "train", kv[1]["layer"], kv[0])):
        lines.append(f"| {name} | {r['role']} | {r['layer']} | {format_metric(r['auroc'])} | {format_metric(r.get('auroc_toxic_prompts'))} "
                     f"| {format_metric(r['accuracy'])} | {format_metric(r.get('tpr'))} | {format_metric(r.get('fpr'))} |")
    for role in ROLES:
        if f"{role}_aggregate_auroc" in results:
            lines.append(f"| {role} aggregate | {role} | - | {format_metric(results[f'{role}_aggregate_auroc'])} | - | - | - | - |")
    return "\n".join(lines) + "\n"
