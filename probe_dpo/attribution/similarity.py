"""The test-prompt x training-pair similarity matrix, clustered: the paper's unsupervised
discovery of behaviours (Xiao & Aranguri, arXiv 2602.11079: "clustering behavior-datapoint
similarity matrices").

Rows are test prompts, each with its own behaviour contrast (the vector bank's per-scenario
directions, ``contrast_bank``); columns are the training pairs' vectors (chosen minus rejected,
read by the model before DPO); an entry is their cosine. A behaviour that a group of pairs taught
shows as a block: those pairs align with the contrasts of the prompts where it appears, and with
little else.

How the matrix is clustered is ours: the authors' public code (github frankyaoxiao/model-diffing)
builds the bank and ranks by its max cosine but holds no clustering code, and the paper's
abstract does not say how. Here the prompts (rows) are clustered first, by k-means on their
profiles over the pairs; then each pair is described by its mean cosine with each prompt group
and the pairs are clustered by k-means on those; k by silhouette, as ``cluster_pairs`` chooses it,
or fixed. Each pair cluster is matched with the prompt group it aligns with most (the block of
highest mean cosine). Averaging over a group first keeps a behaviour shown by few prompts from
being outweighed by one shown by many, and averages out each prompt's own noise. Clustering
profiles, not the raw activations, is what makes it the matrix's clustering: two pairs fall
together when the same prompts' behaviour explains them, whatever else their texts share.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from probe_dpo.attribution.clusters import kmeans_by_silhouette
from probe_dpo.attribution.directions import Direction
from probe_dpo.attribution.pairs import pair_sources
from probe_dpo.data import message_text
from probe_dpo.errors import UserError


def similarity_matrix(diffs: torch.Tensor, bank: Sequence[Direction]) -> np.ndarray:
    """``[prompts, pairs]``: the cosine of each bank direction with each pair's vector (0 for a
    pair whose two responses read identically)."""
    if not bank:
        raise UserError("similarity matrix: the vector bank is empty")
    d = diffs.double()
    u = torch.stack([b.vector for b in bank]).double()
    if d.shape[-1] != u.shape[-1]:
        raise UserError(f"vector bank has hidden size {u.shape[-1]}, pair activations have {d.shape[-1]}")
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
    norms = d.norm(dim=1, keepdim=True)
    cos = (d @ u.T) / norms.clamp_min(1e-30)
    cos[norms.squeeze(1) == 0] = 0.0
    return cos.T.numpy()


def cluster_similarity(matrix: np.ndarray, pairs: Sequence[dict], *, prompt_names: Sequence[str] | None = None,
                       k: int | None = None, prompt_k: int | None = None, k_range: tuple[int, int] = (2, 8),
                       seed: int = 0, examples: int = 3) -> dict:
    """Cluster the prompts (rows) of ``matrix`` (``[prompts, pairs]``) by k-means on their rows,
    then the pairs (columns) by k-means on their mean cosine with each prompt group; k fixed or by
    silhouette. With fewer than 3 prompts each prompt is its own group.

    Returns ``{"k", "silhouette", "prompt_k", "prompt_silhouette", "labels" (per pair),
    "prompt_labels", "block" ([prompt group][pair cluster] mean cosine), "clusters"}``; each pair
    cluster: size, share, its prompt group (the one it aligns with most) with that block's mean
    cosine (``alignment``), the group's prompts, its sources, and its top pairs (by mean cosine
    over the group's prompts). Clusters are listed by alignment, highest first.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] != len(pairs):
        raise UserError(f"similarity matrix of shape {m.shape} does not have one column per pair ({len(pairs)})")
    n_prompts, n = m.shape
    if n < 3:
        raise UserError(f"clustering needs at least 3 pairs, got {n}")
    names = list(prompt_names) if prompt_names is not None else [str(i) for i in range(n_prompts)]
    if len(names) != n_prompts:
        raise UserError(f"{len(names)} prompt names for {n_prompts} rows")
    if n_prompts >= 3:
        pk, psil, plabels = kmeans_by_silhouette(m, k=prompt_k, k_range=k_range, seed=seed)
    else:
        pk, psil, plabels = n_prompts, float("nan"), np.arange(n_prompts)
    profiles = np.stack([m[plabels == g].mean(0) for g in range(pk)], axis=1)  # [pairs, prompt groups]
    kk, sil, labels = kmeans_by_silhouette(profiles, k=k, k_range=k_range, seed=seed)
    block = np.array([[m[plabels == g][:, labels == c].mean() for c in range(kk)] for g in range(pk)])
    src = np.asarray(pair_sources(pairs), dtype=object)
    clusters = []
    for c in range(kk):
        members = np.flatnonzero(labels == c)
        group = int(np.argmax(block[:, c]))
        rows = np.flatnonzero(plabels == group)
        along = m[rows][:, members].mean(0)
        top = members[np.argsort(-along, kind="stable")][:examples]
        counts: dict[str, int] = {}
        for name in src[members]:
            counts[name] = counts.get(name, 0) + 1
        clusters.append({
            "cluster": c, "size": int(len(members)), "share": len(members) / n, "prompt_group": group,
            "alignment": float(block[group, c]), "mean_cosine": float(m[:, members].mean()),
            "prompts": [names[i] for i in rows],
            "sources": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "top_pairs": [{"index": int(i), "prompt": message_text(pairs[i]["prompt"])[:160],
                           "chosen": message_text(pairs[i]["chosen"])[:160],
                           "rejected": message_text(pairs[i]["rejected"])[:160], "source": str(src[i]),
                           "cosine": float(m[rows][:, i].mean())} for i in top]})
    clusters.sort(key=lambda e: -e["alignment"])
    return {"k": int(kk), "silhouette": None if math.isnan(sil) else sil, "prompt_k": int(pk),
            "prompt_silhouette": None if math.isnan(psil) else psil, "labels": labels.astype(int),
            "prompt_labels": [int(g) for g in plabels], "block": block.tolist(), "prompts": n_prompts, "pairs": n,
            "clusters": clusters}
