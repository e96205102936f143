"""Training probe sets from labelled generations: the per-layer sweep, train and held-out
probes, their metrics and report; cross-fitted scores; measuring saved probes on a model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from probe_dpo.config import bounded
from probe_dpo.data import chat_value, whole_text
from probe_dpo.errors import UserError
from probe_dpo.probes.crossfit import group_folds
from probe_dpo.probes.fit import DEFAULT_C_GRID, FitResult, fit_probe
from probe_dpo.probes.probe import LinearProbe, ProbeSet
from probe_dpo.probes.report import auroc_subset, probe_baselines, report_markdown
from probe_dpo.stats import as_numpy as _np
from probe_dpo.stats import binary_metrics, roc_auc, threshold_at_fpr
from probe_dpo.storage import json_text

log = logging.getLogger(__name__)

@dataclass
class TrainProbeSpec:
    """The probes fine-tuning trains against."""

    kind: Literal["single", "layers", "seeds", "bootstrap", "subsets"] = "single"
    """single: one probe; layers: one per layer; seeds: one per re-split of train+val by prompt;
    bootstrap: one per bootstrap resample of the training rows; subsets: one per disjoint
    share of the training prompts (members that never saw each other's data)."""
    layer: int | None = None
    """Layer for single/seeds/bootstrap/subsets (None: the best layer by validation AUROC)."""
    layers: list[int] = field(default_factory=list)
    """Layers for kind=layers (empty: ``layer``, when set, and the best others by validation
    AUROC, n in all)."""
    n: int = bounded(5, ge=1, le=100)
    """Probes in the ensemble (layers, seeds, bootstrap, subsets)."""
    aggregation: Literal["mean", "max"] = "mean"
    """How the train probes' probabilities combine."""


@dataclass
class HeldOutSpec:
    """Probes that fine-tuning never sees (to measure whether detection really dropped)."""

    layers: list[int] | None = None
    """Held-out layers (None: every extracted layer that no training probe reads)."""
    data_fraction: float = bounded(0.0, ge=0.0, lt=1.0)
    """Share of training prompts reserved for held-out probes at the training layer(s);
    training probes never see them (0: no reserve)."""


@dataclass
class ProbeTrainConfig:
    layers: list[int] = field(default_factory=list)
    """Layers to extract (negative counts from the end; empty: every layer)."""
    pooling: Literal["mean", "last"] = "mean"
    """How a span's token states become one vector."""
    span: Literal["response", "all"] = "response"
    """response: pool over the completion's tokens only (needs prompt and completion columns)."""
    label_column: str = "label"
    """The column holding 0/1 labels."""
    train_probe: TrainProbeSpec = field(default_factory=TrainProbeSpec)
    """The probes fine-tuning trains against."""
    held_out: HeldOutSpec = field(default_factory=HeldOutSpec)
    """Probes fine-tuning never sees."""
    c_grid: list[float] = field(default_factory=lambda: list(DEFAULT_C_GRID))
    """Inverse L2 strengths tried (C, scikit-learn's convention), chosen by validation AUROC."""
    fpr: float = bounded(0.05, gt=0.0, lt=1.0)
    """False-positive rate (on validation negatives) that fixes each probe's threshold."""
    batch_size: int = bounded(32, ge=1)
    """Sequences per extraction forward pass."""
    max_length: int = bounded(256, ge=1)
    """Tokens kept per row (prompt + completion, cut on the left)."""
    seed: int = bounded(0, ge=0)
    """Seeds data splits and resamples."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where extraction and fitting run (auto: a GPU when there is one)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The model's dtype during extraction (the probe math is float32)."""
    actors: int = bounded(0, ge=0)
    """0: extract in this process; N: N Ray actors (extract_sharded)."""
    address: str | None = None
    """Ray address for actors > 0 (None: a local Ray)."""
    activations: str | None = None
    """Where sharded activations are kept (actors > 0; default: a temporary folder)."""
    threads: int | None = bounded(None, ge=1)
    """torch threads in this process (None: leave as is)."""


@dataclass
class ProbeTrainResult:
    probeset: ProbeSet
    report: dict
    markdown: str
    features: dict[str, dict[int, torch.Tensor]] | None = None
    """With ``keep_features``: the extracted features by split and layer (what a caller that
    scores the same rows, e.g. ranking candidate completions, would otherwise extract again)."""


def _columns_for(cfg: ProbeTrainConfig) -> tuple[str, ...]:
    return ("prompt", "completion") if cfg.span == "response" else ()


def read_split(uri: str, cfg: ProbeTrainConfig, what: str) -> list[dict]:
    from probe_dpo.data import check_labels, read_records

    required = (*_columns_for(cfg), cfg.label_column)
    records = read_records(uri, required=required if cfg.span == "response" else (cfg.label_column,),
                           what=what)
    if cfg.span == "all" and not all(("text" in r) or ("messages" in r) or ("prompt" in r and "completion" in r)
                                     for r in records):
        raise UserError(f"{uri}: missing column 'text' (or 'messages', or 'prompt' and 'completion') for span 'all'")
    check_labels(records, cfg.label_column, what=f"{what} {uri}")
    for row, r in enumerate(records, start=1):
        value = r[cfg.label_column]
        if value not in (0, 1, True, False, 0.0, 1.0):
            raise UserError(f"{what} {uri}: row {row}: column '{cfg.label_column}' must be 0/1, got {value!r}")
    return records


def _inputs(records: list[dict], cfg: ProbeTrainConfig) -> dict[str, list[str]]:
    if cfg.span == "response":
        return {"prompts": [chat_value(r["prompt"]) for r in records],
                "completions": [chat_value(r.get("completion")) for r in records]}
    return {"texts": [whole_text(r)
                      for r in records]}


def labels_of(records: list[dict], cfg: ProbeTrainConfig) -> np.ndarray:
    return np.array([int(float(r[cfg.label_column]) > 0.5) for r in records], dtype=np.int64)


def extract_records(model_path: str, model, tokenizer, records: list[dict], layers: list[int], *,
                    pooling: str, span: str, batch_size: int, max_length: int, pool: Any = None,
                    activations: str | None = None, name: str = "data",
                    dtype: str = "float32") -> dict[int, torch.Tensor]:
    """Pooled features of labelled records: in this process, or on a Ray ``ExtractorPool``.

    With a pool the shards go to ``activations/name``, so a restarted run skips the shards it
    already has (without ``activations``, to a temporary folder removed afterwards).
    """
    from probe_dpo.activations import extract, extract_sharded, shards_folder

    cols = _inputs(records, ProbeTrainConfig(span=span))  # type: ignore[arg-type]
    if pool is None:
        return extract(model, tokenizer, layers=layers, pooling=pooling, span=span, batch_size=batch_size,
                       max_length=max_length, **cols)
    from probe_dpo import storage

    with shards_folder(activations) as where:
        return extract_sharded(model_path, storage.join(where, name), layers=layers, pooling=pooling, span=span,
                               batch_size=batch_size, max_length=max_length, pool=pool, dtype=dtype,
                               shard_size=max(64, batch_size * 8), **cols)


def _group_ids(records: list[dict]) -> list[Any]:
    return [r.get("prompt_id", r.get("prompt", i)) for i, r in enumerate(records)]


def _split_groups(groups: list[Any], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (rest, chosen) with ``fraction`` of the distinct groups chosen at random."""
    unique = sorted(set(map(str, groups)))
    rng = random.Random(seed)
    rng.shuffle(unique)
    k = max(1, int(round(fraction * len(unique))))
    chosen = set(unique[:k])
    mask = np.array([str(g) in chosen for g in groups])
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def train_probes(cfg: ProbeTrainConfig, *, testbed: str | None = None, model: str | None = None,
                 train: str | None = None, val: str | None = None, test: str | None = None,
                 out: str | None = None, keep_features: bool = False) -> ProbeTrainResult:
    """Extract features, fit the per-layer sweep, the training and held-out probes; report; save.

    Data come from a testbed folder (``model/`` and ``data/probe_{train,val,test}.jsonl``) or
    explicit ``model`` / ``train`` / ``val`` / ``test`` paths (``test`` is optional).
    """
    from probe_dpo.data import content_hash
    from probe_dpo.model import (
        arch_hash,
        hidden_size,
        load_model,
        load_tokenizer,
        model_hash,
        num_layers,
        resolve_layers,
    )

    t_start = time.perf_counter()
    model, files, info = _input_files(testbed, model, train, val, test)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = {name: read_split(uri, cfg, f"probe-{name} data") for name, uri in files.items()}
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    lm = load_model(model, dtype=cfg.dtype, device=device)
    tok = load_tokenizer(model)
    layers = resolve_layers(lm, cfg.layers) if cfg.layers else list(range(num_layers(lm)))
    m_hash, a_hash, width = model_hash(lm), arch_hash(lm), hidden_size(lm)
    spec = cfg.train_probe
    spec_layer = _in_layers(lm, spec.layer, layers, "train_probe.layer") if spec.layer is not None else None
    spec_layers = [_in_layers(lm, L, layers, "train_probe.layers") for L in spec.layers]
    held_layers = None if cfg.held_out.layers is None else \
        [_in_layers(lm, L, layers, "held_out.layers") for L in cfg.held_out.layers]
    labels = {k: labels_of(v, cfg) for k, v in splits.items()}
    feats = _extract_splits(cfg, model, lm, tok, splits, layers)
    del lm
    data_hashes = {k: content_hash(v, [*_columns_for(cfg), "text", cfg.label_column]) for k, v in splits.items()}
    base_card = {"pooling": cfg.pooling, "span": cfg.span, "label_column": cfg.label_column,
                 "standardization": "z-score with the probe's own training rows' mean and std",
                 "model_hash": m_hash, "arch_hash": a_hash, "model": str(model), "hidden_size": width,
                 "max_length": cfg.max_length, "c_grid": list(cfg.c_grid), "fpr": cfg.fpr,
                 "data_hash": data_hashes["train"], "val_data_hash": data_hashes["val"]}

    train_rows = np.arange(len(splits["train"]))
    reserve_rows = np.array([], dtype=np.int64)
    if cfg.held_out.data_fraction > 0:
        train_rows, reserve_rows = _split_groups(_group_ids(splits["train"]), cfg.held_out.data_fraction, cfg.seed)
    fit = _Fitter(feats, labels, cfg.c_grid, device)

    # 1. the per-layer sweep (on the rows training probes may use)
    sweep = {layer: fit(layer, train_rows if len(reserve_rows) else None) for layer in layers}
    ranked = sorted(layers, key=lambda L: (-_nan_low(sweep[L].val_auroc), L))
    log.info("probes: per-layer sweep done (best layer by val AUROC: " + ", ".join(
        f"L{L}={sweep[L].val_auroc:.3f}" for L in ranked[:3]) + ")")
    # 2. training probes, 3. held-out probes
    made, train_layers = _train_role_probes(cfg, fit, splits, sweep, ranked, spec_layer, spec_layers, train_rows,
                                            reserve_rows, base_card)
    made += _held_out_probes(cfg, fit, sweep, layers, held_layers, train_layers, reserve_rows, base_card)

    # 4. metrics
    genre = {k: np.array([r.get("genre") == "toxic-prompt" for r in v]) for k, v in splits.items()}
    has_genre = all("genre" in r for v in splits.values() for r in v)
    rows_out = []
    for probe, res, extra in made:
        metrics = _probe_metrics(probe, res, feats, labels, genre if has_genre else None, cfg.fpr)
        probe.card.update({"l2": res.l2, "c": res.c, "c_path": res.path, "n_train": res.n_train, "train_positives": res.positives, **extra,
                           "threshold": metrics.pop("threshold"), "metrics": metrics, "fit_seconds": res.seconds})
        rows_out.append(_row(probe, res, metrics))
    probeset = ProbeSet([p for p, _, _ in made], aggregation=spec.aggregation,
                        meta={"model_hash": m_hash, "arch_hash": a_hash, "model": str(model), "hidden_size": width,
                              "num_layers_extracted": layers, "data_hashes": data_hashes,
                              "config": dataclasses.asdict(cfg)})
    # the train role's own threshold (its aggregated score at the same validation FPR as every
    # probe's): what a monitor built from the whole ensemble would flag at
    probeset.meta["train_threshold"] = threshold_at_fpr(_np(probeset.score(feats["val"], "train")), labels["val"],
                                                        cfg.fpr)
    ensemble = None
    if len(probeset.train_probes) > 1:
        ensemble = {}
        for split in splits:
            p = _np(probeset.score(feats[split], "train"))
            ensemble[split] = roc_auc(p, labels[split])
            if has_genre and split == "test":
                ensemble["test_toxic_prompts"] = auroc_subset(p, labels[split], genre[split])

    # 5. baselines and report
    baselines = probe_baselines(splits, labels, genre if has_genre else None, info)
    report = {"model": str(model), "model_hash": m_hash, "testbed": testbed, "layers": layers,
              "pooling": cfg.pooling, "span": cfg.span, "fpr": cfg.fpr, "c_grid": list(cfg.c_grid),
              "sizes": {k: {"rows": len(v), "positives": int(labels[k].sum()),
                            "toxic_prompt_rows": int(genre[k].sum()) if has_genre else None}
                        for k, v in splits.items()},
              "train_probe": dataclasses.asdict(spec), "aggregation": spec.aggregation,
              "best_layer": ranked[0], "probes": rows_out, "train_ensemble": ensemble, "baselines": baselines,
              "sweep": {str(L): {"val_auroc": sweep[L].val_auroc, "c": sweep[L].c} for L in layers},
              "seconds": round(time.perf_counter() - t_start, 2)}
    markdown = report_markdown(report)
    if out is not None:
        probeset.save(out, extra_files={"report.json": json_text(report),
                                        "report.md": markdown})
    return ProbeTrainResult(probeset, report, markdown, feats if keep_features else None)


def _input_files(testbed: str | None, model: str | None, train: str | None, val: str | None,
                 test: str | None) -> tuple[str, dict[str, str], dict]:
    """The model and the split files (a testbed's unless given), and the testbed's summary."""
    from probe_dpo import storage

    info: dict[str, Any] = {}
    if testbed is not None:
        from probe_dpo.testbed.layout import TestbedPaths

        paths = TestbedPaths(testbed)
        model = model or paths.model
        train = train or paths.data("probe_train")
        val = val or paths.data("probe_val")
        test = test or paths.data("probe_test")
        if storage.exists(paths.info):
            info = storage.read_json(paths.info)
    if model is None or train is None or val is None:
        raise UserError("give a testbed folder, or a model and train and val data")
    return model, {"train": train, "val": val, **({"test": test} if test is not None else {})}, info


def _extract_splits(cfg: ProbeTrainConfig, model: str, lm: Any, tok: Any, splits: dict[str, list[dict]],
                    layers: list[int]) -> dict[str, dict[int, torch.Tensor]]:
    """Each split's pooled activations at ``layers`` (in this process, or on ``cfg.actors`` Ray actors)."""
    feats: dict[str, dict[int, torch.Tensor]] = {}
    pool = None
    if cfg.actors > 0:
        from probe_dpo.activations import ExtractorPool

        pool = ExtractorPool(str(model), actors=cfg.actors, address=cfg.address, dtype=cfg.dtype,
                             threads_per_actor=max(1, (cfg.threads or torch.get_num_threads()) // cfg.actors))
    try:
        for name, records in splits.items():
            t0 = time.perf_counter()
            feats[name] = extract_records(model, lm, tok, records, layers, pooling=cfg.pooling, span=cfg.span,
                                          batch_size=cfg.batch_size, max_length=cfg.max_length, pool=pool,
                                          activations=cfg.activations, name=name, dtype=cfg.dtype)
            log.info(f"probes: extracted {len(records)} {name} rows x {len(layers)} layers in "
                f"{time.perf_counter() - t0:.1f}s")
    finally:
        if pool is not None:
            pool.close()
    return feats


@dataclass(frozen=True)
class _Fitter:
    """Fits one probe at a layer: on the training rows (``rows`` of them), validated on val; or on
    given ``xs`` = (x_train, y_train, x_val, y_val)."""

    feats: dict[str, dict[int, torch.Tensor]]
    labels: dict[str, np.ndarray]
    c_grid: Any
    device: str

    def __call__(self, layer: int, rows: np.ndarray | None = None, xs: tuple | None = None) -> FitResult:
        if xs is None:
            x_tr, y_tr = self.feats["train"][layer], self.labels["train"]
            if rows is not None:
                x_tr, y_tr = x_tr[torch.as_tensor(rows)], y_tr[rows]
            xs = (x_tr, y_tr, self.feats["val"][layer], self.labels["val"])
        if len(set(xs[1].tolist())) < 2:
            raise UserError(f"a probe's training subset at layer {layer} has a single class: use more data "
                            f"or a smaller held_out.data_fraction")
        return fit_probe(xs[0], xs[1], xs[2], xs[3], self.c_grid, device=self.device)


def _train_role_probes(cfg: ProbeTrainConfig, fit: _Fitter, splits: dict, sweep: dict, ranked: list[int],
                       spec_layer: int | None, spec_layers: list[int], train_rows: np.ndarray,
                       reserve_rows: np.ndarray, base_card: dict) -> tuple[list[tuple], list[int]]:
    """The probes of role train, as ``train_probe.kind`` makes them (one, several layers, seeds,
    disjoint shares or bootstrap resamples), with the layers they read."""
    spec = cfg.train_probe
    made: list[tuple[LinearProbe, FitResult, dict]] = []
    best_layer = spec_layer if spec_layer is not None else ranked[0]
    if spec.kind == "single":
        made.append((_probe(sweep[best_layer], best_layer, f"train-L{best_layer}", "train", base_card),
                     sweep[best_layer], {"subset": "all" if not len(reserve_rows) else "train-share"}))
        return made, [best_layer]
    if spec.kind == "layers":
        # explicit layers; else the n best, with the fixed layer (when one is set) always among them
        first = [spec_layer] if spec_layer is not None else []
        train_layers = spec_layers or first + [L for L in ranked if L not in first][:spec.n - len(first)]
        for L in train_layers:
            made.append((_probe(sweep[L], L, f"train-L{L}", "train", base_card), sweep[L], {"subset": "all"}))
        return made, train_layers
    if spec.kind == "seeds":
        feats, labels = fit.feats, fit.labels
        pool_x = torch.cat([feats["train"][best_layer][torch.as_tensor(train_rows)], feats["val"][best_layer]])
        pool_y = np.concatenate([labels["train"][train_rows], labels["val"]])
        groups = [_group_ids(splits["train"])[i] for i in train_rows] + _group_ids(splits["val"])
        frac = len(splits["val"]) / (len(train_rows) + len(splits["val"]))
        for s in range(spec.n):
            tr, va = _split_groups(groups, frac, cfg.seed + 1000 + s)
            res = fit(best_layer, xs=(pool_x[torch.as_tensor(tr)], pool_y[tr], pool_x[torch.as_tensor(va)], pool_y[va]))
            made.append((_probe(res, best_layer, f"train-L{best_layer}-seed{s}", "train", base_card), res,
                         {"subset": f"train+val re-split by prompt, seed {cfg.seed + 1000 + s}"}))
    elif spec.kind == "subsets":
        folds = group_folds([_group_ids(splits["train"])[i] for i in train_rows], spec.n, cfg.seed + 3000)
        for s in range(spec.n):
            res = fit(best_layer, train_rows[folds == s])
            made.append((_probe(res, best_layer, f"train-L{best_layer}-part{s}", "train", base_card), res,
                         {"subset": f"disjoint share {s + 1} of {spec.n} of the training prompts "
                                    f"(seed {cfg.seed + 3000})"}))
    else:  # bootstrap
        rng = np.random.default_rng(cfg.seed + 2000)
        for s in range(spec.n):
            rows = rng.choice(train_rows, size=len(train_rows), replace=True)
            res = fit(best_layer, rows)
            made.append((_probe(res, best_layer, f"train-L{best_layer}-boot{s}", "train", base_card), res,
                         {"subset": f"bootstrap resample {s} of the training rows (seed {cfg.seed + 2000})"}))
    return made, [best_layer]


def _held_out_probes(cfg: ProbeTrainConfig, fit: _Fitter, sweep: dict, layers: list[int],
                     held_layers: list[int] | None, train_layers: list[int], reserve_rows: np.ndarray,
                     base_card: dict) -> list[tuple]:
    """The probes of role held_out: other layers' sweep probes and, with reserved prompts, probes at
    the train layers fitted on prompts the train probes never saw."""
    made = []
    held = held_layers if held_layers is not None else [L for L in layers if L not in train_layers]
    for L in held:
        if L in train_layers and not len(reserve_rows):
            continue  # the same layer on the same data is not held out
        made.append((_probe(sweep[L], L, f"heldout-L{L}", "held_out", base_card), sweep[L], {"subset": "all"}))
    if len(reserve_rows):
        for L in train_layers:
            res = fit(L, reserve_rows)
            made.append((_probe(res, L, f"heldout-data-L{L}", "held_out", base_card), res,
                         {"subset": f"reserved {cfg.held_out.data_fraction:.0%} of training prompts"}))
    return made


def _in_layers(model, layer: int, layers: list[int], key: str) -> int:
    from probe_dpo.model import resolve_layer

    resolved = resolve_layer(model, layer)
    if resolved not in layers:
        raise UserError(f"config key {key}: layer {layer} is not among the extracted layers {layers} "
                        f"(config key layers)")
    return resolved


def _nan_low(x: float) -> float:
    return -1.0 if math.isnan(x) else x


def _probe(res: FitResult, layer: int, name: str, role: str, base_card: dict) -> LinearProbe:
    return LinearProbe.from_fit(res, layer=layer, pooling=base_card["pooling"], span=base_card["span"],
                                name=name, role=role, card={k: v for k, v in base_card.items()
                                                            if k not in ("pooling", "span", "hidden_size")})


def _probe_metrics(probe: LinearProbe, res: FitResult, feats, labels, genre, fpr: float) -> dict:
    probs = {k: _np(probe.prob(feats[k][probe.layer])) for k in feats}
    threshold = threshold_at_fpr(probs["val"], labels["val"], fpr)
    out: dict[str, Any] = {"threshold": threshold}
    for split, p in probs.items():
        out[split] = binary_metrics(p, labels[split], threshold)
    if genre is not None and "test" in probs:
        mask = genre["test"]
        out["test_toxic_prompts"] = binary_metrics(probs["test"][mask], labels["test"][mask], threshold)
    return out


def _row(probe: LinearProbe, res: FitResult, metrics: dict) -> dict:
    def get(split, key):
        return metrics.get(split, {}).get(key)

    return {"name": probe.name, "role": probe.role, "layer": probe.layer, "c": res.c,
            "train_auroc": get("train", "auroc"), "val_auroc": get("val", "auroc"), "test_auroc": get("test", "auroc"),
            "test_toxic_prompts_auroc": get("test_toxic_prompts", "auroc"),
            "test_accuracy": get("test", "accuracy"), "test_tpr_at_fpr": get("test", "tpr"),
            "test_fpr": get("test", "fpr")}

