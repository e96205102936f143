"""The attribution study: rank a preference set's pairs and sources by a behaviour direction,
cluster and audit them, mitigate, and (optionally) retrain with plain DPO to measure the effect.

What ``probe-dpo attribute`` and ``ray job submit -- python -m probe_dpo.workflows.attribution`` run::

    1. check every input first (pair columns, probes vs model, layer, behaviour data, judge)
       — with a testbed and no pair file, build the poisoned preference mix (<out>/mix)
    2. pair activations on Ray actors (ExtractorPool + extract_sharded; <out>/activations)
    3. behaviour directions: the probe's and the difference of means -> <out>/directions
    4. scores (cos(v_d, v_b)) -> <out>/scores.parquet; sources -> <out>/sources.json;
       clusters -> <out>/clusters.json; concept audit -> <out>/audit.json
    5. comparators (judge(chosen) - judge(rejected); LESS/LoGra-style gradients)
    6. mitigations -> <out>/mitigated/<method>-<filter|swap|drop-sources>.<ext>
    7. retraining (plain DPO on Ray Train, same settings for every arm) and evaluation: the
       judges' toxicity of held-out prompts' continuations (with the mix's trigger),
       benign perplexity, the share of the DPO-induced rise each mitigation removes
    8. <out>/results.json (last) and <out>/report.{md,html}

Each expensive step is restartable: complete activation shards, trained policies (same
config) and evaluations (same policy and settings) are reused on a re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from probe_dpo import storage
from probe_dpo.attribution import MITIGATIONS, GradientConfig
from probe_dpo.config import bounded, to_dict
from probe_dpo.data import json_digest
from probe_dpo.errors import UserError
from probe_dpo.logs import setup as setup_logs
from probe_dpo.preference_mix import PreferenceMixConfig
from probe_dpo.workflows import bundled_config

METHODS = ("probe", "probe-weights", "judge", "gradient", "gradient-factorized")
COMPARATORS = ("judge", "gradient", "gradient-factorized")


log = logging.getLogger(__name__)


@dataclass
class ExtractionSettings:
    in_process: bool = False
    """Extract in this process instead of on Ray actors."""
    actors: int = bounded(2, ge=1)
    """Ray actors extracting pair activations (0: in this process)."""
    threads_per_actor: int = bounded(1, ge=1)
    """torch threads of each actor."""
    batch_size: int = bounded(16, ge=1)
    """Sequences per forward pass."""
    max_length: int = bounded(256, ge=8)
    """Tokens kept per sequence."""
    shard_size: int = bounded(256, ge=1)
    """Pairs per actor task."""
    address: str | None = None
    """Ray address (None: start or reuse a local Ray)."""


@dataclass
class RankingSettings:
    top_k: int | None = bounded(None, ge=1)
    """Pairs that filter/swap act on, and the k of the source table."""
    top_fraction: float = bounded(0.1, gt=0.0, lt=1.0)
    """When top_k is None: k = round(top_fraction * pairs)."""
    k_from_labels: bool = False
    """k = the number of labelled bad pairs (poison_labels): the evaluation budget 'at k'."""
    bootstrap: int = bounded(2000, ge=10)
    """Bootstrap resamples of the source table's intervals."""


@dataclass
class ClusterSettings:
    enabled: bool = True
    """Cluster the pair vectors."""
    k: int | None = bounded(None, ge=2)
    """Clusters (None: chosen by silhouette in [k_min, k_max])."""
    k_min: int = bounded(2, ge=2)
    """Smallest k tried."""
    k_max: int = bounded(8, ge=2)
    """Largest k tried."""
    examples: int = bounded(3, ge=0)
    """Example pairs shown per cluster."""


@dataclass
class RetrainSettings:
    """Plain DPO (method dpo) on the raw and every mitigated set, the same settings for each."""

    enabled: bool = False
    """Retrain on each mitigated set and measure the behaviour."""
    methods: list[str] = field(default_factory=lambda: ["probe"])
    """Rankings whose filter/swap sets are retrained (probe, judge, gradient, gradient-factorized);
    drop-sources is the probe's."""
    lr: float = bounded(1e-5, gt=0.0)
    """Learning rate of the retraining."""
    epochs: float = bounded(2.0, gt=0.0)
    """Passes over each set."""
    beta: float = bounded(0.1, gt=0.0)
    """DPO beta of the retraining."""
    batch_size: int = bounded(4, ge=1)
    """Pairs per step."""
    max_length: int = bounded(128, ge=8)
    """Tokens kept per sequence."""
    workers: int = bounded(2, ge=1)
    """Ray Train workers."""
    seed: int = bounded(0, ge=0)
    """Seeds the retraining."""
    overrides: list[str] = field(default_factory=list)
    """Further TrainConfig overrides (key=value), applied to every arm."""


@dataclass
class EvaluationSettings:
    prompts: str | None = None
    """Held-out prompts (column prompt). Default: <testbed>/data/prompts_heldout.jsonl."""
    trigger: str | None = None
    """Appended to every evaluation prompt. Default: the built mix's trigger (none otherwise)."""
    max_prompts: int | None = bounded(None, ge=1)
    """Held-out prompts evaluated (None: all)."""
    samples_per_prompt: int = bounded(2, ge=1)
    """Continuations per prompt."""
    perplexity: str | None = None
    """Benign texts (column text). Default: <testbed>/data/perplexity.jsonl."""
    perplexity_tokens: int = bounded(256, ge=8)
    """Tokens per perplexity passage."""
    judges: list[str] = field(default_factory=lambda: ["toxic-comment-classifier", "profanity-check"])
    """Judges that score the continuations."""
    threshold: float = bounded(0.5, gt=0.0, lt=1.0)
    """A judge score at or above this counts as the behaviour."""
    bootstrap: int = bounded(2000, ge=10)
    """Bootstrap resamples per interval."""
    seed: int = bounded(0, ge=0)
    """Seeds generation (the same for every model)."""


@dataclass
class AttributionConfig:
    pairs: str | None = None
    """Preference pairs (jsonl / parquet / save_to_disk folder: prompt, chosen, rejected[, source]).
    None with a testbed: the poisoned preference mix built from it (<out>/mix)."""
    model: str | None = None
    """The model before DPO (default: <testbed>/model)."""
    probes: str | None = None
    """A published ProbeSet on this model; its probe gives a direction and the layer."""
    probe: str | None = None
    """Which probe (default: the first train probe)."""
    layer: int | None = None
    """Layer of the pair activations (default: the probe's layer)."""
    testbed: str | None = None
    """A built testbed: the model, the data and the preference mix come from it."""
    behaviour_data: str | None = None
    """Labelled (prompt, completion, label) examples for the difference-of-means direction and the
    gradient comparator's behaviour set. Default: <testbed>/data/probe_train.jsonl."""
    behaviour_examples: int = bounded(256, ge=0)
    """Examples per class drawn (seeded) from behaviour_data (0: all)."""
    direction: Literal["diff-of-means", "probe"] = "diff-of-means"
    """The direction that ranks pairs (both are scored and reported)."""
    poison_labels: str | None = None
    """Which pairs are bad (column poisoned; evaluation only). Default: the built mix's labels."""
    out: str = "runs/attribution"
    """The study's output folder (local or s3://)."""
    seed: int = bounded(0, ge=0)
    """Seeds the study."""
    mix: PreferenceMixConfig = field(default_factory=PreferenceMixConfig)
    """The poisoned preference mix."""
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    """Pair activation extraction."""
    ranking: RankingSettings = field(default_factory=RankingSettings)
    """Ranking pairs and sources."""
    clusters: ClusterSettings = field(default_factory=ClusterSettings)
    """Clustering pair vectors."""
    mitigate: list[str] = field(default_factory=list)
    """filter, swap, drop-sources."""
    comparators: list[str] = field(default_factory=list)
    """judge, gradient (dense, LESS), gradient-factorized (LoGra)."""
    judge: str | None = None
    """The judge baseline's judge. Default: the testbed's held-out judge (not the one that selected
    the poison), else profanity-check."""
    gradient: GradientConfig = field(default_factory=GradientConfig)
    """The gradient comparator."""
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    """Retraining on the mitigated sets."""
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    """Measuring each retrained model."""


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    cfg: AttributionConfig
    model: str
    pairs_uri: str
    pairs: list[dict]
    probeset: Any
    probe: Any
    layer: int
    behaviour: list[dict] | None
    bad: np.ndarray | None
    mix: dict | None
    trigger: str
    testbed_info: dict | None
    judge: str


def _sample_behaviour(records: list[dict], per_class: int, seed: int) -> list[dict]:
    if per_class <= 0:
        return records
    rng = np.random.default_rng([seed, 0xBE4A])
    out = []
    for label in (1, 0):
        idx = [i for i, r in enumerate(records) if (float(r["label"]) > 0.5) == bool(label)]
        pick = sorted(rng.choice(len(idx), size=min(per_class, len(idx)), replace=False).tolist())
        out += [records[idx[i]] for i in pick]
    return out


def prepare(cfg: AttributionConfig) -> Inputs:
    """Resolve and check every input; UserError (one line) before any heavy compute."""
    from probe_dpo.attribution import model_facts, read_pair_file
    from probe_dpo.data import check_labels, read_records
    from probe_dpo.judges import JUDGE_NAMES, get_judge
    from probe_dpo.preference_mix import build_preference_mix, read_poison_labels
    from probe_dpo.testbed import read_testbed_info

    for m in cfg.mitigate:
        if m not in MITIGATIONS:
            raise UserError(f"config key mitigate: unknown mitigation {m!r} (use {', '.join(MITIGATIONS)})")
    for c in cfg.comparators:
        if c not in COMPARATORS:
            raise UserError(f"config key comparators: unknown comparator {c!r} (use {', '.join(COMPARATORS)})")
    for m in cfg.retrain.methods:
        if m not in METHODS:
            raise UserError(f"config key retrain.methods: unknown method {m!r} (use {', '.join(METHODS)})")
        if m in COMPARATORS and m not in cfg.comparators:
            raise UserError(f"config key retrain.methods: {m} needs comparators to include {m}")
        if m == "probe-weights" and (not cfg.probes or cfg.direction == "probe"):
            raise UserError("config key retrain.methods: probe-weights (the probe's own direction next to the "
                            "difference of means) needs probes and direction=diff-of-means")
    info = read_testbed_info(cfg.testbed) if cfg.testbed else None
    model = cfg.model or (storage.join(cfg.testbed, (info or {}).get("model", {}).get("path", "model"))
                          if cfg.testbed else None)
    if not model:
        raise UserError("no model: give --model DIR (the model before DPO) or a testbed")
    from probe_dpo.model import model_dir

    if not storage.exists(storage.join(model_dir(model), "config.json")):  # a hub id: its cached snapshot
        raise UserError(f"model {model}: no config.json there (not a save_pretrained folder)")
    facts = model_facts(model)

    mix = None
    pairs_uri = cfg.pairs
    if pairs_uri is None:
        if not cfg.testbed:
            raise UserError("no pairs: give --pairs URI (prompt, chosen, rejected[, source]) or a testbed")
        mix = build_preference_mix(cfg.testbed, storage.join(cfg.out, "mix"), cfg.mix)
        pairs_uri = storage.join(cfg.out, "mix", "pairs.jsonl")
    pairs = read_pair_file(pairs_uri)

    probeset = probe = None
    if cfg.probes:
        from probe_dpo.probes import ProbeSet

        probeset = ProbeSet.load(cfg.probes)
        if not len(probeset.probes):
            raise UserError(f"probes {cfg.probes}: the set holds no probes")
        if facts["hidden_size"] is not None and probeset.hidden_size != facts["hidden_size"]:
            raise UserError(f"probes {cfg.probes} read hidden size {probeset.hidden_size}, but model {model} has "
                            f"hidden size {facts['hidden_size']}: the probes come from another model")
        if probeset.meta.get("arch_hash") and probeset.meta["arch_hash"] != facts["arch_hash"]:
            raise UserError(f"probes {cfg.probes} were trained on a different architecture "
                            f"({probeset.meta['arch_hash']}) than model {model} ({facts['arch_hash']})")
        if cfg.probe:
            try:
                probe = probeset[cfg.probe]
            except KeyError:
                raise UserError(f"probes {cfg.probes}: no probe named {cfg.probe} (has: "
                                f"{', '.join(p.name for p in probeset.probes)})") from None
        else:
            probe = probeset.default_probe
        deep = sorted({p.layer for p in probeset.probes if p.layer >= (facts["num_layers"] or 10**9)})
        if deep:
            raise UserError(f"probes {cfg.probes} read layer(s) {deep}, but model {model} has {facts['num_layers']} "
                            f"layers: the probes come from another model")
    layer = cfg.layer if cfg.layer is not None else (probe.layer if probe is not None else None)
    if layer is None:
        raise UserError("no layer: give probes (their layer is used) or layer=<index>")
    n_layers = facts["num_layers"]
    if n_layers is not None:
        if not -n_layers <= layer < n_layers:
            raise UserError(f"layer {layer} is out of range: model {model} has layers 0..{n_layers - 1}")
        layer = layer % n_layers

    behaviour = None
    b_uri = cfg.behaviour_data or (storage.join(cfg.testbed, "data", "probe_train.jsonl") if cfg.testbed else None)
    if b_uri:
        records = read_records(b_uri, required=("prompt", "completion", "label"), non_empty=("prompt",),
                               what="behaviour data")
        check_labels(records, "label", what=f"behaviour data {b_uri}")
        behaviour = _sample_behaviour(records, cfg.behaviour_examples, cfg.seed)
    if cfg.direction == "diff-of-means" and behaviour is None and probe is None:
        raise UserError("no behaviour direction: give behaviour_data (difference of means) or probes")
    if cfg.direction == "probe" and probe is None:
        raise UserError("direction=probe needs --probes")
    if "gradient" in cfg.comparators or "gradient-factorized" in cfg.comparators:
        if behaviour is None:
            raise UserError("the gradient comparator needs behaviour_data (examples of the behaviour)")

    labels_uri = cfg.poison_labels or (storage.join(cfg.out, "mix", "poison_labels.jsonl") if mix else None)
    bad = read_poison_labels(labels_uri, pairs) if labels_uri else None
    if cfg.ranking.k_from_labels and (bad is None or not bad.any()):
        raise UserError("ranking.k_from_labels needs poison_labels with at least one bad pair")
    trigger = cfg.evaluation.trigger if cfg.evaluation.trigger is not None else (mix["trigger"] if mix else "")
    judge = cfg.judge
    if judge is None:
        heldout = (info or {}).get("heldout_judges") or []
        judge = heldout[0] if heldout else "profanity-check"
        if mix and mix.get("train_judge") == judge:
            judge = next(j for j in JUDGE_NAMES if j != judge)
    get_judge(judge)
    for j in cfg.evaluation.judges:
        get_judge(j)
    if mix and judge == mix.get("train_judge"):
        log.info(f"warning: the judge baseline uses {judge}, the judge that selected the poisoned pairs (circular)")
    if cfg.retrain.enabled:
        if not (cfg.evaluation.prompts or cfg.testbed):
            raise UserError("retrain.enabled needs evaluation.prompts (held-out prompts) or a testbed")
        if not (cfg.evaluation.perplexity or cfg.testbed):
            raise UserError("retrain.enabled needs evaluation.perplexity (benign texts) or a testbed")
    storage.exists(cfg.out)  # an unreachable bucket fails here
    return Inputs(cfg, model, pairs_uri, pairs, probeset, probe, layer, behaviour, bad, mix, trigger, info, judge)


# ---------------------------------------------------------------------------------------------
# Scoring


def score_all(inp: Inputs) -> dict:
    """Directions, pair scores, clusters, the audit and the comparators (with their costs)."""
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
    scores = {"probe": A.cosine_scores(diffs, primary)}
    by_direction = {d.name: A.cosine_scores(diffs, d) for d in directions}
    if inp.probe is not None and primary.kind != "probe" and f"probe:{inp.probe.name}" in by_direction:
        scores["probe-weights"] = by_direction[f"probe:{inp.probe.name}"]  # the trained probe's own direction
    sources = A.pair_sources(inp.pairs)
    n = len(inp.pairs)
    k = _top_k(cfg, n, inp.bad)
    clusters = None
    if cfg.clusters.enabled and n >= 3:
        clusters = A.cluster_pairs(diffs, scores["probe"], inp.pairs, direction=primary, k=cfg.clusters.k,
                                   k_range=(cfg.clusters.k_min, cfg.clusters.k_max), seed=cfg.seed,
                                   examples=cfg.clusters.examples)
        if inp.bad is not None:
            for c in clusters["clusters"]:
                members = clusters["labels"] == c["cluster"]
                c["bad"] = int((inp.bad & members).sum())
    audit_dirs = list(directions) + (A.cluster_directions(clusters, inp.layer) if clusters else [])
    audit = ranked(audit_table({inp.layer: diffs}, audit_dirs, sources, n_boot=cfg.ranking.bootstrap, seed=cfg.seed))
    A.save_directions(directions + (A.cluster_directions(clusters, inp.layer) if clusters else []),
                      storage.join(cfg.out, "directions"),
                      {"model": inp.model, "arch_hash": A.model_facts(inp.model)["arch_hash"], "layer": inp.layer})

    comparator_info: dict[str, dict] = {}
    if "judge" in cfg.comparators:
        t1 = time.perf_counter()
        scores["judge"] = A.judge_scores(inp.pairs, inp.judge)
        comparator_info["judge"] = {"judge": inp.judge, "seconds": round(time.perf_counter() - t1, 2)}
    for name in ("gradient", "gradient-factorized"):
        if name not in cfg.comparators:
            continue
        gcfg = dataclasses.replace(cfg.gradient, mode="dense" if name == "gradient" else "factorized")
        positives = [r for r in inp.behaviour if float(r["label"]) > 0.5]
        key = json_digest({"model": _model_key(inp.model), "pairs": [(p["prompt"], p["chosen"], p["rejected"])
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
            "sources": sources, "k": k, "clusters": clusters, "audit": audit, "tables": tables,
            "timings": timings, "comparators": comparator_info, "diffs_shape": list(diffs.shape),
            "pair_extraction": feats.how, "torch_threads": torch.get_num_threads()}


def _top_k(cfg: AttributionConfig, n: int, bad: np.ndarray | None) -> int:
    if cfg.ranking.k_from_labels:
        return int(bad.sum())
    if cfg.ranking.top_k is not None:
        return min(cfg.ranking.top_k, n)
    return max(1, int(round(cfg.ranking.top_fraction * n)))


def _model_key(model: str) -> Any:
    from probe_dpo.activations.sharded import _model_stamp

    stamp = _model_stamp(model)
    return stamp or model


def recall_summary(scores: dict[str, np.ndarray], bad: np.ndarray, k: int) -> dict:
    from probe_dpo.attribution import recall_at_k, recall_curve

    out = {}
    ks = sorted({max(1, int(round(f * len(bad)))) for f in np.linspace(0.01, 1.0, 100)} | {k})
    for name, s in scores.items():
        out[name] = {"recall_at_k": recall_at_k(s, bad, k), "k": k, "curve": recall_curve(s, bad, ks)}
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
        for name, s in result["scores"].items():
            if name != "probe":
                row[f"score_{name.replace('-', '_')}"] = float(s[i])
        if result.get("clusters"):
            row["cluster"] = int(result["clusters"]["labels"][i])
        if inp.bad is not None:
            row["poisoned"] = bool(inp.bad[i])
        rows.append(row)
    uri = storage.join(inp.cfg.out, "scores.parquet")
    write_records(rows, uri)
    return uri


# ---------------------------------------------------------------------------------------------
# Mitigations, retraining, evaluation


def write_mitigations(inp: Inputs, result: dict) -> dict[str, dict]:
    """The cleaned pair files: for the probe ranking every configured mitigation, for each other
    retrained ranking filter and swap. Returns ``{arm: {"uri", ...info}}``."""
    from probe_dpo.attribution import flagged_sources, mitigate, write_pairs_like

    cfg = inp.cfg
    arms: dict[str, dict] = {}
    methods = ["probe"] + [m for m in cfg.retrain.methods if m != "probe"] if cfg.retrain.enabled else ["probe"]
    dropped: dict[tuple, str] = {}
    for method in methods:
        for how in cfg.mitigate:
            if how == "drop-sources" and method not in ("probe", "probe-weights"):
                continue
            sources = flagged_sources(result["tables"][method]) if how == "drop-sources" else None
            if how == "drop-sources" and not sources:
                log.info(f"{method}-drop-sources: no source is flagged (none is over-represented in the top-k); skipped")
                arms[f"{method}-{how}"] = {"skipped": "no flagged source", "sources": []}
                continue
            if how == "drop-sources" and tuple(sources) in dropped:
                arms[f"{method}-{how}"] = {"skipped": f"the same sources as {dropped[tuple(sources)]}",
                                           "sources": sources}
                continue
            if how == "drop-sources":
                dropped[tuple(sources)] = f"{method}-{how}"
            records, info = mitigate(inp.pairs, result["scores"][method], how, k=result["k"], sources=sources)
            uri = write_pairs_like(records, storage.join(cfg.out, "mitigated", f"{method}-{how}"), inp.pairs_uri)
            if inp.bad is not None and how != "drop-sources":
                from probe_dpo.attribution import top_k_mask

                top = top_k_mask(result["scores"][method], result["k"])
                info["bad_affected"] = int((top & inp.bad).sum())
            elif inp.bad is not None:
                info["bad_affected"] = int(sum(b for b, s in zip(inp.bad, result["sources"]) if s in set(sources)))
            arms[f"{method}-{how}"] = {"uri": uri, **info}
            log.info(f"mitigation {method}-{how}: {info['pairs_out']} pairs -> {uri}")
    return arms


def train_arm(inp: Inputs, name: str, pairs_uri: str) -> str:
    """Plain DPO (method dpo) of the base model on ``pairs_uri``; returns the policy URI."""
    from probe_dpo.config import load_config
    from probe_dpo.training import TrainConfig, train

    r = inp.cfg.retrain
    out = storage.join(inp.cfg.out, "runs", name)
    overrides = ["method=dpo", f"model={inp.model}", f"data.pairs={pairs_uri}", f"out={out}",
                 f"train.lr={r.lr}", f"train.epochs={r.epochs}", f"dpo.beta={r.beta}",
                 f"train.batch_size={r.batch_size}", f"train.max_length={r.max_length}",
                 f"distributed.workers={r.workers}", f"seed={r.seed}", *r.overrides]
    if inp.cfg.extraction.address:
        overrides.append(f"distributed.address={inp.cfg.extraction.address}")
    cfg = load_config(TrainConfig, None, overrides)
    summary = train(cfg)
    return summary.get("policy", storage.join(out, "policy"))


def _policy_key(model: str) -> Any:
    if storage.is_complete(model):
        return json_digest(storage.read_manifest(model)["files"])
    return _model_key(model)


def evaluate_model(inp: Inputs, name: str, model: str) -> dict:
    """Toxicity of the model's continuations of the (triggered) held-out prompts under every
    judge, and benign perplexity; cached at <out>/eval/<name>.{json,samples.jsonl}."""
    from probe_dpo.data import read_records, write_records
    from probe_dpo.evaluation import ToxicitySamples, perplexity, rate_with_ci, toxicity_samples
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.testbed import generation_settings

    ev = inp.cfg.evaluation
    prompts_uri = ev.prompts or storage.join(inp.cfg.testbed, "data", "prompts_heldout.jsonl")
    ppl_uri = ev.perplexity or storage.join(inp.cfg.testbed, "data", "perplexity.jsonl")
    settings = generation_settings(inp.cfg.testbed)
    key = json_digest({"model": _policy_key(model), "eval": dataclasses.asdict(ev), "trigger": inp.trigger,
                        "settings": settings.to_dict(), "prompts": prompts_uri, "ppl": ppl_uri})
    meta_uri = storage.join(inp.cfg.out, "eval", f"{name}.json")
    samples_uri = storage.join(inp.cfg.out, "eval", f"{name}.samples.jsonl")
    if storage.exists(meta_uri) and storage.exists(samples_uri):
        meta = storage.read_json(meta_uri)
        if meta.get("key") == key:
            samples = ToxicitySamples.from_records(read_records(samples_uri), meta.get("settings"), ev.seed)
            return {**meta, "samples": samples}
    prompts = read_records(prompts_uri, required=("prompt",), non_empty=("prompt",), what="evaluation prompts")
    if ev.max_prompts:
        prompts = prompts[: ev.max_prompts]
    texts = [str(p["prompt"]) + inp.trigger for p in prompts]
    passages = read_records(ppl_uri, required=("text",), non_empty=("text",), what="perplexity texts")
    t0 = time.perf_counter()
    lm, tok = load_model(model), load_tokenizer(model)
    samples = toxicity_samples(lm, texts, ev.judges, ev.samples_per_prompt, settings, ev.seed, tokenizer=tok,
                               progress=False, desc=f"eval {name}")
    ppl = perplexity(lm, [p["text"] for p in passages], max_tokens=ev.perplexity_tokens, tokenizer=tok)
    rates = {j: rate_with_ci(s, ev.threshold, ev.bootstrap, ev.seed) for j, s in samples.scores.items()}
    meta = {"key": key, "name": name, "model": model, "rates": rates, "perplexity": ppl, "prompts": len(texts),
            "trigger": inp.trigger, "settings": settings.to_dict(), "seconds": round(time.perf_counter() - t0, 2)}
    write_records(samples.to_records(), samples_uri)
    storage.write_json(meta_uri, meta)
    log.info(f"eval {name}: " + ", ".join(f"{j} {r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                                     for j, r in rates.items()) + f"; perplexity {ppl:.2f}")
    return {**meta, "samples": samples}


def retrain_and_evaluate(inp: Inputs, arms: dict[str, dict]) -> dict:
    """Base, raw-mix DPO and every mitigated arm: toxicity, perplexity, share of the rise removed."""
    from probe_dpo.attribution import share_of_rise_removed

    ev = inp.cfg.evaluation
    results: dict[str, dict] = {"base": evaluate_model(inp, "base", inp.model)}
    todo = {"raw": inp.pairs_uri, **{a: v["uri"] for a, v in arms.items() if "uri" in v}}
    for name, uri in todo.items():
        t0 = time.perf_counter()
        policy = train_arm(inp, name, uri)
        train_s = time.perf_counter() - t0
        results[name] = evaluate_model(inp, name, policy)
        results[name]["train_seconds"] = round(train_s, 1)
    base, raw = results["base"], results["raw"]
    summary: dict[str, Any] = {"arms": {}, "judges": list(ev.judges)}
    for name, res in results.items():
        entry = {"rates": res["rates"], "perplexity": res["perplexity"],
                 "perplexity_change_vs_base": res["perplexity"] / base["perplexity"] - 1.0,
                 "perplexity_change_vs_raw": res["perplexity"] / raw["perplexity"] - 1.0,
                 "model": res["model"]}
        if name not in ("base", "raw"):
            entry["share_removed"] = {j: share_of_rise_removed(base["samples"].scores[j], raw["samples"].scores[j],
                                                               res["samples"].scores[j], threshold=ev.threshold,
                                                               n_boot=ev.bootstrap, seed=ev.seed)
                                      for j in ev.judges}
            entry.update({k: v for k, v in arms[name].items() if k != "uri"})
        summary["arms"][name] = entry
    for j in ev.judges:
        rise = share_of_rise_removed(base["samples"].scores[j], raw["samples"].scores[j], base["samples"].scores[j],
                                     threshold=ev.threshold, n_boot=ev.bootstrap, seed=ev.seed)
        summary.setdefault("rise", {})[j] = {"rate_base": rise["rate_base"], "rate_raw": rise["rate_raw"],
                                             "rise": rise["rise"]}
    return summary


# ---------------------------------------------------------------------------------------------
# Report


def method_labels(inp: Inputs, result: dict) -> dict[str, str]:
    """What each ranking method is, for tables."""
    out = {"probe": f"probe ({result['primary'].name})", "judge": f"judge ({inp.judge})",
           "gradient": "gradient (LESS-style, dense projection)",
           "gradient-factorized": "gradient (LoGra-style, factorized projection)"}
    if inp.probe is not None:
        out["probe-weights"] = f"probe weights (probe:{inp.probe.name})"
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
        rep.table(["method", f"recall@{result['k']}", "top source (mean score)"],
                  [[labels.get(m, m), fmt(v["recall_at_k"]),
                    f"{result['tables'][m][0]['source']} ({fmt(result['tables'][m][0]['mean_score'])})"]
                   for m, v in recall.items()])
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for m, v in recall.items():
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
        rep.table(["cluster", "size", "mean score [95% CI]", "silhouette", "coherence", "cos(centroid, v_b)",
                   "sources"] + (["bad"] if inp.bad is not None else []),
                  [[c["cluster"], c["size"], fmt_ci(c["mean_score"], c["ci_low"], c["ci_high"]), fmt(c["silhouette"]),
                    fmt(c["coherence"]), fmt(c.get("direction_cosine")),
                    ", ".join(f"{k} {v}" for k, v in c["sources"].items())] + ([c.get("bad")] if inp.bad is not None
                                                                              else [])
                   for c in cl["clusters"]])
        for c in cl["clusters"]:
            if c["examples"]:
                ex = c["examples"][0]
                rep.text(f"- cluster {c['cluster']} example ({ex['source']}): prompt `{ex['prompt'][:80]}` · "
                         f"chosen `{ex['chosen'][:70]}` · rejected `{ex['rejected'][:70]}`")

    rep.heading("Concept audit")
    rep.table(["direction", "scope", "pairs", "Δ [95% CI]", "d", "split-half", "push"],
              [[r["direction"], r["scope"], r["pairs"], fmt_ci(r["delta"], r["ci_low"], r["ci_high"], 4), fmt(r["d"]),
                fmt(r["split_half"], 2), r["direction_of_push"]] for r in result["audit"]],
              caption="Mean projection of (chosen − rejected) on each direction, overall and per source")

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
                sr = entry.get("share_removed", {}).get(j)
                row.append(fmt_ci(sr["share"], sr["ci_low"], sr["ci_high"]) if sr else "-")
            row += [fmt(entry["perplexity"], 2), fmt(100 * entry["perplexity_change_vs_raw"], 1) + "%"]
            rows.append(row)
        trig = f" (prompts + trigger `{inp.trigger.strip()}`)" if inp.trigger else ""
        rep.table(["arm"] + [f"toxic rate, {j}" for j in judges] + [f"share of rise removed, {j}" for j in judges]
                  + ["perplexity", "ppl vs raw"], rows,
                  caption=f"Held-out prompts{trig}; 95% CIs by a (paired) bootstrap over prompts")
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


# ---------------------------------------------------------------------------------------------
# The whole run


def _absolute(cfg: AttributionConfig) -> AttributionConfig:
    """Local paths made absolute: Ray workers (training, extraction) run in other folders. An
    input is rewritten only when it exists here, so a hub id (``org/model``, a dataset id) stays."""
    return storage.absolute_paths(cfg, ("pairs", "model", "probes", "testbed", "behaviour_data", "poison_labels",
                                        "evaluation.prompts", "evaluation.perplexity"), outputs=("out",))


def run(cfg: AttributionConfig) -> dict:
    t_start = time.perf_counter()
    cfg = _absolute(cfg)
    inp = prepare(cfg)
    log.info(f"{len(inp.pairs)} pairs from {inp.pairs_uri}; model {inp.model}; layer {inp.layer}; out {cfg.out}")
    result = score_all(inp)
    scores_uri = write_scores(inp, result)
    recall = recall_summary(result["scores"], inp.bad, result["k"]) if inp.bad is not None else None
    if recall:
        log.info("recall@k (k = %d): " % result["k"] + ", ".join(f"{m} {v['recall_at_k']:.3f}" for m, v in recall.items()))
    storage.write_json(storage.join(cfg.out, "sources.json"), result["tables"])
    if result["clusters"]:
        storage.write_json(storage.join(cfg.out, "clusters.json"),
                           {k: v for k, v in result["clusters"].items() if k not in ("labels", "centroids")})
    storage.write_json(storage.join(cfg.out, "audit.json"), result["audit"])
    arms = write_mitigations(inp, result) if cfg.mitigate else {}
    retrain = None
    if cfg.retrain.enabled:
        retrain = retrain_and_evaluate(inp, arms)
    rep = build_report(inp, result, recall, arms, retrain)
    report = rep.publish(cfg.out)
    summary = {
        "config": to_dict(cfg), "pairs": inp.pairs_uri, "model": inp.model, "layer": inp.layer,
        "direction": result["primary"].name, "k": result["k"], "scores": scores_uri,
        "method_labels": method_labels(inp, result),
        "sources": result["tables"], "recall": {m: v["recall_at_k"] for m, v in (recall or {}).items()},
        "recall_curves": {m: v["curve"] for m, v in (recall or {}).items()},
        "timings": result["timings"], "comparators": result["comparators"],
        "clusters": {k: v for k, v in (result["clusters"] or {}).items() if k not in ("labels", "centroids")},
        "audit": result["audit"], "mitigations": arms, "retrain": retrain, "report": report,
        "mix": {k: v for k, v in (inp.mix or {}).items() if k not in ("config",)} or None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    storage.write_json(storage.join(cfg.out, "results.json"), summary)
    log.info(f"done in {summary['seconds']:.0f}s: results {storage.join(cfg.out, 'results.json')}, report {report['html']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m probe_dpo.workflows.attribution [--config FILE] [key=value ...]`` (what a Ray job runs)."""
    setup_logs()
    from probe_dpo.config import load_config

    parser = argparse.ArgumentParser(prog="python -m probe_dpo.workflows.attribution", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file, or the bundled study by name: attribution")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        run(load_config(AttributionConfig, bundled_config(args.config), args.overrides))
    except UserError as exc:
        print(f"probe-dpo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
