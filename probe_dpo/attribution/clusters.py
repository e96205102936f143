"""Clustering unit pair vectors (k-means, k by silhouette) to surface behaviours no direction covers."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from probe_dpo.attribution.directions import Direction
from probe_dpo.attribution.pairs import pair_sources
from probe_dpo.data import message_text
from probe_dpo.errors import UserError
from probe_dpo.stats import mean_ci


def cluster_pairs(diffs: torch.Tensor, scores: Sequence[float], pairs: Sequence[dict], *,
                  direction: Direction | None = None, k: int | None = None, k_range: tuple[int, int] = (2, 8),
                  seed: int = 0, examples: int = 3, max_dims: int = 64, n_boot: int = 1000) -> dict:
    """k-means on the unit pair vectors (after PCA to ``max_dims``); k by silhouette when None.

    Returns ``{"k", "silhouette", "labels", "centroids" (unit, activation space), "clusters"}``;
    each cluster: size, mean score with a 95% bootstrap CI, its sources, its mean silhouette
    (how well it stands apart), coherence (length of the mean unit vector: 1 = all pairs push
    the same way), the centroid's cosine with ``direction``, and the pairs nearest its centre.
    """
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_samples

    x = diffs.double()
    norms = x.norm(dim=1, keepdim=True)
    keep = (norms.squeeze(1) > 0).numpy()
    unit_all = (x / norms.clamp_min(1e-30)).numpy()
    n = len(unit_all)
    if n < 3:
        raise UserError(f"clustering needs at least 3 pairs, got {n}")
    dims = int(min(max_dims, n - 1, unit_all.shape[1]))
    z = PCA(n_components=dims, random_state=seed).fit_transform(unit_all)
    kk, sil, labels = kmeans_by_silhouette(z, k=k, k_range=k_range, seed=seed)
    per_sample = silhouette_samples(z, labels) if len(set(labels)) > 1 else np.zeros(n)
    s = np.asarray(scores, dtype=np.float64)
    src = np.asarray(pair_sources(pairs), dtype=object)
    clusters = []
    centroids = []
    for c in range(kk):
        members = np.flatnonzero((labels == c) & keep)
        if len(members) == 0:
            members = np.flatnonzero(labels == c)
        mean_unit = unit_all[members].mean(0)
        coherence = float(np.linalg.norm(mean_unit))
        centroid = mean_unit / max(coherence, 1e-30)
        centroids.append(centroid)
        near = members[np.argsort(-(unit_all[members] @ centroid))][:examples]
        lo, hi = mean_ci(s[members], n_boot=n_boot, seed=seed)
        counts: dict[str, int] = {}
        for name in src[members]:
            counts[name] = counts.get(name, 0) + 1
        entry = {"cluster": c, "size": int(len(members)), "share": len(members) / n,
                 "mean_score": float(s[members].mean()), "ci_low": lo, "ci_high": hi,
                 "silhouette": float(per_sample[members].mean()), "coherence": coherence,
                 "sources": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
                 "examples": [{"index": int(i), "prompt": message_text(pairs[i]["prompt"])[:160],
                               "chosen": message_text(pairs[i]["chosen"])[:160],
                               "rejected": message_text(pairs[i]["rejected"])[:160], "source": str(src[i]),
                               "score": float(s[i])} for i in near]}
        if direction is not None:
            entry["direction_cosine"] = float(centroid @ direction.vector.double().numpy())
        clusters.append(entry)
    return {"k": int(kk), "silhouette": sil, "labels": labels.astype(int),
            "centroids": torch.tensor(np.stack(centroids), dtype=torch.float32), "clusters": clusters,
            "pca_dims": dims}


def kmeans_by_silhouette(z: np.ndarray, *, k: int | None = None, k_range: tuple[int, int] = (2, 8),
                         seed: int = 0) -> tuple[int, float, np.ndarray]:
    """k-means on the rows of ``z``: ``(k, silhouette, labels)``, k fixed or, when None, the one in
    ``k_range`` (capped at rows - 1) with the highest silhouette."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(z)
    candidates = [k] if k is not None else list(range(k_range[0], min(k_range[1], n - 1) + 1))
    if not candidates or max(candidates) > n:
        raise UserError(f"clustering {n} rows into k = {k if k is not None else k_range} clusters")
    best = None
    for kk in candidates:
        model = KMeans(n_clusters=kk, n_init=10, random_state=seed).fit(z)
        sil = float(silhouette_score(z, model.labels_, sample_size=min(n, 3000), random_state=seed)) \
            if 1 < len(set(model.labels_)) < n else float("nan")
        if best is None or (not math.isnan(sil) and (math.isnan(best[1]) or sil > best[1])):
            best = (kk, sil, model.labels_)
    return best[0], best[1], np.asarray(best[2])


def cluster_directions(clusters: dict, layer: int) -> list[Direction]:
    """Each cluster's centroid as a direction (``cluster:<i>``), for the concept audit."""
    return [Direction(f"cluster:{c['cluster']}", layer, clusters["centroids"][i], "cluster",
                      {"size": c["size"], "coherence": c["coherence"]})
            for i, c in enumerate(clusters["clusters"])]


def best_cluster_match(labels: np.ndarray, behaviour: np.ndarray) -> dict:
    """How well one cluster isolates a labelled behaviour nobody gave a direction for: the
    cluster with the best F1 against the labels, with its precision (share of its pairs that
    carry the behaviour) and recall (share of the behaviour's pairs it holds)."""
    labels, behaviour = np.asarray(labels), np.asarray(behaviour, dtype=bool)
    best = {"cluster": None, "precision": 0.0, "recall": 0.0, "f1": 0.0, "size": 0,
            "behaviour_pairs": int(behaviour.sum())}
    for c in sorted(set(labels.tolist())):
        members = labels == c
        hits = int((members & behaviour).sum())
        precision, recall = hits / int(members.sum()), hits / max(1, int(behaviour.sum()))
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        if f1 > best["f1"]:
            best = {"cluster": int(c), "precision": precision, "recall": recall, "f1": f1, "size": int(members.sum()),
                    "behaviour_pairs": int(behaviour.sum())}
    return best
