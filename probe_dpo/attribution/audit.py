"""Concept audit of a preference set before training on it.

For every available direction ``u`` (trained probes, difference-of-means directions,
cluster centroids; unit vectors at their layer) and every pair's response-activation
difference ``v_d = act(prompt, chosen) - act(prompt, rejected)`` on the model before
training, the projection ``x = v_d · u`` says how far DPO on the pair pushes the model's
responses along the concept (positive: up). Over the whole set and per source:

- ``delta``  the mean projection Δ, with a 95% percentile-bootstrap CI over pairs,
- ``d``      the effect size Δ / SD (the SD of the projections),
- ``split_half``  split-half sign agreement: the share of random halvings of the pairs in
             which both halves' means have the sign of Δ (a robustness check; near 1 for a
             real push, near 0.5 for noise),
- ``p``, ``p_holm``  a two-sided one-sample t-test of Δ = 0, and its Holm adjustment over
             every (direction, scope) row of the audit: many directions and sources are
             tested at once, so a push is called (``direction_of_push`` up/down) only where
             the adjusted p is below 0.05,

ranked by |d| within each scope: the concepts that DPO on this set will push up or down.
``audit_pairs`` runs the whole audit from files (what ``probe-dpo audit`` runs).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
import torch

from probe_dpo.errors import UserError
from probe_dpo.stats import holm, mean_ci

log = logging.getLogger(__name__)


def audit_table(diffs_by_layer: dict[int, torch.Tensor], directions: Sequence[Any], sources: Sequence[str], *,
                n_boot: int = 2000, n_splits: int = 200, seed: int = 0, min_pairs: int = 4) -> list[dict]:
    """One row per (direction, scope); scope ``all`` and each source with >= ``min_pairs`` pairs."""
    from probe_dpo.attribution import projections

    src = np.asarray(list(sources), dtype=object)
    scopes = [("all", np.ones(len(src), dtype=bool))]
    for name in sorted(set(src.tolist())):
        mask = src == name
        if mask.sum() >= min_pairs and mask.sum() < len(src):
            scopes.append((name, mask))
    rows = []
    for direction in directions:
        if direction.layer not in diffs_by_layer:
            raise UserError(f"direction {direction.name} reads layer {direction.layer}, but the pair activations "
                            f"hold layers {sorted(diffs_by_layer)}")
        x_all = projections(diffs_by_layer[direction.layer], direction)
        for scope, mask in scopes:
            rows.append({"direction": direction.name, "kind": direction.kind, "layer": direction.layer,
                         "scope": scope, **effect(x_all[mask], n_boot=n_boot, n_splits=n_splits,
                                                  seed=seed)})
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
        row["direction_of_push"] = ("up" if row["delta"] > 0 else "down") if adjusted < 0.05 else "unclear"
    return rows


def effect(x: np.ndarray, *, n_boot: int = 2000, n_splits: int = 200, seed: int = 0) -> dict:
    """Mean Δ (95% bootstrap CI), SD, d = Δ/SD, split-half sign agreement and the t-test's p of
    projections ``x``; on its own (one test) the push is called where the interval excludes 0."""
    from scipy.stats import ttest_1samp

    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    rng = np.random.default_rng(seed)
    delta = float(x.mean()) if n else float("nan")
    sd = float(x.std(ddof=1)) if n > 1 else float("nan")
    d = delta / sd if n > 1 and sd > 0 else float("nan")
    if n > 1:
        lo, hi = mean_ci(x, n_boot=n_boot, seed=seed)
        agree = 0
        half = n // 2
        for _ in range(n_splits):
            perm = rng.permutation(n)
            a, b = x[perm[:half]].mean(), x[perm[half:]].mean()
            agree += int(np.sign(a) == np.sign(b) == np.sign(delta) and delta != 0)
        split = agree / n_splits
        p = float(ttest_1samp(x, 0.0).pvalue) if sd > 0 else float("nan")
    else:
        lo = hi = split = p = float("nan")
    return {"pairs": n, "delta": delta, "ci_low": lo, "ci_high": hi, "sd": sd, "d": d, "split_half": split, "p": p,
            "direction_of_push": "up" if lo > 0 else ("down" if hi < 0 else "unclear")}


def ranked(rows: Sequence[dict]) -> list[dict]:
    """Rows ordered by scope (``all`` first) and then by |d| (largest first)."""
    def key(r):
        d = r["d"]
        return (r["scope"] != "all", r["scope"], -(abs(d) if isinstance(d, float) and math.isfinite(d) else -1))

    return sorted(rows, key=key)


def audit_markdown(rows: Sequence[dict], title: str = "Concept audit") -> str:
    from probe_dpo.report import fmt, md_table

    table = [[r["direction"], r["scope"], r["pairs"], f"{fmt(r['delta'], 4)} [{fmt(r['ci_low'], 4)}, {fmt(r['ci_high'], 4)}]",
              fmt(r["d"]), fmt(r["split_half"], 2), fmt(r.get("p_holm"), 4), r["direction_of_push"]]
             for r in ranked(rows)]
    return (f"# {title}\n\nΔ = mean projection of (chosen − rejected) response activations on each direction "
            "(95% bootstrap CI); d = Δ/SD; split-half = share of random halvings whose halves agree with the "
            "sign of Δ; p (Holm) = the t-test's p adjusted over every row; push where it is below 0.05.\n\n"
            + md_table(["direction", "scope", "pairs", "Δ [95% CI]", "d", "split-half", "p (Holm)", "push"], table)
            + "\n")


def audit_pairs(pairs_uri: str, model: str, directions_uris: Sequence[str], *, in_process: bool = False,
                activations: str | None = None, batch_size: int = 16, max_length: int = 256,
                n_boot: int = 2000, seed: int = 0, address: str | None = None) -> dict:
    """Read and check everything, extract the pairs' activations at the directions' layers, audit."""
    from probe_dpo.attribution import check_directions, load_directions, pair_features, pair_sources, read_pair_file

    pairs = read_pair_file(pairs_uri)
    directions = []
    for uri in directions_uris:
        found, meta = load_directions(uri)
        check_directions(found, model, where=f"directions {uri}", arch=meta.get("arch_hash"))
        directions += found
    names = [d.name for d in directions]
    if len(set(names)) != len(names):
        raise UserError(f"direction names repeat across {', '.join(directions_uris)}: {names}")
    layers = sorted({d.layer for d in directions})
    log.info(f"audit: {len(pairs)} pairs, {len(directions)} directions at layers {layers}")
    if not in_process:
        from probe_dpo.ray_utils import init_ray

        init_ray(address)
    feats = pair_features(model, pairs, layers, in_process=in_process, activations=activations,
                          batch_size=batch_size, max_length=max_length, address=address)
    rows = audit_table({L: feats.diffs(L) for L in layers}, directions, pair_sources(pairs), n_boot=n_boot, seed=seed)
    return {"pairs": pairs_uri, "model": model, "directions": list(directions_uris), "rows": ranked(rows),
            "extraction_seconds": round(feats.seconds, 2), "extraction": feats.how}
