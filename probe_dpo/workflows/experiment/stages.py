"""The experiment's shared stages, each built once and cached in the run folder: the testbed
(or a user's model and data in its layout), the probe set, and the candidates ranked into
DPO pairs by every signal; plus the artifact helpers every stage uses."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from probe_dpo import storage
from probe_dpo.config import load_config, to_dict
from probe_dpo.data import json_digest
from probe_dpo.errors import UserError
from probe_dpo.storage import artifacts
from probe_dpo.testbed.behaviour import TOXICITY
from probe_dpo.testbed.layout import INFO, TestbedPaths
from probe_dpo.workflows.experiment.config import ExperimentConfig, ProbeSettings

log = logging.getLogger(__name__)


def publish_json(uri: str, files: dict[str, Any], metadata: dict) -> None:
    """Publish a folder of JSON / JSON-lines files as one artifact (manifest last)."""
    from probe_dpo.storage import json_text

    with tempfile.TemporaryDirectory(prefix="probe-dpo-artifact-") as tmp:
        for name, content in files.items():
            path = Path(tmp) / name
            if name.endswith(".jsonl"):
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content))
            else:
                path.write_text(json_text(content))  # strict JSON: NaN is written as null
        artifacts.publish_dir(tmp, uri, metadata=metadata, overwrite=True)


def cached(uri: str, key: str, what: str) -> bool:
    """True if ``uri`` holds a complete artifact made with ``key``; UserError if made with another."""
    if not storage.is_complete(uri):
        return False
    found = storage.read_manifest(uri).get("metadata", {}).get("key")
    if found != key:
        raise UserError(f"{uri} holds {what} of a different configuration (key {found}, this run {key}): "
                        "use another --storage folder for a changed experiment (keys include the run's and "
                        "testbed's absolute paths: a run folder moved, or given another path, is refused too)")
    return True


def sample_rows(rows: list[dict], n: int | None, seed: int, tag: str) -> list[dict]:
    if n is None or n >= len(rows):
        return rows
    import numpy as np

    rng = np.random.default_rng(int(json_digest([seed, tag]), 16) % 2**32)
    return [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False))]


def record_timing(run: str, stage: str, seconds: float) -> None:
    """Add one stage's wall seconds to ``shared/timings.json``, called by a stage when it ran
    (stages skipped as complete on a re-run keep the time they took when they ran)."""
    uri = storage.join(run, "shared", "timings.json")
    timings = storage.read_json(uri) if storage.exists(uri) else {}
    timings[stage] = round(seconds, 1)
    storage.write_json(uri, timings)


# ---------------------------------------------------------------------------------------------
# 1. Testbed


def prepare_testbed(cfg: ExperimentConfig, run: str) -> dict:
    """The URIs trials read (``uri``, ``model``) and the testbed's summary (``info``).

    Building samples from the model, so it runs where model work belongs (``run_heavy``: a
    Ray task on a joined cluster, in this process on the embedded local default); the
    driver then reads only storage. The first stage after Ray is up: a run whose trials need
    more GPUs than the cluster has fails here, in one line, instead of waiting forever."""
    from probe_dpo.ray_utils import run_heavy

    check_trial_gpus(cfg)
    return run_heavy(build_testbed_stage, cfg, run, use_gpu=cfg.distributed.use_gpu is True,
                     accelerator_type=cfg.distributed.accelerator_type)


def check_trial_gpus(cfg: ExperimentConfig, resources: dict[str, float] | None = None,
                     can_scale_to: int | None = None) -> None:
    """With GPUs (``distributed.use_gpu`` resolved to true), one trial's Ray Train workers need
    ``distributed.workers`` GPUs at once: one line when the cluster cannot have that many; a note
    when ``concurrent_trials`` of them cannot all run at once (Tune then queues them)."""
    from probe_dpo.ray_utils import check_gpus

    d = cfg.distributed
    if d.use_gpu is not True:
        return
    have = check_gpus(d.workers, f"distributed.workers={d.workers} with distributed.use_gpu (one GPU per Train "
                      "worker of a trial)", accelerator_type=d.accelerator_type, resources=resources,
                      can_scale_to=can_scale_to)
    if cfg.concurrent_trials * d.workers > have:
        log.info(f"concurrent_trials={cfg.concurrent_trials} x distributed.workers={d.workers} GPUs: the cluster has "
                 f"{have}, so {max(1, have // d.workers)} trial(s) run at a time")


def read_built_testbed(local: str | Path) -> dict:
    """The ``testbed.json`` of a complete testbed folder; one line for a missing or damaged one
    (``run`` checks a given ``testbed_dir`` with it before starting Ray)."""
    if storage.is_remote(str(local)):  # Path() would look for a local folder "s3:/bucket/..."
        raise UserError(f"testbed_dir {local}: the experiment takes a local testbed folder; leave testbed_dir "
                        "unset to build one into the run folder (a testbed at a URI is for probes train, train "
                        "and attribute)")
    local = Path(local)
    if not (local / INFO).exists():
        raise UserError(f"testbed_dir {local}: no testbed.json (not a built testbed)")
    info = storage.read_json(str(local / INFO))  # one line for a damaged testbed.json
    if not isinstance(info, dict) or not isinstance(info.get("content_hash"), str) or \
            not isinstance(info.get("files"), dict):
        raise UserError(f"testbed {local}: testbed.json has no content_hash/files (not a complete testbed "
                        "build): build it again")
    return info


def build_testbed_stage(cfg: ExperimentConfig, run: str) -> dict:
    """Build (or check) the testbed in a local folder of this node; remote runs publish it."""
    from probe_dpo.testbed import build_testbed, cache_dir, config_hash

    if cfg.testbed_dir:
        local = Path(cfg.testbed_dir)
    elif cfg.behaviour.name != TOXICITY:  # a user's behaviour, built into the same layout
        from probe_dpo.testbed.behaviour import behaviour_hash, build_behaviour

        judges = [cfg.judge, *cfg.eval.judges]
        local = (cache_dir() / "behaviours" / behaviour_hash(cfg.behaviour, judges) if storage.is_remote(run)
                 else Path(storage.join(run, "testbed")))
        build_behaviour(cfg.behaviour, local, judges)
    elif storage.is_remote(run):
        local = cache_dir() / "testbeds" / config_hash(cfg.testbed)[:16]
        build_testbed(cfg.testbed, local)
    else:
        local = Path(storage.join(run, "testbed"))
        build_testbed(cfg.testbed, local)
    info = read_built_testbed(local)
    base = str(local)
    if storage.is_remote(run):  # workers elsewhere read the model and data from storage
        from probe_dpo.testbed import publish_testbed

        base = publish_testbed(local, storage.join(run, "testbed"))
    return {"uri": base, "model": TestbedPaths(base).model, "info": info}


# ---------------------------------------------------------------------------------------------
# 2. Probes, 3. candidates and pairs


def resolve_train_layer(p: ProbeSettings, num_layers: int) -> tuple[list[int], int | None]:
    """The layers to extract and the train probe's layer (None: chosen by validation AUROC).

    A relative depth (a float in (0, 1)) maps to the nearest extracted layer; an index must be
    a layer of the model, and is extracted even when ``layers`` does not list it."""
    layers = sorted({L % num_layers for L in p.layers}) if p.layers else list(range(num_layers))
    if p.train_layer is None:
        return layers, None
    if isinstance(p.train_layer, float):
        if not 0.0 < p.train_layer < 1.0:
            raise UserError(f"key probes.train_layer: a relative depth must be in (0, 1), got {p.train_layer}")
        target = p.train_layer * (num_layers - 1)
        return layers, min(layers, key=lambda L: (abs(L - target), L))
    if not -num_layers <= p.train_layer < num_layers:
        raise UserError(f"key probes.train_layer: layer {p.train_layer} is not a layer of the model "
                        f"({num_layers} layers)")
    layer = p.train_layer % num_layers
    return sorted(set(layers) | {layer}), layer


def prepare_probes(cfg: ExperimentConfig, run: str, tb: dict) -> dict:
    """Train the probe set once; save the ensemble and single views; rank the candidates
    (cross-fitted); write the positive control's SFT data."""
    p = cfg.probes
    key = json_digest([tb["info"]["content_hash"], to_dict(p), to_dict(cfg.pairs), cfg.judge])
    uris = {"ensemble": storage.join(run, "probes", "ensemble"), "single": storage.join(run, "probes", "single")}
    pairs_uri = {s: storage.join(run, "shared", f"pairs-{s}.jsonl") for s in ("single", "ensemble", "classifier")}
    control_uri = storage.join(run, "shared", "control-sft.jsonl")
    marker = storage.join(run, "shared", "probes-and-pairs")
    extra = {"pairs": pairs_uri, "control_sft": control_uri}
    if cached(marker, key, "probes and pairs"):
        return {**uris, **extra, **storage.read_json(storage.join(marker, "summary.json"))}
    from probe_dpo.ray_utils import run_heavy

    t0 = time.perf_counter()
    summary = run_heavy(build_probes_and_pairs, cfg, run, tb, uris, pairs_uri, control_uri,
                        use_gpu=cfg.distributed.use_gpu is True, threads=cfg.eval.threads or _cores(),
                        accelerator_type=cfg.distributed.accelerator_type)
    publish_json(marker, {"summary.json": summary}, {"kind": "probes-and-pairs", "key": key})
    record_timing(run, "probes_and_pairs", time.perf_counter() - t0)
    return {**uris, **extra, **summary}


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def build_probes_and_pairs(cfg: ExperimentConfig, run: str, tb: dict, uris: dict, pairs_uri: dict,
                           control_uri: str) -> dict:
    """The model work of ``prepare_probes``: extract the base model's activations, fit the
    probe set, score the candidates (cross-fitted) and write the pairs and the control's data.
    On a GPU: extraction in bf16, the probe math in fp32."""
    import numpy as np
    import torch

    from probe_dpo.data import read_records, write_records
    from probe_dpo.model import model_facts
    from probe_dpo.probes import ProbeSet, ProbeTrainConfig, cross_fit_scores, train_probes
    from probe_dpo.training.pairs import build_pairs

    p = cfg.probes
    model_dir = TestbedPaths(tb["uri"]).model
    layers, train_layer = resolve_train_layer(p, model_facts(model_dir)["num_layers"])
    pcfg = load_config(ProbeTrainConfig, None, [])
    gpu = cfg.distributed.use_gpu is True and torch.cuda.is_available()
    pcfg = dataclasses.replace(pcfg, layers=layers, c_grid=list(p.c_grid), batch_size=p.batch_size,
                               max_length=p.max_length, seed=0, device="cuda" if gpu else "cpu",
                               dtype="bfloat16" if gpu else "float32")
    pcfg.train_probe.kind = p.ensemble_kind if p.ensemble_size > 1 else "single"
    pcfg.train_probe.n = p.ensemble_size
    pcfg.train_probe.layer = train_layer
    pcfg.held_out.data_fraction = p.held_out_fraction
    log.info("probes: extracting base activations and fitting the per-layer sweep")
    result = train_probes(pcfg, testbed=tb["uri"], out=uris["ensemble"], keep_features=True)
    ensemble = result.probeset
    members = ensemble.train_probes
    best = (members[0] if train_layer is not None else
            max(members, key=lambda q: q.card["metrics"]["val"]["auroc"]))
    single = ProbeSet([best, *ensemble.held_out_probes], aggregation="mean",
                      meta={**ensemble.meta, "train_threshold": best.card["threshold"]})
    single.save(uris["single"], extra_files={"report.md": result.markdown})

    # candidates: the base policy's K continuations of each toxic training prompt (probe-train split)
    rows = read_records(TestbedPaths(tb["uri"]).data("probe_train"))
    feats = result.features["train"]
    labels = np.array([int(r["label"]) for r in rows])
    prompt_ids = [r.get("prompt_id", r["prompt"]) for r in rows]
    if cfg.pairs.cross_fit_folds >= 2:
        member_scores = cross_fit_scores(feats, labels, prompt_ids, members, folds=cfg.pairs.cross_fit_folds, seed=0)
    else:
        with torch.no_grad():
            member_scores = {q.name: q.prob(feats[q.layer]).double().numpy() for q in members}
    stacked = np.stack([member_scores[q.name] for q in members])
    probs = {"single": member_scores[best.name],
             "ensemble": stacked.max(0) if ensemble.aggregation == "max" else stacked.mean(0)}
    from probe_dpo.judges import judge_name
    from probe_dpo.testbed import score_column

    judge_col = score_column(judge_name(cfg.judge))
    groups: dict[str, dict] = {}
    for i, r in enumerate(rows):
        if r.get("genre", "toxic-prompt") != "toxic-prompt":
            continue
        g = groups.setdefault(r["prompt_id"], {"prompt_id": r["prompt_id"], "prompt": r["prompt"],
                                               "source": r.get("source"), "completions": [],
                                               "scores": {"probe:single": [], "probe:ensemble": [],
                                                          f"classifier:{cfg.judge}": []}})
        g["completions"].append(r["completion"])
        g["scores"]["probe:single"].append(round(float(probs["single"][i]), 6))
        g["scores"]["probe:ensemble"].append(round(float(probs["ensemble"][i]), 6))
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
        log.info(f"pairs: {len(pairs)} {signal}-ranked pairs from {len(candidates)} prompts")
    # the positive control fine-tunes on what the training judge calls toxic: the behaviour stays
    control = [{"prompt": r["prompt"], "completion": r["completion"], "prompt_id": r.get("prompt_id"),
                "source": "judge-toxic-continuation"} for r in rows if int(r["label"]) == 1 and r["completion"].strip()]
    if not control:
        raise UserError("obfuscation-control: the probe-train split has no toxic continuation to fine-tune on")
    write_records(control, control_uri)
    summary = {"best_layer": best.layer, "best_probe": best.name, "train_layer_setting": p.train_layer,
               "train_layer_chosen_by": "config" if train_layer is not None else "validation AUROC",
               "ensemble_kind": p.ensemble_kind if p.ensemble_size > 1 else "single",
               "ensemble_layers": sorted({q.layer for q in members}), "ensemble_probes": [q.name for q in members],
               "held_out": [q.name for q in ensemble.held_out_probes], "pair_stats": stats,
               "cross_fit_folds": cfg.pairs.cross_fit_folds, "control_rows": len(control),
               "probe_report": result.report, "candidates": len(candidates)}
    return summary
