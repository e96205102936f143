"""Sources and mitigations: each source's mean score and share of the top-k with intervals, the
sources flagged as enriched, filter / swap / drop-sources, and the share of a rise removed."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from probe_dpo.attribution.scores import top_k_mask
from probe_dpo.errors import UserError
from probe_dpo.evaluation import per_prompt_rates
from probe_dpo.stats import cluster_bootstrap, mean_ci, wilson_ci

MITIGATIONS = ("filter", "swap", "drop-sources")


def source_table(scores: Sequence[float], sources: Sequence[str], k: int, *, n_boot: int = 2000,
                 seed: int = 0) -> list[dict]:
    """Per source: mean score (95% bootstrap CI over its pairs), its pairs in the top-k (with a
    95% Wilson CI of the share), its share of the top-k, and enrichment (share / (k/n)).

    A source is ``flagged`` when the lower end of its top-k share's CI is above the share
    expected by chance (k/n): its pairs are over-represented among the top pairs. Rows are
    ranked by mean score (highest first).
    """
    s = np.asarray(scores, dtype=np.float64)
    src = np.asarray(list(sources), dtype=object)
    n = len(s)
    k = int(min(max(k, 0), n))
    top = top_k_mask(s, k)
    expected = k / n if n else float("nan")
    rows = []
    for name in sorted(set(src.tolist())):
        mask = src == name
        vals = s[mask]
        in_top = int((top & mask).sum())
        lo, hi = mean_ci(vals, n_boot=n_boot, seed=seed)
        slo, shi = wilson_ci(in_top, int(mask.sum()))
        share = in_top / int(mask.sum())
        rows.append({"source": name, "pairs": int(mask.sum()), "mean_score": float(vals.mean()),
                     "ci_low": lo, "ci_high": hi, "in_top_k": in_top, "top_k_share": share,
                     "top_k_share_ci_low": slo, "top_k_share_ci_high": shi,
                     "share_of_top_k": in_top / k if k else float("nan"),
                     "enrichment": share / expected if expected else float("nan"),
                     "flagged": bool(k > 0 and slo > expected)})
    rows.sort(key=lambda r: (-r["mean_score"], r["source"]))
    for i, r in enumerate(rows, start=1):
        r["rank"] = i
    return rows


def flagged_sources(table: Sequence[dict]) -> list[str]:
    return [r["source"] for r in table if r["flagged"]]


def mitigate(pairs: Sequence[dict], scores: Sequence[float], how: str, *, k: int | None = None,
             sources: Sequence[str] | None = None) -> tuple[list[dict], dict]:
    """A cleaned copy of ``pairs`` (same columns) and what was done.

    ``filter``: drop the ``k`` highest-scoring pairs. ``swap``: swap chosen and rejected of
    the ``k`` highest-scoring pairs. ``drop-sources``: drop every pair of ``sources``.
    """
    if how not in MITIGATIONS:
        raise UserError(f"unknown mitigation {how!r}: use {', '.join(MITIGATIONS)}")
    if len(scores) != len(pairs):
        raise UserError(f"{len(scores)} scores for {len(pairs)} pairs")
    info: dict[str, Any] = {"mitigation": how, "pairs_in": len(pairs)}
    if how in ("filter", "swap"):
        if k is None or k < 0:
            raise UserError(f"mitigation {how} needs k >= 0 (the number of top pairs)")
        top = top_k_mask(scores, min(int(k), len(pairs)))
        info["k"] = int(top.sum())
        if how == "filter":
            out = [dict(p) for p, t in zip(pairs, top) if not t]
        else:
            out = []
            for p, t in zip(pairs, top):
                q = dict(p)
                if t:
                    q["chosen"], q["rejected"] = p["rejected"], p["chosen"]
                out.append(q)
        info["affected"] = int(top.sum())
    else:
        drop = set(sources or [])
        info["sources"] = sorted(drop)
        out = [dict(p) for p in pairs if str(p.get("source") or "(none)") not in drop]
        info["affected"] = len(pairs) - len(out)
    if not out:
        raise UserError(f"mitigation {how} removed every pair")
    info["pairs_out"] = len(out)
    return out, info


def share_of_rise_removed(base: np.ndarray, raw: np.ndarray, mitigated: np.ndarray, *,
                          threshold: float = 0.5, n_boot: int = 2000, seed: int = 0) -> dict:
    """``(rate_raw - rate_mitigated) / (rate_raw - rate_base)`` with a paired 95% bootstrap CI.

    Each argument is ``[prompts, samples]`` judge scores of the same prompts (base model,
    DPO on the raw set, DPO on the mitigated set). One set of resampled prompt indices is
    applied to all three; resamples where the rise is not positive are dropped (counted in
    ``undefined_resamples``). 1.0 means the whole rise is gone; above 1, the mitigated model
    is below the base model.
    """
    b, r, m = (per_prompt_rates(x, threshold) for x in (base, raw, mitigated))
    if not len(b) == len(r) == len(m):
        raise UserError(f"share of rise removed needs the same prompts: {len(b)}, {len(r)}, {len(m)}")
    rise = r.mean() - b.mean()
    share = float((r.mean() - m.mean()) / rise) if rise > 0 else float("nan")

    def stat(c: np.ndarray) -> np.ndarray:  # the share in a resample; NaN where the rise is not positive
        rb, rr, rm = ((c * x).sum(-1) / c.sum(-1) for x in (b, r, m))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(rr - rb > 0, (rr - rm) / (rr - rb), np.nan)

    res = cluster_bootstrap(len(b), stat, n_boot=n_boot, seed=seed)
    lo, hi = res["ci_low"], res["ci_high"]
    return {"share": share, "ci_low": float(lo), "ci_high": float(hi), "rate_base": float(b.mean()),
            "rate_raw": float(r.mean()), "rate_mitigated": float(m.mean()), "rise": float(rise),
            "undefined_resamples": res["undefined"], "prompts": int(len(b))}


def reduction_vs_raw(raw: np.ndarray, mitigated: np.ndarray, *, threshold: float = 0.5, n_boot: int = 2000,
                     seed: int = 0) -> dict:
    """``(rate_raw - rate_mitigated) / rate_raw``: the published metric, the share of the
    behaviour's rate after DPO on the raw set that DPO on the mitigated set no longer shows.

    Unlike the share of the rise, it stays defined and bounded (at most 1) when the clean data
    itself moves the behaviour below the base model's rate. The arguments are ``[prompts,
    samples]`` judge scores of the same prompts; one set of resampled prompt indices is applied
    to both (a paired 95% bootstrap CI); resamples with no behaviour after raw DPO are dropped
    (``undefined_resamples``).
    """
    r, m = (per_prompt_rates(x, threshold) for x in (raw, mitigated))
    if len(r) != len(m):
        raise UserError(f"reduction vs raw needs the same prompts: {len(r)}, {len(m)}")
    reduction = float((r.mean() - m.mean()) / r.mean()) if r.mean() > 0 else float("nan")

    def stat(c: np.ndarray) -> np.ndarray:
        rr, rm = ((c * x).sum(-1) / c.sum(-1) for x in (r, m))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(rr > 0, (rr - rm) / rr, np.nan)

    res = cluster_bootstrap(len(r), stat, n_boot=n_boot, seed=seed)
    return {"reduction": reduction, "ci_low": float(res["ci_low"]), "ci_high": float(res["ci_high"]),
            "rate_raw": float(r.mean()), "rate_mitigated": float(m.mean()),
            "undefined_resamples": res["undefined"], "prompts": int(len(r))}
