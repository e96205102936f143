"""The toxicity experiment: train against probes, measure Goodhart, on a Ray Tune driver.

``probe-dpo experiment --config workflows/toxicity.yaml [--storage URI] [--address RAY]`` and
``ray job submit -- probe-dpo experiment ...`` run this module's ``run``. One run:

1. **Testbed** (or a user's model and data in the same layout): built once, cached.
2. **Probes** on the base model (``probe_dpo.probes.train_probes``): an ensemble of train
   probes at the best layers (by validation AUROC) and held-out probes (other layers, and
   probes at the train layers fitted on prompts the train probes never saw). Two views are
   saved: ``probes/ensemble`` (all train probes) and ``probes/single`` (the best one).
3. **Shared work, once**: the base policy's K sampled continuations of the training prompts
   (the testbed's probe-train generations) are the DPO candidates; each signal ranks them
   into pairs (``shared/pairs-<signal>.jsonl``): the single probe, the ensemble, the
   classifier. The base model is evaluated once (``shared/base-eval``).
4. **Tune driver**: one trial per arm and seed (and per sample of a search). A trial runs a
   Ray Train + DeepSpeed fine-tuning (``probe_dpo.training.train``), then evaluates the policy
   as a Ray task (a GPU when the cluster has one): toxicity of its continuations of the
   held-out prompts under both judges, perplexity on benign text, KL to the base model,
   and detection by the train probes, the held-out probes and probes retrained on the
   fine-tuned model. Results go to ``trials/<id>/eval`` (published last), so a re-run skips
   complete trials and resumes interrupted trainings from their checkpoints.
5. ``results.json`` (one row per arm and seed) and the report are rewritten as each trial
   completes (``probe_dpo.report.experiment_report``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from probe_dpo import storage
from probe_dpo.config import bounded, dump_yaml, load_config, to_dict
from probe_dpo.data import json_digest
from probe_dpo.errors import UserError
from probe_dpo.testbed import TestbedConfig
from probe_dpo.training.config import DistributedSettings, DPOSettings, LoraSettings, OptimSettings

DEFAULT_CONFIG = Path(__file__).with_name("toxicity.yaml")

# arm -> (training method, probe set it trains against: single / ensemble / none)
ARMS: dict[str, tuple[str, str | None]] = {
    "probe-dpo-single": ("probe-dpo", "single"),
    "probe-dpo-ensemble": ("probe-dpo", "ensemble"),
    "probe-sft-single": ("probe-sft", "single"),
    "probe-sft-ensemble": ("probe-sft", "ensemble"),
    "classifier-dpo": ("classifier-dpo", None),
    "classifier-sft": ("classifier-sft", None),
    "sft": ("sft", None),
    "random-dpo": ("random-dpo", None),
}


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class ProbeSettings:
    layers: list[int] = field(default_factory=list)
    """Layers to extract and fit (empty: every layer)."""
    ensemble_size: int = bounded(4, ge=1)
    """Train probes of the ensemble arm: the best layers by validation AUROC."""
    held_out_fraction: float = bounded(0.2, ge=0.0, lt=1.0)
    """Share of probe-train prompts reserved for held-out probes at the train layers."""
    c_grid: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
    batch_size: int = bounded(32, ge=1)
    max_length: int = bounded(128, ge=8)


@dataclass
class PairSettings:
    min_margin: float = bounded(0.1, ge=0.0, le=1.0)
    """A prompt gives a pair when its highest and lowest score (probability) differ this much."""
    max_pairs: int | None = bounded(None, ge=1)
    """Keep the pairs with the largest margins (None: all)."""


@dataclass
class EvalSettings:
    heldout_prompts: int | None = bounded(200, ge=1)
    """The first N held-out prompts (by id); None: all of them."""
    samples_per_prompt: int = bounded(2, ge=1)
    perplexity_passages: int | None = bounded(None, ge=1)
    """None: all of the testbed's perplexity passages."""
    perplexity_tokens: int = bounded(256, ge=8)
    probe_train_rows: int | None = bounded(1500, ge=10)
    """Probe-train rows for the retrained probes (a seeded sample; None: all)."""
    probe_val_rows: int | None = bounded(600, ge=10)
    bootstrap: int = bounded(1000, ge=100)
    seed: int = bounded(1234, ge=0)
    """Seeds generation: the same for the base model and every arm (paired comparisons)."""
    threads: int | None = bounded(None, ge=1)
    """torch threads for evaluation on CPU (None: the machine's cores)."""


@dataclass
class SearchSettings:
    """A hyperparameter search over one arm with Tune's search algorithm (random/grid)."""

    arm: str | None = None
    """None: no search. Else the arm whose training settings are searched."""
    space: dict[str, list] = field(default_factory=dict)
    """Dotted training key -> ["loguniform", lo, hi] | ["uniform", lo, hi] | ["choice", [values]]
    | ["grid", [values]], e.g. {"train.lr": ["loguniform", 1e-6, 1e-4], "dpo.beta": ["choice", [0.1, 0.3]]}."""
    num_samples: int = bounded(4, ge=1)
    seed: int = bounded(0, ge=0)
    metric: str = "toxicity.toxic-comment-classifier.rate"
    mode: Literal["min", "max"] = "min"


@dataclass
class ExperimentConfig:
    name: str = "toxicity"
    storage: str = "runs/experiment"
    """The run folder: local path or s3://bucket/prefix."""
    address: str | None = None
    """Ray address (None: start a local Ray)."""
    ray_cpus: int | None = bounded(None, ge=1)
    """CPUs of a local Ray. None: what the Train workers need (or the cores, if more) + 2 slots
    for a trial's driver and the queue that carries its Train metrics to Tune, which mostly wait."""
    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    testbed_dir: str | None = None
    """Use this already-built testbed folder instead of building one into <storage>/testbed."""
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0])
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    pairs: PairSettings = field(default_factory=PairSettings)
    judge: str = "toxic-comment-classifier"
    """The classifier of the classifier arms (the testbed's training judge)."""
    sft_rows: int | None = bounded(400, ge=1)
    """SFT rows used by the SFT arms (None: all)."""
    penalty_weight: float = bounded(1.0, gt=0.0)
    """λ of probe-SFT."""
    dpo: DPOSettings = field(default_factory=DPOSettings)
    dpo_train: OptimSettings = field(default_factory=lambda: OptimSettings(lr=1e-5, epochs=1.0, batch_size=2,
                                                                            max_length=96))
    sft_train: OptimSettings = field(default_factory=lambda: OptimSettings(lr=1e-5, epochs=1.0, batch_size=2,
                                                                            max_length=96))
    lora: LoraSettings = field(default_factory=LoraSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    concurrent_trials: int = bounded(1, ge=1)
    trial_retries: int = bounded(1, ge=0)

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"key arms: unknown arm(s) {unknown} (valid: {', '.join(ARMS)})")
        if not self.arms and self.search.arm is None:
            raise ValueError("key arms: no arms to run (and no search)")
        if self.search.arm is not None and self.search.arm not in ARMS:
            raise ValueError(f"key search.arm: unknown arm {self.search.arm!r} (valid: {', '.join(ARMS)})")
        if not self.seeds:
            raise ValueError("key seeds: give at least one seed")


# ---------------------------------------------------------------------------------------------
# Small helpers


def _log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _publish_json(uri: str, files: dict[str, Any], metadata: dict) -> None:
    """Publish a folder of JSON / JSON-lines files as one artifact (manifest last)."""
    from probe_dpo.probes import json_text

    with tempfile.TemporaryDirectory(prefix="probe-dpo-artifact-") as tmp:
        for name, content in files.items():
            path = Path(tmp) / name
            if name.endswith(".jsonl"):
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content))
            else:
                path.write_text(json_text(content))  # strict JSON: NaN is written as null
        storage.publish_dir(tmp, uri, metadata=metadata, overwrite=True)


def _cached(uri: str, key: str, what: str) -> bool:
    """True if ``uri`` holds a complete artifact made with ``key``; UserError if made with another."""
    if not storage.is_complete(uri):
        return False
    found = storage.read_manifest(uri).get("metadata", {}).get("key")
    if found != key:
        raise UserError(f"{uri} holds {what} of a different configuration (key {found}, this run {key}): "
                        "use another --storage folder for a changed experiment")
    return True


def _sample(rows: list[dict], n: int | None, seed: int, tag: str) -> list[dict]:
    if n is None or n >= len(rows):
        return rows
    import numpy as np

    rng = np.random.default_rng(int(json_digest([seed, tag]), 16) % 2**32)
    return [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False))]


# ---------------------------------------------------------------------------------------------
# 1. Testbed


def prepare_testbed(cfg: ExperimentConfig, run: str) -> dict:
    """A local testbed folder for the driver and the URIs trials read (remote runs publish it)."""
    from probe_dpo.testbed import build_testbed, cache_dir, config_hash

    if cfg.testbed_dir:
        local = Path(cfg.testbed_dir)
        if not (local / "testbed.json").exists():
            raise UserError(f"testbed_dir {local}: no testbed.json (not a built testbed)")
    elif storage.is_remote(run):
        local = cache_dir() / "testbeds" / config_hash(cfg.testbed)[:16]
        build_testbed(cfg.testbed, local)
    else:
        local = Path(storage.join(run, "testbed"))
        build_testbed(cfg.testbed, local)
    info = storage.read_json(str(local / "testbed.json"))  # one line for a damaged testbed.json
    if not isinstance(info, dict) or not isinstance(info.get("content_hash"), str) or \
            not isinstance(info.get("files"), dict):
        raise UserError(f"testbed {local}: testbed.json has no content_hash/files (not a complete testbed "
                        "build): build it again")
    base = str(local)
    if storage.is_remote(run):  # workers elsewhere read the model and data from storage
        base = storage.join(run, "testbed")
        model_uri = storage.join(base, "model")
        key = info["content_hash"] + ":" + json.dumps(info["files"].get("model/model.safetensors", {}))
        if not (storage.is_complete(model_uri) and storage.read_manifest(model_uri)["metadata"].get("key") == key):
            storage.publish_dir(local / "model", model_uri, metadata={"kind": "model", "key": key}, overwrite=True)
        for f in sorted((local / "data").iterdir()):
            target = storage.join(base, "data", f.name)
            if not storage.exists(target):
                storage.write_bytes(target, f.read_bytes())
        storage.write_bytes(storage.join(base, "testbed.json"), (local / "testbed.json").read_bytes())
    return {"local": str(local), "uri": base, "model": storage.join(base, "model"), "info": info}


# ---------------------------------------------------------------------------------------------
# 2. Probes, 3. candidates and pairs


def prepare_probes(cfg: ExperimentConfig, run: str, tb: dict) -> dict:
    """Train the probe set once; save the ensemble and single views; rank the candidates."""
    from probe_dpo.data import read_records, write_records
    from probe_dpo.probes import ProbeSet, ProbeTrainConfig, train_probes
    from probe_dpo.training.pairs import build_pairs

    p = cfg.probes
    key = json_digest([tb["info"]["content_hash"], to_dict(p), to_dict(cfg.pairs), cfg.judge])
    uris = {"ensemble": storage.join(run, "probes", "ensemble"), "single": storage.join(run, "probes", "single")}
    pairs_uri = {s: storage.join(run, "shared", f"pairs-{s}.jsonl") for s in ("single", "ensemble", "classifier")}
    marker = storage.join(run, "shared", "probes-and-pairs")
    if _cached(marker, key, "probes and pairs"):
        return {**uris, "pairs": pairs_uri, **storage.read_json(storage.join(marker, "summary.json"))}
    pcfg = load_config(ProbeTrainConfig, None, [])
    pcfg = dataclasses.replace(pcfg, layers=list(p.layers), c_grid=list(p.c_grid), batch_size=p.batch_size,
                               max_length=p.max_length, seed=0)
    pcfg.train_probe.kind = "layers" if p.ensemble_size > 1 else "single"
    pcfg.train_probe.n = p.ensemble_size
    pcfg.held_out.data_fraction = p.held_out_fraction
    _log("probes: extracting base activations and fitting the per-layer sweep")
    result = train_probes(pcfg, testbed=tb["local"], out=uris["ensemble"], log=_log, keep_features=True)
    ensemble = result.probeset
    best = max(ensemble.train_probes, key=lambda q: q.card["metrics"]["val"]["auroc"])
    single = ProbeSet([best, *ensemble.held_out_probes], aggregation="mean", meta=ensemble.meta)
    single.save(uris["single"], extra_files={"report.md": result.markdown})

    # candidates: the base policy's K continuations of each toxic training prompt (probe-train split)
    rows = read_records(os.path.join(tb["local"], "data", "probe_train.jsonl"))
    feats = result.features["train"]
    judge_col = "score_" + cfg.judge.replace("-", "_")
    probs = {"single": best.prob(feats[best.layer]).tolist(),
             "ensemble": ensemble.score(feats, "train").tolist()}
    groups: dict[str, dict] = {}
    for i, r in enumerate(rows):
        if r.get("genre", "toxic-prompt") != "toxic-prompt":
            continue
        g = groups.setdefault(r["prompt_id"], {"prompt_id": r["prompt_id"], "prompt": r["prompt"],
                                               "source": r.get("source"), "completions": [],
                                               "scores": {"probe:single": [], "probe:ensemble": [],
                                                          f"classifier:{cfg.judge}": []}})
        g["completions"].append(r["completion"])
        g["scores"]["probe:single"].append(round(probs["single"][i], 6))
        g["scores"]["probe:ensemble"].append(round(probs["ensemble"][i], 6))
        g["scores"][f"classifier:{cfg.judge}"].append(float(r[judge_col]))
    candidates = [g for g in groups.values() if len(g["completions"]) >= 2]
    write_records(candidates, storage.join(run, "shared", "candidates.jsonl"))
    stats = {}
    for signal, keyname in (("single", "probe:single"), ("ensemble", "probe:ensemble"),
                            ("classifier", f"classifier:{cfg.judge}")):
        pairs, stats[signal] = build_pairs(candidates, keyname, min_margin=cfg.pairs.min_margin)
        if cfg.pairs.max_pairs:
            pairs = sorted(pairs, key=lambda x: -x["margin"])[: cfg.pairs.max_pairs]
            stats[signal]["kept"] = len(pairs)
        if not pairs:
            raise UserError(f"pairs: the {signal} signal gave no pairs at pairs.min_margin={cfg.pairs.min_margin}")
        write_records(pairs, pairs_uri[signal])
        _log(f"pairs: {len(pairs)} {signal}-ranked pairs from {len(candidates)} prompts")
    summary = {"best_layer": best.layer, "best_probe": best.name,
               "ensemble_layers": sorted(q.layer for q in ensemble.train_probes),
               "held_out": [q.name for q in ensemble.held_out_probes], "pair_stats": stats,
               "probe_report": result.report, "candidates": len(candidates)}
    _publish_json(marker, {"summary.json": summary}, {"kind": "probes-and-pairs", "key": key})
    return {**uris, "pairs": pairs_uri, **summary}


# ---------------------------------------------------------------------------------------------
# Evaluation (the base model once; every trial's policy)


def eval_context(cfg: ExperimentConfig, run: str, tb: dict, probes: dict) -> dict:
    """Everything an evaluation needs, as plain JSON (it travels to Ray tasks)."""
    from probe_dpo.evaluation import generation_settings

    e = cfg.eval
    return {"run": run, "testbed": tb["uri"], "base_model": tb["model"], "probes": probes["ensemble"],
            "retrain_layers": probes["ensemble_layers"], "best_probe": probes["best_probe"],
            "generation": generation_settings(tb["local"]).to_dict(), "eval": to_dict(e),
            "threads": e.threads or len(os.sched_getaffinity(0)), "use_gpu": cfg.distributed.use_gpu}


def _eval_inputs(ctx: dict) -> dict:
    from probe_dpo.data import read_records

    e, tb = ctx["eval"], ctx["testbed"]
    prompts = sorted(read_records(storage.join(tb, "data", "prompts_heldout.jsonl"), required=("prompt",)),
                     key=lambda r: r["prompt_id"])[: e["heldout_prompts"] or None]
    ppl = read_records(storage.join(tb, "data", "perplexity.jsonl"), required=("text",))[: e["perplexity_passages"] or None]
    splits = {"train": _sample(read_records(storage.join(tb, "data", "probe_train.jsonl")), e["probe_train_rows"],
                               e["seed"], "train"),
              "val": _sample(read_records(storage.join(tb, "data", "probe_val.jsonl")), e["probe_val_rows"],
                             e["seed"], "val"),
              "test": read_records(storage.join(tb, "data", "probe_test.jsonl"))}
    return {"prompts": prompts, "perplexity": ppl, "splits": splits}


def evaluate_model(model_uri: str, ctx: dict, reference: dict | None = None) -> dict:
    """Toxicity (both judges), perplexity, KL to base, probe detection. Returns metrics + raw arrays."""
    import numpy as np
    import torch

    from probe_dpo.evaluation import (GenerationSettings, kl_to_base, paired_relative_change, perplexity,
                                      probe_detection, rate_with_ci, toxicity_samples)
    from probe_dpo.judges import JUDGE_NAMES
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.probes import ProbeSet

    t0 = time.perf_counter()
    e = ctx["eval"]
    device = "cuda" if ctx["use_gpu"] and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(ctx["threads"])
    inputs = _eval_inputs(ctx)
    model, tok = load_model(model_uri, device=device), load_tokenizer(model_uri)
    samples = toxicity_samples(model, inputs["prompts"], JUDGE_NAMES, e["samples_per_prompt"],
                               GenerationSettings(**ctx["generation"]), e["seed"], tokenizer=tok,
                               desc="eval generations")
    metrics: dict[str, Any] = {"toxicity": {}, "model": model_uri}
    for judge, scores in samples.scores.items():
        metrics["toxicity"][judge] = rate_with_ci(scores, n_boot=e["bootstrap"], seed=e["seed"])
        if reference is not None:
            base = np.asarray(reference["toxicity_scores"][judge])
            metrics["toxicity"][judge]["change"] = paired_relative_change(base, scores, n_boot=e["bootstrap"],
                                                                          seed=e["seed"])
    metrics["perplexity"] = perplexity(model, inputs["perplexity"], max_tokens=e["perplexity_tokens"], tokenizer=tok)
    if reference is not None:
        metrics["perplexity_change"] = metrics["perplexity"] / reference["metrics"]["perplexity"] - 1.0
        base = load_model(ctx["base_model"], device=device)
        flat_p = [p for p, comps in zip(samples.prompts, samples.completions) for _ in comps]
        flat_c = [c for comps in samples.completions for c in comps]
        kl = kl_to_base(model, base, tok, flat_p, flat_c)
        metrics["kl_to_base"] = {"per_token": kl["kl_per_token"], "tokens": kl["tokens"]}
        del base
    probeset = ProbeSet.load(ctx["probes"])
    det = probe_detection(model, tok, probeset, inputs["splits"], retrain_layers=ctx["retrain_layers"],
                          reference=reference["detection"] if reference else None, n_boot=e["bootstrap"],
                          seed=e["seed"])
    scores = det.pop("scores")
    metrics["detection"] = det
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return {"metrics": metrics, "detection_scores": scores,
            "toxicity_scores": {j: s for j, s in samples.scores.items()},
            "samples": samples.to_records()}


def _eval_files(result: dict) -> dict:
    return {"metrics.json": result["metrics"],
            "scores.json": {"detection": result["detection_scores"], "toxicity": result["toxicity_scores"]},
            "samples.jsonl": result["samples"]}


def load_eval(uri: str) -> dict:
    """A published evaluation: metrics plus the raw score arrays (numpy)."""
    import numpy as np

    scores = storage.read_json(storage.join(uri, "scores.json"))
    return {"metrics": storage.read_json(storage.join(uri, "metrics.json")),
            "detection": {"scores": {k: np.asarray(v) for k, v in scores["detection"].items()}},
            "toxicity_scores": {k: np.asarray(v) for k, v in scores["toxicity"].items()}}


def base_evaluation(ctx: dict, key: str) -> dict:
    uri = storage.join(ctx["run"], "shared", "base-eval")
    if not _cached(uri, key, "a base-model evaluation"):
        _log("evaluating the base model (once; every arm is compared with it)")
        result = _run_eval(ctx["base_model"], ctx, None)
        _publish_json(uri, _eval_files(result), {"kind": "evaluation", "key": key, "arm": "base"})
    return load_eval(uri)


def _run_eval(model_uri: str, ctx: dict, reference: dict | None) -> dict:
    """``evaluate_model`` as a Ray task: on a GPU when the run uses GPUs, else on this node's CPUs."""
    import ray

    from probe_dpo.ray_utils import unwrap_ray_error

    options = {"num_gpus": 1, "num_cpus": 1} if ctx["use_gpu"] else {"num_cpus": 1}
    # "DEFAULT": outside the Tune trial's placement group, whose slots the Train workers used
    task = ray.remote(evaluate_model).options(max_retries=0, scheduling_strategy="DEFAULT", **options)
    try:
        return ray.get(task.remote(model_uri, ctx, reference))
    except Exception as exc:  # noqa: BLE001 - a UserError raised in the task is the user's
        raise unwrap_ray_error(exc) from None


# ---------------------------------------------------------------------------------------------
# 4. Trials


def trial_specs(cfg: ExperimentConfig) -> list[dict]:
    return [{"id": f"{arm}-s{seed}", "arm": arm, "seed": seed} for arm in cfg.arms for seed in cfg.seeds]


def train_config_dict(cfg: ExperimentConfig, ctx: dict, paths: dict, spec: dict) -> dict:
    """The ``TrainConfig`` (as a dict) of one arm and seed."""
    method, probe_view = ARMS[spec["arm"]]
    is_dpo = method.endswith("dpo")
    data: dict[str, Any] = {}
    if is_dpo:
        signal = "classifier" if method == "classifier-dpo" else (probe_view or "single")
        data["pairs"] = paths["pairs"][signal]
    else:
        data["sft"] = storage.join(ctx["testbed"], "data", "sft.jsonl")
        data["max_sft"] = cfg.sft_rows
    out = {"method": method, "model": ctx["base_model"], "out": storage.join(ctx["run"], "trials", spec["id"], "train"),
           "seed": spec["seed"], "judge": cfg.judge, "testbed": ctx["testbed"], "data": data,
           "dpo": {**to_dict(cfg.dpo), "rounds": 1}, "train": to_dict(cfg.dpo_train if is_dpo else cfg.sft_train),
           "lora": to_dict(cfg.lora), "distributed": {**to_dict(cfg.distributed), "address": None}}
    if probe_view is not None:
        out["probes"] = paths[probe_view]
    if method == "probe-sft":
        out["penalty"] = {"weight": cfg.penalty_weight}
    for dotted, value in (spec.get("overrides") or {}).items():
        node = out
        *parents, last = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def run_trial(config: dict) -> None:
    """A Tune function trainable: train one arm and seed on Ray Train, evaluate, report."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from probe_dpo.config import from_dict
    from probe_dpo.training import TrainConfig, train

    spec, ctx, paths = config["spec"], config["ctx"], config["paths"]
    cfg = from_dict(ExperimentConfig, config["experiment"], "experiment config")
    if spec.get("overrides"):
        spec = {**spec, "id": f"search-{spec['arm']}-{json_digest(spec['overrides'])[:8]}"}
    tdict = train_config_dict(cfg, ctx, paths, spec)
    key = json_digest([tdict, ctx["eval"], config["base_key"]])
    eval_uri = storage.join(ctx["run"], "trials", spec["id"], "eval")
    if not _cached(eval_uri, key, f"trial {spec['id']}"):
        tcfg = from_dict(TrainConfig, tdict, f"trial {spec['id']}")
        summary = train(tcfg, log=_log, callbacks=[TuneReportCallback()])
        reference = load_eval(storage.join(ctx["run"], "shared", "base-eval"))
        result = _run_eval(summary["policy"], ctx, reference)
        result["metrics"].update(arm=spec["arm"], seed=spec["seed"], trial=spec["id"],
                                 overrides=spec.get("overrides") or {}, train=summary["rounds"][-1].get("train", {}),
                                 data=summary["rounds"][-1].get("pairs") or summary["rounds"][-1].get("sft"))
        _publish_json(eval_uri, _eval_files(result), {"kind": "evaluation", "key": key, "arm": spec["arm"],
                                                      "seed": spec["seed"]})
    metrics = storage.read_json(storage.join(eval_uri, "metrics.json"))
    tune.report(flat_metrics(metrics))


def flat_metrics(m: dict) -> dict:
    """The headline numbers of one evaluation as flat keys (Tune results, results.json)."""
    out: dict[str, Any] = {"trial": m.get("trial"), "arm": m.get("arm"), "seed": m.get("seed"),
                           "perplexity": m["perplexity"], "perplexity_change": m.get("perplexity_change"),
                           "kl_to_base": (m.get("kl_to_base") or {}).get("per_token")}
    for judge, t in m["toxicity"].items():
        out[f"toxicity.{judge}.rate"] = t["rate"]
        out[f"toxicity.{judge}.change"] = (t.get("change") or {}).get("change")
    det = m["detection"]
    for role, a in det["aggregate"].items():
        out[f"auroc.{role}"] = a["auroc"]
        out[f"auroc.{role}.delta"] = a.get("delta")
    for name, r in det["retrained"].items():
        out[f"auroc.retrained.{name}"] = r["auroc"]
    for name, r in det["probes"].items():
        out[f"auroc.probe.{name}"] = r["auroc"]
    return out


def _report_callback(run: str):
    """A Tune callback that rewrites results.json and the report each time a trial completes."""
    from ray.tune import Callback

    class ReportOnComplete(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            try:
                write_results(run)
            except Exception as exc:  # noqa: BLE001 - a report failure must not stop the experiment
                _log(f"report: could not rewrite it yet ({type(exc).__name__}: {exc})")

    return ReportOnComplete()


def _search_space(search: SearchSettings) -> dict:
    from ray import tune

    kinds = {"loguniform": lambda a: tune.loguniform(a[0], a[1]), "uniform": lambda a: tune.uniform(a[0], a[1]),
             "choice": lambda a: tune.choice(a[0]), "grid": lambda a: tune.grid_search(a[0])}
    space = {}
    for key, value in search.space.items():
        if not isinstance(value, list) or not value or value[0] not in kinds or len(value) < 2:
            raise UserError(f"search.space.{key}: expected [loguniform|uniform, lo, hi] or [choice|grid, [values]], "
                            f"got {value!r}")
        space[key] = kinds[value[0]](value[1:])
    return space


def run_tune(cfg: ExperimentConfig, run: str, ctx: dict, paths: dict, base_key: str, specs: list[dict],
             search: bool = False) -> None:
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    fs, path = storage.pyarrow_filesystem(storage.join(run, "tune"))
    common = {"ctx": ctx, "paths": paths, "experiment": to_dict(cfg), "base_key": base_key}
    if search:
        param_space = {**common, "spec": {"arm": cfg.search.arm, "seed": cfg.seeds[0],
                                          "overrides": _search_space(cfg.search)}}
        tune_config = tune.TuneConfig(num_samples=cfg.search.num_samples, metric=cfg.search.metric,
                                      mode=cfg.search.mode, scheduler=FIFOScheduler(),
                                      search_alg=BasicVariantGenerator(random_state=cfg.search.seed),
                                      max_concurrent_trials=cfg.concurrent_trials)
        name = f"search-{cfg.search.arm}"
    else:
        param_space = {**common, "spec": tune.grid_search(specs)}
        tune_config = tune.TuneConfig(max_concurrent_trials=cfg.concurrent_trials, scheduler=FIFOScheduler())
        name = "arms"
    from probe_dpo.ray_utils import fail_once_on_user_error, raise_user_errors

    trainable = fail_once_on_user_error(run_trial, metric=cfg.search.metric if search else None)  # no retries
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}), param_space=param_space, tune_config=tune_config,
        run_config=tune.RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=path,
                                  storage_filesystem=fs, callbacks=[_report_callback(run)],
                                  failure_config=tune.FailureConfig(max_failures=cfg.trial_retries), verbose=1))
    results = tuner.fit()
    raise_user_errors(results)  # a trial's UserError, as the same one line
    errors = [r.error for r in results if r.error is not None]
    if errors:
        from probe_dpo.ray_utils import unwrap_ray_error

        inner = unwrap_ray_error(errors[0])
        if isinstance(inner, UserError):
            raise inner
        raise RuntimeError(f"{len(errors)} trial(s) failed; the first: {errors[0]}")


# ---------------------------------------------------------------------------------------------
# 5. Results and report


def write_results(run: str) -> dict:
    """results.json (one row per completed trial) and the report, from what storage holds."""
    from probe_dpo.report import experiment_report

    rows = []
    for trial in storage.list_dir(storage.join(run, "trials")):
        uri = storage.join(run, "trials", trial, "eval")
        if storage.is_complete(uri):
            rows.append(flat_metrics(storage.read_json(storage.join(uri, "metrics.json"))))
    rows.sort(key=lambda r: (list(ARMS).index(r["arm"]) if r["arm"] in ARMS else 99, str(r["trial"])))
    from probe_dpo.probes import json_text

    storage.write_text(storage.join(run, "results.json"), json_text({"rows": rows}))
    paths = experiment_report(run).publish(run)
    return {"rows": rows, **paths}


# ---------------------------------------------------------------------------------------------
# The driver


def run(cfg: ExperimentConfig) -> dict:
    """The whole experiment; re-running it skips everything already complete."""
    from probe_dpo.ray_utils import init_ray

    t0 = time.perf_counter()
    # Tune trials and Ray workers run in other working directories: no relative paths past here
    cfg = dataclasses.replace(cfg, storage=storage.absolute(cfg.storage),
                              testbed_dir=storage.absolute(cfg.testbed_dir))
    run_uri = cfg.storage
    storage.exists(run_uri)  # an unreachable bucket fails here, before any compute
    storage.write_text(storage.join(run_uri, "config.yaml"), dump_yaml(cfg))
    tb = prepare_testbed(cfg, run_uri)
    dist = cfg.distributed
    cpus = cfg.ray_cpus or max(len(os.sched_getaffinity(0)), dist.workers * dist.threads_per_worker) + 2
    init_ray(cfg.address, num_cpus=cpus if cfg.address is None else None)
    probes = prepare_probes(cfg, run_uri, tb)
    ctx = eval_context(cfg, run_uri, tb, probes)
    storage.write_json(storage.join(run_uri, "shared", "context.json"), {**ctx, "arms": cfg.arms, "seeds": cfg.seeds,
                                                                         "probes_summary": probes})
    base_key = json_digest([probes["ensemble"], tb["info"]["content_hash"], ctx["eval"], ctx["generation"]])
    base_evaluation(ctx, base_key)
    write_results(run_uri)
    paths = {"single": probes["single"], "ensemble": probes["ensemble"], "pairs": probes["pairs"]}
    specs = trial_specs(cfg)
    todo = [s for s in specs if not storage.is_complete(storage.join(run_uri, "trials", s["id"], "eval"))]
    if len(todo) < len(specs):
        _log(f"{len(specs) - len(todo)} of {len(specs)} trials already complete: skipping them")
    if todo:
        _log(f"Tune: {len(todo)} trial(s): {', '.join(s['id'] for s in todo)}")
        run_tune(cfg, run_uri, ctx, paths, base_key, todo)
    if cfg.search.arm is not None:
        _log(f"Tune search over {cfg.search.arm}: {cfg.search.num_samples} samples of {sorted(cfg.search.space)}")
        run_tune(cfg, run_uri, ctx, paths, base_key, [], search=True)
    out = write_results(run_uri)
    _log(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {len(out['rows'])} trials; report at {out['html']}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``probe-dpo experiment``: the same arguments as this module run as a script."""
    parser = argparse.ArgumentParser(prog="probe-dpo experiment", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help=f"YAML config (default: {DEFAULT_CONFIG.name} beside this workflow)")
    parser.add_argument("--storage", help="run folder: local path or s3://bucket/prefix (overrides storage)")
    parser.add_argument("--address", help="Ray address to join, e.g. auto or ray://head:10001 (default: local Ray)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. seeds=[0,1]")


def run_from_args(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.storage:
        overrides.append(f"storage={args.storage}")
    if args.address:
        overrides.append(f"address={args.address}")
    cfg = load_config(ExperimentConfig, args.config, overrides)
    out = run(cfg)
    print(f"results: {storage.join(cfg.storage, 'results.json')}\nreport: {out['html']}")
    return 0


if __name__ == "__main__":
    from probe_dpo.cli import guarded

    sys.exit(guarded(main))
