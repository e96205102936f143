"""Scoring: pair activations, behaviour directions, pair scores for every method, sources,
clusters and the concept audit, and recall against known labels."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from probe_dpo import storage
from probe_dpo.data import json_digest
from probe_dpo.workflows.attribution_study.config import GRADIENT_MODES, AttributionConfig
from probe_dpo.workflows.attribution_study.inputs import Inputs

log = logging.getLogger(__name__)


def score_all(inp: Inputs, change: Any = None, contrast: Any = None) -> dict:
    """Directions, pair scores, clusters, the audit and the comparators (with their costs).
    ``change``: the behaviour-change direction (``change.py``), ranked as its own method;
    ``contrast``: ``(behaviour-contrast direction, its vector bank)`` (``contrast.py``), ranked as
    ``behaviour-contrast`` and, with a bank, ``bank-max`` and ``bank-mean``."""
    import torch

    from probe_dpo import attribution as A
    from probe_dpo.attribution.audit import audit_table, ranked

    cfg = inp.cfg
    ex = cfg.extraction
    timings: dict[str, float] = {}
    pool = None
    t0 = time.perf_counter()
    if not ex.in_process:
        from probe_dpo.activations import ExtractorPool
        from probe_dpo.ray_utils import init_ray

        init_ray(ex.address)
        pool = ExtractorPool(inp.model, actors=ex.actors, threads_per_actor=ex.threads_per_actor, address=ex.address)
        timings["actor_startup_s"] = round(pool.startup_s, 2)
    from probe_dpo.model import load_model, load_tokenizer

    lm = tok = None
    if ex.in_process:
        lm, tok = load_model(inp.model), load_tokenizer(inp.model)
    try:
        common = dict(pool=pool, in_process=ex.in_process, batch_size=ex.batch_size, max_length=ex.max_length)
        t1 = time.perf_counter()
        feats = A.pair_features(lm if lm is not None else inp.model, inp.pairs, [inp.layer], tokenizer=tok,
                                activations=storage.join(cfg.out, "activations", "pairs"),
                                shard_size=ex.shard_size, **common)
        timings["pair_activations_s"] = round(time.perf_counter() - t1, 2)
        log.info(f"pair activations: {len(inp.pairs)} pairs x 2 responses at layer {inp.layer} in "
            f"{timings['pair_activations_s']:.1f}s ({feats.how})")
        directions = []
        if inp.probeset is not None:
            directions += [d for d in A.probe_directions(inp.probeset) if d.layer == inp.layer]
        if inp.behaviour is not None:
            t1 = time.perf_counter()
            directions.append(A.behaviour_direction(lm if lm is not None else inp.model, inp.behaviour, inp.layer,
                                                    tokenizer=tok, activations=storage.join(cfg.out, "activations",
                                                                                            "behaviour"), **common))
            timings["behaviour_direction_s"] = round(time.perf_counter() - t1, 2)
        if change is not None:
            directions.append(change)
            timings["behaviour_change_read_s"] = change.meta.get("read_seconds")
        if contrast is not None:
            directions.append(contrast[0])
            timings["behaviour_contrast_read_s"] = contrast[0].meta.get("read_seconds")
    finally:
        if pool is not None:
            pool.close()
    timings["probe_total_s"] = round(time.perf_counter() - t0, 2)
    primary = next((d for d in directions if d.kind == cfg.direction), None)
    if cfg.direction == "probe":
        primary = next(d for d in directions if d.name == f"probe:{inp.probe.name}")
    if primary is None:
        primary = directions[0]
    diffs = feats.diffs(inp.layer)
    by_direction = {d.name: A.cosine_scores(diffs, d) for d in directions}
    scores = {"probe": by_direction[primary.name]}
    if inp.probe is not None and primary.kind != "probe" and f"probe:{inp.probe.name}" in by_direction:
        scores["probe-weights"] = by_direction[f"probe:{inp.probe.name}"]  # the trained probe's own direction
    if contrast is not None:
        scores["behaviour-contrast"] = by_direction[contrast[0].name]
        if contrast[1]:
            scores["bank-max"] = A.bank_scores(diffs, contrast[1], "max")
            scores["bank-mean"] = A.bank_scores(diffs, contrast[1], "mean")
    if change is not None:
        scores["behaviour-change"] = by_direction[change.name]
    if cfg.retrain.enabled and "random" in cfg.retrain.methods:  # the filter that ignores the behaviour
        scores["random"] = np.random.default_rng(cfg.seed).random(len(inp.pairs))
    sources = A.pair_sources(inp.pairs)
    n = len(inp.pairs)
    k = top_k(cfg, n, inp.bad)
    clusters = None
    if cfg.clusters.enabled and n >= 3:
        clusters = A.cluster_pairs(diffs, scores["probe"], inp.pairs, direction=primary, k=cfg.clusters.k,
                                   k_range=(cfg.clusters.k_min, cfg.clusters.k_max), seed=cfg.seed,
                                   examples=cfg.clusters.examples)
        _count_labels(clusters, inp)
    change_clusters = None
    if change is not None and cfg.clusters.enabled and n > cfg.clusters.change_k:
        t1 = time.perf_counter()
        change_clusters = A.cluster_pairs(_chosen_change(inp, feats, change.meta["policy"]), scores["probe"],
                                          inp.pairs, direction=primary, k=cfg.clusters.change_k, seed=cfg.seed,
                                          examples=cfg.clusters.examples)
        _count_labels(change_clusters, inp)
        timings["change_clusters_s"] = round(time.perf_counter() - t1, 2)
    matrix_clusters = None
    if contrast is not None and contrast[1] and cfg.clusters.matrix and n >= 3:
        matrix_clusters = A.cluster_similarity(
            A.similarity_matrix(diffs, contrast[1]), inp.pairs, prompt_names=[f"{b.name}: {b.meta.get('prompt', '')[:80]}" for b in contrast[1]],
            k=cfg.clusters.matrix_k, prompt_k=cfg.clusters.matrix_prompt_k,
            k_range=(cfg.clusters.k_min, cfg.clusters.k_max), seed=cfg.seed, examples=cfg.clusters.examples)
        _count_labels(matrix_clusters, inp)
    audit_dirs = list(directions) + (A.cluster_directions(clusters, inp.layer) if clusters else [])
    audit = ranked(audit_table({inp.layer: diffs}, audit_dirs, sources, n_boot=cfg.ranking.bootstrap, seed=cfg.seed))
    A.save_directions(directions + (list(contrast[1]) if contrast else [])
                      + (A.cluster_directions(clusters, inp.layer) if clusters else []),
                      storage.join(cfg.out, "directions"),
                      {"model": inp.model, "arch_hash": A.model_facts(inp.model)["arch_hash"], "layer": inp.layer})

    comparator_info: dict[str, dict] = {}
    if "judge" in cfg.comparators:
        t1 = time.perf_counter()
        scores["judge"] = A.judge_scores(inp.pairs, inp.judge)
        comparator_info["judge"] = {"judge": inp.judge, "seconds": round(time.perf_counter() - t1, 2)}
    for name, mode in GRADIENT_MODES.items():
        if name not in cfg.comparators:
            continue
        gcfg = dataclasses.replace(cfg.gradient, mode=mode)
        positives = [r for r in inp.behaviour if float(r["label"]) > 0.5]
        key = json_digest({"model": model_key(inp.model), "pairs": [(p["prompt"], p["chosen"], p["rejected"])
                                                                      for p in inp.pairs],
                            "behaviour": [(r["prompt"], r["completion"]) for r in positives],
                            "cfg": dataclasses.asdict(gcfg)})
        cache = storage.join(cfg.out, "comparators", f"{name}.json")
        cached = storage.read_json(cache) if storage.exists(cache) else None
        if cached and cached.get("key") == key:
            scores[name] = np.asarray(cached["scores"], dtype=np.float64)
            comparator_info[name] = {**cached["info"], "cached": True}
            log.info(f"{name}: reusing scores from {cache}")
            continue
        g_lm = lm if lm is not None else load_model(inp.model)
        g_tok = tok if tok is not None else load_tokenizer(inp.model)
        s, info = A.gradient_scores(g_lm, g_tok, inp.pairs, positives, gcfg)
        scores[name] = s
        comparator_info[name] = info
        storage.write_json(cache, {"key": key, "info": info, "scores": s.tolist()})
        log.info(f"{name}: {len(inp.pairs)} pairs in {info['seconds']:.1f}s ({info})")
        del g_lm
    tables = {m: A.source_table(s, sources, k, n_boot=cfg.ranking.bootstrap, seed=cfg.seed) for m, s in scores.items()}
    return {"directions": directions, "primary": primary, "scores": scores, "by_direction": by_direction,
            "sources": sources, "k": k, "clusters": clusters, "change_clusters": change_clusters,
            "matrix_clusters": matrix_clusters, "audit": audit,
            "tables": tables,
            "timings": timings, "comparators": comparator_info, "diffs_shape": list(diffs.shape),
            "pair_extraction": feats.how, "torch_threads": torch.get_num_threads()}


def _chosen_change(inp: Inputs, before: Any, policy: str) -> Any:
    """Per pair, the raw-set policy's reading of the chosen response minus the model's before DPO
    (``before``: the pair features already read) at the study's layer. On Ray actors of the
    policy with shards in <out>/activations/pairs-raw-policy (reused on a re-run), or in-process."""
    from probe_dpo import attribution as A

    ex = inp.cfg.extraction
    after = A.pair_features(policy, inp.pairs, [inp.layer], in_process=ex.in_process, batch_size=ex.batch_size,
                            max_length=ex.max_length, shard_size=ex.shard_size, actors=ex.actors,
                            threads_per_actor=ex.threads_per_actor, address=ex.address,
                            activations=storage.join(inp.cfg.out, "activations", "pairs-raw-policy"))
    return after.chosen[inp.layer] - before.chosen[inp.layer]


def _count_labels(clusters: dict, inp: Inputs) -> None:
    """Known bad and planted pairs per cluster, and the clusters that best isolate the planted
    behaviour and the poisoned pairs (evaluation only: the clustering never sees them)."""
    from probe_dpo import attribution as A

    for name, labelled in (("bad", inp.bad), ("planted", inp.planted)):
        if labelled is not None:
            for c in clusters["clusters"]:
                c[name] = int((labelled & (clusters["labels"] == c["cluster"])).sum())
    if inp.planted is not None:
        clusters["planted_match"] = A.best_cluster_match(clusters["labels"], inp.planted)
    if inp.bad is not None:
        clusters["bad_match"] = A.best_cluster_match(clusters["labels"], inp.bad)


def top_k(cfg: AttributionConfig, n: int, bad: np.ndarray | None) -> int:
    if cfg.ranking.k_from_labels:
        return int(bad.sum())
    if cfg.ranking.top_k is not None:
        return min(cfg.ranking.top_k, n)
    return max(1, int(round(cfg.ranking.top_fraction * n)))


def model_key(model: str) -> Any:
    from probe_dpo.activations.sharded import model_files_stamp

    stamp = model_files_stamp(model)
    return stamp or model


BUDGETS = (0.01, 0.05, 0.08, 0.10, 0.20)
"""Shares of the pairs a user can afford to inspect or drop, without knowing how many are bad
(0.08: the paper filters 30k of OLMo 2's 378k pairs)."""


def recall_summary(scores: dict[str, np.ndarray], bad: np.ndarray, k: int) -> dict:
    """Per method: recall at ``k`` and at each budget (the top 1/5/8/10/20% of the pairs: what a
    user without labels can act on), each with its Wilson interval, and the whole recall@k
    curve. ``chance``: what a random ranking gets (expected, and its hypergeometric 95% band),
    the line a label-free direction has to clear."""
    from probe_dpo.attribution import random_recall, recall_curve, recall_with_ci

    n, n_bad = len(bad), int(np.asarray(bad).sum())
    ks = sorted({max(1, int(round(f * n))) for f in np.linspace(0.01, 1.0, 100)} | {k})
    budget_k = {f"{round(100 * b)}%": max(1, int(round(b * n))) for b in BUDGETS}
    out = {}
    for name, s in scores.items():
        at_k = recall_with_ci(s, bad, k)
        out[name] = {"recall_at_k": at_k["recall"], "k": k, "ci": [at_k["ci_low"], at_k["ci_high"]],
                     "budgets": {b: {"k": bk, **recall_with_ci(s, bad, bk)} for b, bk in budget_k.items()},
                     "curve": recall_curve(s, bad, ks)}
    chance = random_recall(n, n_bad, k)
    out["chance"] = {"recall_at_k": chance["recall"], "k": k, "ci": [chance["ci_low"], chance["ci_high"]],
                     "budgets": {b: random_recall(n, n_bad, bk) for b, bk in budget_k.items()}}
    return out


def write_scores(inp: Inputs, result: dict) -> str:
    from probe_dpo.attribution import ranks
    from probe_dpo.data import write_records

    rows = []
    rank = ranks(result["scores"]["probe"])
    for i, pair in enumerate(inp.pairs):
        row = {"index": i, "pair_id": pair.get("pair_id"), "source": result["sources"][i], "rank": int(rank[i]),
               "score": float(result["scores"]["probe"][i])}
        for name, s in result["by_direction"].items():
            row[f"score_{name}"] = float(s[i])
        for name, s in result["scores"].items():  # a method that is a direction's scores has its column
            if name != "probe" and not any(s is d for d in result["by_direction"].values()):
                row[f"score_{name.replace('-', '_')}"] = float(s[i])
        if result.get("clusters"):
            row["cluster"] = int(result["clusters"]["labels"][i])
        if result.get("change_clusters"):
            row["change_cluster"] = int(result["change_clusters"]["labels"][i])
        if result.get("matrix_clusters"):
            row["matrix_cluster"] = int(result["matrix_clusters"]["labels"][i])
        if inp.bad is not None:
            row["poisoned"] = bool(inp.bad[i])
        rows.append(row)
    uri = storage.join(inp.cfg.out, "scores.parquet")
    write_records(rows, uri)
    return uri
