"""Scoring and ranking pairs: cosine with a direction, ranks, top-k, recall of known-bad pairs,
and the judge comparator (judge(chosen) - judge(rejected))."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from probe_dpo.attribution.directions import Direction
from probe_dpo.errors import UserError


def cosine_scores(diffs: torch.Tensor, direction: Direction | torch.Tensor) -> np.ndarray:
    """``cos(v_d, v_b)`` per pair (0 for a pair whose two responses have identical activations)."""
    v = direction.vector if isinstance(direction, Direction) else torch.as_tensor(direction, dtype=torch.float32)
    d = diffs.double()
    v = v.double().reshape(-1)
    if d.shape[-1] != v.numel():
        raise UserError(f"direction has hidden size {v.numel()}, pair activations have {d.shape[-1]}")
    norms = d.norm(dim=1)
    cos = (d @ v) / (norms * v.norm()).clamp_min(1e-30)
    cos[norms == 0] = 0.0
    return cos.numpy()


def projections(diffs: torch.Tensor, direction: Direction) -> np.ndarray:
    """``v_d · u`` per pair (u the unit direction): the signed length of each pair's push."""
    return (diffs.double() @ direction.vector.double()).numpy()


def ranking(scores: Sequence[float]) -> np.ndarray:
    """Pair indices from the highest score to the lowest (ties: lower index first)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(len(s)), -s))


def ranks(scores: Sequence[float]) -> np.ndarray:
    """Each pair's rank (1 = highest score)."""
    order = ranking(scores)
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.arange(1, len(order) + 1)
    return out


def top_k_mask(scores: Sequence[float], k: int) -> np.ndarray:
    mask = np.zeros(len(scores), dtype=bool)
    mask[ranking(scores)[:max(0, int(k))]] = True
    return mask


def recall_at_k(scores: Sequence[float], bad: Sequence[bool], k: int) -> float:
    """Share of the ``bad`` pairs that are among the ``k`` highest-scoring pairs."""
    bad = np.asarray(bad, dtype=bool)
    if not bad.any():
        return float("nan")
    return float((top_k_mask(scores, k) & bad).sum() / bad.sum())


def recall_with_ci(scores: Sequence[float], bad: Sequence[bool], k: int) -> dict:
    """Recall at ``k`` with the 95% Wilson interval of hits / bad pairs: how much a ranking's
    recall could move with another draw of bad pairs like these."""
    from probe_dpo.stats import wilson_ci

    bad = np.asarray(bad, dtype=bool)
    hits = int((top_k_mask(scores, k) & bad).sum())
    lo, hi = wilson_ci(hits, int(bad.sum()))
    return {"recall": float(hits / bad.sum()) if bad.any() else float("nan"), "ci_low": lo, "ci_high": hi, "hits": hits,
            "k": int(k)}


def random_recall(n: int, n_bad: int, k: int) -> dict:
    """What a random ranking's recall at ``k`` is: expected ``k / n``, with the 2.5-97.5% quantiles
    of the hypergeometric number of bad pairs among ``k`` drawn from ``n``: the chance band."""
    from scipy.stats import hypergeom

    dist = hypergeom(int(n), int(n_bad), int(k))
    return {"recall": k / n, "ci_low": float(dist.ppf(0.025)) / n_bad, "ci_high": float(dist.ppf(0.975)) / n_bad,
            "k": int(k)}


def recall_curve(scores: Sequence[float], bad: Sequence[bool], ks: Sequence[int] | None = None) -> dict:
    """Recall and precision at each k (default: every k from 1 to n)."""
    bad = np.asarray(bad, dtype=bool)
    order = ranking(scores)
    hits = np.cumsum(bad[order])
    ks = list(range(1, len(order) + 1)) if ks is None else [int(k) for k in ks]
    total = max(1, int(bad.sum()))
    return {"k": ks, "recall": [float(hits[k - 1] / total) if k > 0 else 0.0 for k in ks],
            "precision": [float(hits[k - 1] / k) if k > 0 else float("nan") for k in ks]}


def judge_scores(pairs: Sequence[dict], judge: Any) -> np.ndarray:
    """``judge(chosen) - judge(rejected)``: how much more the chosen response shows the behaviour."""
    from probe_dpo.judges import Judge, get_judge

    j = judge if isinstance(judge, Judge) else get_judge(judge)
    from probe_dpo.data import message_text

    chosen = np.asarray(j.score([message_text(p["chosen"]) for p in pairs]), dtype=np.float64)
    rejected = np.asarray(j.score([message_text(p["rejected"]) for p in pairs]), dtype=np.float64)
    return chosen - rejected
