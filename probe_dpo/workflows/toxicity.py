"""The toxicity experiment: train against probes, measure Goodhart, on a Ray Tune driver.

``probe-dpo experiment --config toxicity [--storage URI] [--address RAY]`` and
``ray job submit -- probe-dpo experiment ...`` run this module's ``run``. One run:

1. **Testbed** (or a user's model and data in the same layout): built once, cached.
2. **Probes** on the base model (``probe_dpo.probes.train_probes``): an ensemble of train
   probes (``probes.ensemble_kind``: several layers, seeds, bootstrap resamples or disjoint
   data shares; up to 10) and held-out probes (other layers, and probes at the train layers
   fitted on prompts the train probes never saw). The train probe reads ``probes.train_layer``
   (a layer, or a relative depth such as 0.6) or, unset, the best layer by validation AUROC.
   Two views are saved: ``probes/ensemble`` (all train probes) and ``probes/single`` (the
   train probe).
3. **Shared work, once**: the base policy's K sampled continuations of the training prompts
   (the testbed's probe-train generations) are the DPO candidates; each signal ranks them
   into pairs (``shared/pairs-<signal>.jsonl``): the single probe, the ensemble, the
   classifier. Probe scores are *cross-fitted* (``pairs.cross_fit_folds``): a probe never
   ranks the candidates of a prompt it was fitted on. The positive control's SFT data (the
   judge-toxic continuations) is written too. The base model is evaluated once.
4. **Tune driver**: one trial per arm and seed (and per sample of a search). A trial runs a
   Ray Train + DeepSpeed fine-tuning (``probe_dpo.training.train``; on-policy arms sample
   new candidates from the current policy each round), then evaluates the policy as a Ray
   task: toxicity of its continuations of the held-out prompts under every judge of the
   panel, perplexity on benign text, KL to the base model, and probe detection by role (see
   ``probe_dpo.detection``) on fixed texts and on the policy's own completions. Results go to
   ``trials/<id>/eval`` (published last), so a re-run skips complete trials and resumes
   interrupted trainings from their checkpoints.
5. ``results.json`` (per trial, per arm with seeds pooled, paired arm comparisons, stage
   timings) and the report are rewritten as each trial completes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from probe_dpo import artifacts, storage
from probe_dpo.config import bounded, dump_yaml, load_config, to_dict
from probe_dpo.data import json_digest
from probe_dpo.errors import UserError
from probe_dpo.logs import setup as setup_logs
from probe_dpo.testbed import TestbedConfig
from probe_dpo.testbed.behaviour import TOXICITY, BehaviourConfig
from probe_dpo.tracking import TrackingSettings
from probe_dpo.training.config import DistributedSettings, DPOSettings, LoraSettings, OptimSettings
from probe_dpo.workflows import bundled_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    """One arm of the experiment: a training method, the probes it trains against, its data,
    and the training settings that define it (dotted ``TrainConfig`` keys, applied over the
    experiment's ``dpo``/``dpo_train``/``sft_train`` and under ``arm_settings``)."""

    method: str
    probes: str | None
    """The probe view it trains against: single (the train probe), ensemble, or None."""
    data: str
    """pairs:<single|ensemble|classifier> (the shared pairs), sft (the testbed's SFT text) or
    control (the judge-toxic continuations, prompt/completion)."""
    about: str
    settings: tuple[tuple[str, Any], ...] = ()


ARMS: dict[str, Arm] = {
    "probe-dpo-single": Arm("probe-dpo", "single", "pairs:single", "DPO on pairs ranked by the train probe"),
    "probe-dpo-ensemble": Arm("probe-dpo", "ensemble", "pairs:ensemble", "DPO on pairs ranked by the probe ensemble"),
    "probe-dpo-onpolicy": Arm("probe-dpo", "single", "pairs:single",
                              "probe-DPO for 2 rounds: round 2 samples from the round-1 policy and ranks by the "
                              "frozen probe on the policy's activations",
                              (("dpo.rounds", 2), ("data.max_prompts", 160))),
    "probe-dpo-penalty": Arm("probe-dpo", "single", "pairs:single",
                             "probe-DPO plus the differentiable probe penalty (log-loss form)",
                             (("penalty.weight", 1.0), ("penalty.form", "bce"))),
    "probe-sft-single": Arm("probe-sft", "single", "sft", "SFT plus the train probe's penalty",
                            (("penalty.weight", 1.0),)),
    "probe-sft-ensemble": Arm("probe-sft", "ensemble", "sft", "SFT plus the ensemble's penalty",
                              (("penalty.weight", 1.0),)),
    "classifier-dpo": Arm("classifier-dpo", None, "pairs:classifier", "DPO on pairs ranked by the output judge"),
    "classifier-sft": Arm("classifier-sft", None, "sft", "SFT on the rows the output judge passes"),
    "sft": Arm("sft", None, "sft", "plain SFT (raises toxicity)"),
    "random-dpo": Arm("random-dpo", None, "pairs:single", "control: the probe pairs with half the labels swapped"),
    # Calibrated once on the demo (see README): a logit penalty (weight 2) also hid the train
    # probe but rewrote the text (toxicity -86%, perplexity +40%); the log-loss form stops pushing
    # once the probe is fooled, so the behaviour stays and only the monitor is defeated.
    "obfuscation-control": Arm("probe-sft", "single", "control",
                               "positive control: SFT on judge-toxic continuations with a strong log-loss "
                               "penalty against the train probe (built to make it miss)",
                               (("penalty.weight", 5.0), ("penalty.form", "bce"), ("train.lr", 5e-5))),
}


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class ProbeSettings:
    layers: list[int] = field(default_factory=list)
    """Layers to extract and fit (empty: every layer)."""
    train_layer: int | float | None = None
    """The train probe's layer: an index (negative from the end) or a relative depth in (0, 1)
    (0.6 of 30 layers is layer 17; the nearest extracted layer is used). None: the best layer
    by validation AUROC (on SmolLM2 an early one, where a probe is close to a token detector)."""
    ensemble_kind: Literal["layers", "seeds", "bootstrap", "subsets"] = "layers"
    """How the ensemble's members differ: layers (the train layer and the best others), seeds
    (re-splits of train+val by prompt), bootstrap resamples, or disjoint shares of the prompts."""
    ensemble_size: int = bounded(4, ge=1, le=10)
    """Train probes of the ensemble arms (1 vs 10 is the paper's comparison)."""
    held_out_fraction: float = bounded(0.2, ge=0.0, lt=1.0)
    """Share of probe-train prompts reserved for held-out probes at the train layers."""
    c_grid: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
    """Inverse L2 strengths tried per probe (chosen by validation AUROC)."""
    batch_size: int = bounded(32, ge=1)
    """Sequences per extraction forward pass."""
    max_length: int = bounded(128, ge=8)
    """Tokens kept per probe row (prompt + completion, cut on the left)."""


@dataclass
class PairSettings:
    min_margin: float = bounded(0.1, ge=0.0, le=1.0)
    """A prompt gives a pair when its highest and lowest score (probability) differ this much."""
    max_pairs: int | None = bounded(None, ge=1)
    """Keep the pairs with the largest margins (None: all)."""
    cross_fit_folds: int = bounded(5, ge=0)
    """Probe scores of the candidates come from probes refitted on the other folds' prompts, so
    no probe ranks a prompt it was fitted on (0: in-sample scores, the old behaviour)."""

    def __post_init__(self):
        if self.cross_fit_folds == 1:
            raise ValueError("key pairs.cross_fit_folds: use 0 (off) or at least 2 folds")


@dataclass
class EvalSettings:
    heldout_prompts: int | None = bounded(200, ge=1)
    """The first N held-out prompts (by id); None: all of them."""
    samples_per_prompt: int = bounded(2, ge=1)
    """Continuations per held-out prompt (the evaluation's samples: prompts x this)."""
    judges: list[str] = field(default_factory=lambda: ["toxic-comment-classifier", "profanity-check", "hatesonar"])
    """The judge panel; a reduction is called robust only where it holds under each. The first
    is the judge whose labels decide the Atlas outcome on the policy's own completions."""
    perplexity_passages: int | None = bounded(None, ge=1)
    """None: all of the testbed's perplexity passages."""
    perplexity_tokens: int = bounded(256, ge=8)
    """Tokens per perplexity passage."""
    probe_train_rows: int | None = bounded(1500, ge=10)
    """Probe-train rows for the retrained probes (a seeded sample; None: all)."""
    probe_val_rows: int | None = bounded(600, ge=10)
    """Probe-val rows that choose the retrained probes' C and fix their threshold."""
    bootstrap: int = bounded(1000, ge=100)
    """Bootstrap resamples (of prompts) per interval."""
    seed: int = bounded(1234, ge=0)
    """Seeds generation: the same for the base model and every arm (paired comparisons)."""
    threads: int | None = bounded(None, ge=1)
    """torch threads for evaluation on CPU (None: the machine's cores)."""

    def __post_init__(self):
        from probe_dpo.judges import parse_judge

        if not self.judges:
            raise ValueError("key eval.judges: name at least one judge")
        for j in self.judges:  # a registered name, module:function or hf:<model>#<label>
            try:
                parse_judge(j)
            except UserError as exc:
                raise ValueError(f"key eval.judges: {exc}") from None


@dataclass
class SearchSettings:
    """A hyperparameter search over one arm with Tune's search algorithm (random/grid)."""

    arm: str | None = None
    """None: no search. Else the arm whose training settings are searched."""
    space: dict[str, list] = field(default_factory=dict)
    """Dotted training key -> ["loguniform", lo, hi] | ["uniform", lo, hi] | ["choice", [values]]
    | ["grid", [values]], e.g. {"train.lr": ["loguniform", 1e-6, 1e-4], "dpo.beta": ["choice", [0.1, 0.3]]}."""
    num_samples: int = bounded(4, ge=1)
    """Trials the search runs."""
    seed: int = bounded(0, ge=0)
    """Seeds the search's sampler."""
    metric: str = "toxicity.toxic-comment-classifier.rate"
    """The flat result key the search optimises (see results.json rows)."""
    mode: Literal["min", "max"] = "min"
    """Minimise or maximise the metric."""


@dataclass
class ExperimentConfig:
    name: str = "toxicity"
    """A name for the run (reports, Tune)."""
    storage: str = "runs/experiment"
    """The run folder: local path or s3://bucket/prefix."""
    address: str | None = None
    """Ray address (None: start a local Ray)."""
    ray_cpus: int | None = bounded(None, ge=1)
    """CPUs of a local Ray. None: what the Train workers need (or the cores, if more) + 2 slots
    for a trial's driver and the queue that carries its Train metrics to Tune, which mostly wait."""
    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    """The testbed built when testbed_dir is not given."""
    testbed_dir: str | None = None
    """Use this already-built testbed folder instead of building one into <storage>/testbed."""
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    """What the experiment studies: toxicity (the built-in testbed above) or your own behaviour
    (a model, prompts or labelled probe data, the judge that labels the model's samples; see
    probe_dpo.testbed.behaviour), built into the same testbed layout. Bundled example:
    --config sentiment."""
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    """The arms to run (see ARMS in this module)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds: one trial per arm and seed."""
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    """The probe set: layers, the train probe, the ensemble, held-out probes."""
    pairs: PairSettings = field(default_factory=PairSettings)
    """How candidates become DPO pairs."""
    judge: str = "toxic-comment-classifier"
    """The classifier of the classifier arms (the testbed's training judge)."""
    sft_rows: int | None = bounded(400, ge=1)
    """SFT rows used by the SFT arms (None: all)."""
    arm_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per arm, dotted training keys over the arm's own settings, e.g.
    {obfuscation-control: {penalty.weight: 5.0}, probe-dpo-onpolicy: {dpo.rounds: 3}}."""
    dpo: DPOSettings = field(default_factory=DPOSettings)
    """DPO settings of the DPO arms."""
    dpo_train: OptimSettings = field(default_factory=lambda: OptimSettings(lr=1e-5, epochs=1.0, batch_size=2,
                                                                            max_length=96))
    """Optimisation of the DPO arms."""
    sft_train: OptimSettings = field(default_factory=lambda: OptimSettings(lr=1e-5, epochs=1.0, batch_size=2,
                                                                            max_length=96))
    """Optimisation of the SFT arms."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters for every arm (off: full fine-tuning)."""
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    """Ray Train workers of each trial."""
    eval: EvalSettings = field(default_factory=EvalSettings)
    """The evaluation of every model."""
    search: SearchSettings = field(default_factory=SearchSettings)
    """An optional hyperparameter search over one arm."""
    concurrent_trials: int = bounded(1, ge=1)
    """Trials Tune runs at once."""
    trial_retries: int = bounded(1, ge=0)
    """Times a failed trial is retried (a user error is not)."""
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    """Experiment tracking: every trial's results (Tune logger callbacks) and training steps (TRL's
    report_to) to W&B (offline), MLflow (a file store) and/or TensorBoard; off by default."""

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
        stray = [a for a in self.arm_settings if a not in ARMS]
        if stray:
            raise ValueError(f"key arm_settings: unknown arm(s) {stray} (valid: {', '.join(ARMS)})")


# ---------------------------------------------------------------------------------------------
# Small helpers


def _publish_json(uri: str, files: dict[str, Any], metadata: dict) -> None:
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
            artifacts.publish_dir(local / "model", model_uri, metadata={"kind": "model", "key": key}, overwrite=True)
        # the data is current when the published testbed.json (written last) has this content hash;
        # otherwise every file is copied again (a file of an older testbed must not stay)
        info_uri = storage.join(base, "testbed.json")
        current = storage.exists(info_uri) and storage.read_json(info_uri).get("content_hash") == info["content_hash"]
        for f in sorted((local / "data").iterdir()):
            target = storage.join(base, "data", f.name)
            if not (current and storage.exists(target)):
                storage.write_bytes(target, f.read_bytes())
        storage.write_bytes(info_uri, (local / "testbed.json").read_bytes())
    return {"local": str(local), "uri": base, "model": storage.join(base, "model"), "info": info}


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
    import numpy as np
    import torch

    from probe_dpo.data import read_records, write_records
    from probe_dpo.model import model_facts
    from probe_dpo.probes import ProbeSet, ProbeTrainConfig, cross_fit_scores, train_probes
    from probe_dpo.training.pairs import build_pairs

    p = cfg.probes
    key = json_digest([tb["info"]["content_hash"], to_dict(p), to_dict(cfg.pairs), cfg.judge])
    uris = {"ensemble": storage.join(run, "probes", "ensemble"), "single": storage.join(run, "probes", "single")}
    pairs_uri = {s: storage.join(run, "shared", f"pairs-{s}.jsonl") for s in ("single", "ensemble", "classifier")}
    control_uri = storage.join(run, "shared", "control-sft.jsonl")
    marker = storage.join(run, "shared", "probes-and-pairs")
    extra = {"pairs": pairs_uri, "control_sft": control_uri}
    if _cached(marker, key, "probes and pairs"):
        return {**uris, **extra, **storage.read_json(storage.join(marker, "summary.json"))}
    t0 = time.perf_counter()
    layers, train_layer = resolve_train_layer(p, model_facts(os.path.join(tb["local"], "model"))["num_layers"])
    pcfg = load_config(ProbeTrainConfig, None, [])
    pcfg = dataclasses.replace(pcfg, layers=layers, c_grid=list(p.c_grid), batch_size=p.batch_size,
                               max_length=p.max_length, seed=0)
    pcfg.train_probe.kind = p.ensemble_kind if p.ensemble_size > 1 else "single"
    pcfg.train_probe.n = p.ensemble_size
    pcfg.train_probe.layer = train_layer
    pcfg.held_out.data_fraction = p.held_out_fraction
    log.info("probes: extracting base activations and fitting the per-layer sweep")
    result = train_probes(pcfg, testbed=tb["local"], out=uris["ensemble"], keep_features=True)
    ensemble = result.probeset
    members = ensemble.train_probes
    best = (members[0] if train_layer is not None else
            max(members, key=lambda q: q.card["metrics"]["val"]["auroc"]))
    single = ProbeSet([best, *ensemble.held_out_probes], aggregation="mean",
                      meta={**ensemble.meta, "train_threshold": best.card["threshold"]})
    single.save(uris["single"], extra_files={"report.md": result.markdown})

    # candidates: the base policy's K continuations of each toxic training prompt (probe-train split)
    rows = read_records(os.path.join(tb["local"], "data", "probe_train.jsonl"))
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
    _publish_json(marker, {"summary.json": summary}, {"kind": "probes-and-pairs", "key": key})
    _record_timing(run, "probes_and_pairs", time.perf_counter() - t0)
    return {**uris, **extra, **summary}


# ---------------------------------------------------------------------------------------------
# Evaluation (the base model once; every trial's policy)


def eval_context(cfg: ExperimentConfig, run: str, tb: dict, probes: dict) -> dict:
    """Everything an evaluation needs, as plain JSON (it travels to Ray tasks)."""
    from probe_dpo.testbed import generation_settings

    e = cfg.eval
    return {"run": run, "testbed": tb["uri"], "base_model": tb["model"], "probes": probes["ensemble"],
            "retrain_layers": sorted({probes["best_layer"], *probes["ensemble_layers"]}),
            "best_probe": probes["best_probe"], "best_layer": probes["best_layer"], "held_out": probes["held_out"],
            "generation": generation_settings(tb["local"]).to_dict(), "eval": to_dict(e),
            "threads": e.threads or len(os.sched_getaffinity(0)), "use_gpu": cfg.distributed.use_gpu,
            "behaviour": cfg.behaviour.name}


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


def evaluate_model(model_uri: str, ctx: dict, reference: dict | None = None, target: str = "train") -> dict:
    """Toxicity (the judge panel), perplexity, KL to base, probe detection on fixed texts and on
    the model's own completions. Returns metrics and the raw arrays (``scores.json``); with a
    ``reference`` (the base model's evaluation), the changes against it, ``target`` being the
    probe role the model was trained against.

    Each model is loaded once; one forward pass of the policy and one of the base model over
    the policy's completions give both the KL and the probe readings (``policy_readings``)."""
    import torch

    from probe_dpo.detection import probe_scores, read_fixed, role_keys
    from probe_dpo.evaluation import perplexity, policy_readings, rate_with_ci, toxicity_samples
    from probe_dpo.generation import GenerationSettings
    from probe_dpo.goodhart import arm_summary, evaluation_files, load_evaluation
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.probes import ProbeSet

    setup_logs()  # a Ray task in its own worker process
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        seconds[stage] = round(now - since, 1)
        return now

    e = ctx["eval"]
    device = "cuda" if ctx["use_gpu"] and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(ctx["threads"])
    inputs = _eval_inputs(ctx)
    model, tok = load_model(model_uri, device=device), load_tokenizer(model_uri)
    base = load_model(ctx["base_model"], device=device) if reference is not None else None
    probeset = ProbeSet.load(ctx["probes"])
    t = lap("load", t_start)
    samples = toxicity_samples(model, inputs["prompts"], e["judges"], e["samples_per_prompt"],
                               GenerationSettings(**ctx["generation"]), e["seed"], tokenizer=tok,
                               desc="eval generations")
    t = lap("generation_and_judges", t)
    metrics: dict[str, Any] = {"model": model_uri, "toxicity": {j: rate_with_ci(s, n_boot=e["bootstrap"], seed=e["seed"])
                                                                 for j, s in samples.scores.items()}}
    metrics["perplexity"] = perplexity(model, inputs["perplexity"], max_tokens=e["perplexity_tokens"], tokenizer=tok)
    t = lap("perplexity", t)
    flat_p = [p for p, comps in zip(samples.prompts, samples.completions) for _ in comps]
    flat_c = [c for comps in samples.completions for c in comps]
    own_groups = [i for i, comps in enumerate(samples.completions) for _ in comps]
    readings = policy_readings(model, tok, flat_p, flat_c, sorted({q.layer for q in probeset.probes}), base=base)
    if base is not None:
        metrics["kl_to_base"] = {"per_token": readings["kl_per_token"], "tokens": readings["tokens"]}
    own = {}
    for reader, feats in readings["feats"].items():
        scores, thresholds = probe_scores(probeset, feats)
        own[reader] = {"scores": scores, "thresholds": thresholds}
    t = lap("own_completions_kl_and_probes", t)
    fixed, retrained = read_fixed(model, tok, probeset, inputs["splits"], retrain_layers=ctx["retrain_layers"])
    metrics["retrained"] = retrained
    t = lap("fixed_text_probes", t)
    files = evaluation_files(samples.scores, fixed, own, own_groups)
    if reference is not None:
        roles = role_keys(ctx)
        this = load_evaluation(metrics, files)
        metrics["summary"] = arm_summary(reference, [this], roles, target,
                                         n_boot=e["bootstrap"], seed=e["seed"])
        lap("statistics", t)
    metrics["eval_seconds"] = round(time.perf_counter() - t_start, 1)
    metrics["seconds"] = seconds
    return {"metrics": metrics, "scores": files, "samples": samples.to_records()}


def _eval_files(result: dict) -> dict:
    return {"metrics.json": result["metrics"], "scores.json": result["scores"], "samples.jsonl": result["samples"]}


def load_eval(uri: str) -> dict:
    """A published evaluation, as ``probe_dpo.goodhart`` reads it."""
    from probe_dpo.goodhart import load_evaluation

    return load_evaluation(storage.read_json(storage.join(uri, "metrics.json")),
                           storage.read_json(storage.join(uri, "scores.json")))


def base_evaluation(ctx: dict, key: str) -> dict:
    uri = storage.join(ctx["run"], "shared", "base-eval")
    if not _cached(uri, key, "a base-model evaluation"):
        log.info("evaluating the base model (once; every arm is compared with it)")
        t0 = time.perf_counter()
        result = _run_eval(ctx["base_model"], ctx, None)
        _publish_json(uri, _eval_files(result), {"kind": "evaluation", "key": key, "arm": "base"})
        _record_timing(ctx["run"], "base_evaluation", time.perf_counter() - t0)
    return load_eval(uri)


def _run_eval(model_uri: str, ctx: dict, reference: dict | None, target: str = "train") -> dict:
    """``evaluate_model`` as a Ray task: on a GPU when the run uses GPUs, else on this node's CPUs."""
    import ray

    from probe_dpo.ray_utils import unwrap_ray_error

    options = {"num_gpus": 1, "num_cpus": 1} if ctx["use_gpu"] else {"num_cpus": 1}
    # "DEFAULT": outside the Tune trial's placement group, whose slots the Train workers used
    task = ray.remote(evaluate_model).options(max_retries=0, scheduling_strategy="DEFAULT", **options)
    try:
        return ray.get(task.remote(model_uri, ctx, reference, target))
    except Exception as exc:  # noqa: BLE001 - a UserError raised in the task is the user's
        raise unwrap_ray_error(exc) from None


# ---------------------------------------------------------------------------------------------
# 4. Trials


def trial_specs(cfg: ExperimentConfig) -> list[dict]:
    return [{"id": f"{arm}-s{seed}", "arm": arm, "seed": seed} for arm in cfg.arms for seed in cfg.seeds]


def target_role(arm: str) -> str:
    """The probe role an arm trained against (arms that train against none: the train probe,
    the monitor a deployer would have)."""
    return "ensemble" if ARMS[arm].probes == "ensemble" else "train"


def _set_dotted(node: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value


def train_config_dict(cfg: ExperimentConfig, ctx: dict, paths: dict, spec: dict) -> dict:
    """The ``TrainConfig`` (as a dict) of one arm and seed: the experiment's training settings,
    then the arm's own, then ``arm_settings``, then a search sample's overrides."""
    arm = ARMS[spec["arm"]]
    is_dpo = arm.data.startswith("pairs:")
    data: dict[str, Any] = {}
    if is_dpo:
        data["pairs"] = paths["pairs"][arm.data.split(":", 1)[1]]
    elif arm.data == "control":
        data["sft"] = paths["control_sft"]
    else:
        data["sft"] = storage.join(ctx["testbed"], "data", "sft.jsonl")
        data["max_sft"] = cfg.sft_rows
    out = {"method": arm.method, "model": ctx["base_model"],
           "out": storage.join(ctx["run"], "trials", spec["id"], "train"), "seed": spec["seed"], "judge": cfg.judge,
           "testbed": ctx["testbed"], "data": data, "dpo": to_dict(cfg.dpo),
           "train": to_dict(cfg.dpo_train if is_dpo else cfg.sft_train), "lora": to_dict(cfg.lora),
           "distributed": {**to_dict(cfg.distributed), "address": None}}
    if arm.probes is not None:
        out["probes"] = paths[arm.probes]
    if cfg.tracking.report_to:  # every trial's training steps into the run's one tracking folder
        from probe_dpo.tracking import log_dir

        out["tracking"] = {**to_dict(cfg.tracking), "dir": log_dir(cfg.tracking, ctx["run"]),
                           "project": cfg.tracking.project}
    for dotted, value in [*arm.settings, *cfg.arm_settings.get(spec["arm"], {}).items(),
                          *(spec.get("overrides") or {}).items()]:
        _set_dotted(out, dotted, value)
    return out


def check_arm_settings(cfg: ExperimentConfig) -> None:
    """Every arm's training config is valid (keys, types, ranges) before any compute."""
    from probe_dpo.config import from_dict
    from probe_dpo.training import TrainConfig

    fake = {"pairs": {"single": "p", "ensemble": "p", "classifier": "p"}, "control_sft": "c",
            "single": "s", "ensemble": "e"}
    for arm in cfg.arms:
        from_dict(TrainConfig, train_config_dict(cfg, {"run": "r", "testbed": "t", "base_model": "m"}, fake,
                                                 {"id": arm, "arm": arm, "seed": 0}),
                  f"arm {arm} (its settings and arm_settings.{arm})")


def run_trial(config: dict) -> None:
    """A Tune function trainable: train one arm and seed on Ray Train, evaluate, report."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from probe_dpo.config import from_dict
    from probe_dpo.training import TrainConfig, train

    setup_logs()  # a Tune trial runs in its own Ray worker process
    spec, ctx, paths = config["spec"], config["ctx"], config["paths"]
    cfg = from_dict(ExperimentConfig, config["experiment"], "experiment config")
    if spec.get("overrides"):
        spec = {**spec, "id": f"search-{spec['arm']}-{json_digest(spec['overrides'])[:8]}"}
    tdict = train_config_dict(cfg, ctx, paths, spec)
    key = json_digest([{k: v for k, v in tdict.items() if k != "tracking"}, ctx["eval"], config["base_key"]])
    eval_uri = storage.join(ctx["run"], "trials", spec["id"], "eval")
    if not _cached(eval_uri, key, f"trial {spec['id']}"):
        tcfg = from_dict(TrainConfig, tdict, f"trial {spec['id']}")
        summary = train(tcfg, callbacks=[TuneReportCallback()])
        reference = load_eval(storage.join(ctx["run"], "shared", "base-eval"))
        result = _run_eval(summary["policy"], ctx, reference, target_role(spec["arm"]))
        last = summary["rounds"][-1]
        result["metrics"].update(arm=spec["arm"], seed=spec["seed"], trial=spec["id"],
                                 overrides=spec.get("overrides") or {}, train=last.get("train", {}),
                                 train_seconds=summary.get("seconds"), rounds=len(summary["rounds"]),
                                 data=last.get("pairs") or last.get("sft"))
        _publish_json(eval_uri, _eval_files(result), {"kind": "evaluation", "key": key, "arm": spec["arm"],
                                                      "seed": spec["seed"]})
    metrics = storage.read_json(storage.join(eval_uri, "metrics.json"))
    tune.report(flat_metrics(metrics))


def flat_metrics(m: dict) -> dict:
    """The headline numbers of one trial's evaluation as flat keys (Tune results, results.json):
    toxicity under each judge, retention, and per probe role AUROC / TPR / FPR at the base
    threshold with their changes (fixed texts), and AUROC / TPR on the policy's own completions
    (the first judge's labels, read from the policy)."""
    s = m.get("summary") or {}
    out: dict[str, Any] = {"trial": m.get("trial"), "arm": m.get("arm"), "seed": m.get("seed"),
                           "perplexity": m["perplexity"], "perplexity_change": s.get("perplexity_change"),
                           "kl_to_base": (m.get("kl_to_base") or {}).get("per_token"),
                           "train_seconds": m.get("train_seconds"), "eval_seconds": m.get("eval_seconds"),
                           "atlas": s.get("atlas")}
    for judge, t in m["toxicity"].items():
        out[f"toxicity.{judge}.rate"] = t["rate"]
        out[f"toxicity.{judge}.change"] = (s.get("toxicity", {}).get(judge) or {}).get("change")
    for role, by_metric in s.get("fixed", {}).items():
        for metric in ("auroc", "tpr", "fpr"):
            d = by_metric.get(metric) or {}
            out[f"fixed.{role}.{metric}"] = d.get("value")
            out[f"fixed.{role}.{metric}.delta"] = d.get("delta")
    own = (s.get("own", {}).get("policy") or {})
    first = next(iter(own), None)
    for role, by_metric in (own.get(first) or {}).items():
        for metric in ("auroc", "tpr"):
            d = by_metric.get(metric) or {}
            out[f"own.{role}.{metric}"] = d.get("value")
            out[f"own.{role}.{metric}.delta"] = d.get("delta")
    return out


def _report_callback(run: str):
    """A Tune callback that rewrites results.json and the report each time a trial completes."""
    from ray.tune import Callback

    class ReportOnComplete(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            try:
                write_results(run)
            except Exception as exc:  # noqa: BLE001 - a report failure must not stop the experiment
                log.info(f"report: could not rewrite it yet ({type(exc).__name__}: {exc})")

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
    from probe_dpo.tracking import tune_callbacks

    trainable = fail_once_on_user_error(run_trial, metric=cfg.search.metric if search else None)  # no retries
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}), param_space=param_space, tune_config=tune_config,
        run_config=tune.RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=path,
                                  storage_filesystem=fs,
                                  callbacks=[_report_callback(run), *tune_callbacks(cfg.tracking, run)],
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


_SUMMARY_CACHE: dict[str, dict] = {}


def summarize(run: str) -> dict:
    """Per-arm summaries (seeds pooled) and the paired arm comparisons, from storage.

    An arm's summary is cached in this process under its trials' evaluation keys, so the
    rewrite after each completed trial only computes the arm that changed."""
    import numpy as np

    from probe_dpo.detection import role_keys
    from probe_dpo.goodhart import arm_summary, base_summary, comparisons, default_pairs

    ctx = storage.read_json(storage.join(run, "shared", "context.json"))
    e = ctx["eval"]
    roles = role_keys(ctx)
    base_uri = storage.join(run, "shared", "base-eval")
    if not storage.is_complete(base_uri):
        return {"rows": [], "arms": {}, "comparisons": [], "histograms": {}}
    base = load_eval(base_uri)
    rows, evals, keys = [], {}, {}
    for trial in storage.list_dir(storage.join(run, "trials")):
        uri = storage.join(run, "trials", trial, "eval")
        if not storage.is_complete(uri):
            continue
        m = storage.read_json(storage.join(uri, "metrics.json"))
        rows.append(flat_metrics(m))
        name = m["arm"] if not m.get("overrides") else m["trial"]
        evals.setdefault(name, []).append(load_eval(uri))
        keys.setdefault(name, []).append(storage.read_manifest(uri).get("metadata", {}).get("key"))
    order = {a: i for i, a in enumerate(ARMS)}
    rows.sort(key=lambda r: (order.get(r["arm"], 99), str(r["trial"])))
    arms = {}
    for name in sorted(evals, key=lambda a: (order.get(a, 99), a)):
        arm = name if name in ARMS else evals[name][0]["metrics"]["arm"]
        cache_key = json_digest([run, name, sorted(map(str, keys[name])), e["bootstrap"], e["seed"]])
        if cache_key not in _SUMMARY_CACHE:
            _SUMMARY_CACHE[cache_key] = arm_summary(base, evals[name], roles, target_role(arm), n_boot=e["bootstrap"],
                                                    seed=e["seed"])
        arms[name] = {**_SUMMARY_CACHE[cache_key], "about": ARMS[arm].about if arm in ARMS else ""}
        first = evals[name][0]["metrics"]
        arms[name]["training"] = {"data": first.get("data"), "steps": (first.get("train") or {}).get("global_step"),
                                  "rounds": first.get("rounds"),
                                  "train_seconds": float(np.mean([r["metrics"].get("train_seconds") or np.nan
                                                                  for r in evals[name]])),
                                  "eval_seconds": float(np.mean([r["metrics"].get("eval_seconds") or np.nan
                                                                 for r in evals[name]]))}
    pairs = default_pairs([a for a in arms if a in ARMS])
    probe = ctx["best_probe"]
    histograms = {name: (ev.scores[probe], ev.labels, ev.thresholds[probe])
                  for name, ev in [("base", base["fixed"])] + [(a, evals[a][0]["fixed"]) for a in arms]}
    return {"rows": rows, "base": base_summary(base, roles), "arms": arms, "roles": roles,
            "comparisons": comparisons(evals, pairs, roles, n_boot=e["bootstrap"], seed=e["seed"]),
            "histograms": histograms}


def training_histories(run: str, rows: list[dict]) -> dict[str, list]:
    """Each arm's training ``log_history`` (its first trial's final policy, ``training_run.json``)."""
    from probe_dpo.training.loop import RUN_FILE

    out: dict[str, list] = {}
    for row in rows:
        uri = storage.join(run, "trials", str(row["trial"]), "train", "policy", RUN_FILE)
        if row["arm"] not in out and storage.exists(uri):
            out[row["arm"]] = storage.read_json(uri).get("log_history") or []
    return out


def write_results(run: str) -> dict:
    """results.json (per trial, per arm, comparisons, timings) and the report, from storage."""
    from probe_dpo.report.toxicity import experiment_report
    from probe_dpo.storage import json_text

    results = summarize(run)
    histograms = results.pop("histograms")
    timings_uri = storage.join(run, "shared", "timings.json")
    timings = storage.read_json(timings_uri) if storage.exists(timings_uri) else {}
    timings["trials"] = {r["trial"]: {"train": r.get("train_seconds"), "eval": r.get("eval_seconds")}
                         for r in results["rows"]}
    timings["sum_of_stages"] = round(sum(timings.get(k) or 0 for k in ("testbed", "probes_and_pairs",
                                                                       "base_evaluation"))
                                     + sum((t["train"] or 0) + (t["eval"] or 0) for t in timings["trials"].values()), 1)
    results["timings"] = timings
    storage.write_text(storage.join(run, "results.json"), json_text(results))
    ctx = storage.read_json(storage.join(run, "shared", "context.json"))
    paths = experiment_report(run, ctx, results, histograms, training_histories(run, results["rows"])).publish(run)
    return {"rows": results["rows"], **paths}


def _record_timing(run: str, stage: str, seconds: float) -> None:
    """Add one stage's wall seconds to ``shared/timings.json``, called by a stage when it ran
    (stages skipped as complete on a re-run keep the time they took when they ran)."""
    uri = storage.join(run, "shared", "timings.json")
    timings = storage.read_json(uri) if storage.exists(uri) else {}
    timings[stage] = round(seconds, 1)
    storage.write_json(uri, timings)


# ---------------------------------------------------------------------------------------------
# The driver


def run(cfg: ExperimentConfig) -> dict:
    """The whole experiment; re-running it skips everything already complete."""
    from probe_dpo.ray_utils import init_ray

    t0 = time.perf_counter()
    # Tune trials and Ray workers run in other working directories: no relative paths past here
    cfg = dataclasses.replace(cfg, storage=storage.absolute(cfg.storage),
                              testbed_dir=storage.absolute(cfg.testbed_dir))
    check_arm_settings(cfg)
    if cfg.tracking.report_to:  # a missing tracker package fails here, before any compute
        from probe_dpo.tracking import check_installed

        check_installed(cfg.tracking)
    run_uri = cfg.storage
    storage.exists(run_uri)  # an unreachable bucket fails here, before any compute
    storage.write_text(storage.join(run_uri, "config.yaml"), dump_yaml(cfg))
    t = time.perf_counter()
    tb = prepare_testbed(cfg, run_uri)
    if time.perf_counter() - t > 5:  # built now (a cache hit takes a moment)
        _record_timing(run_uri, "testbed", time.perf_counter() - t)
    dist = cfg.distributed
    cpus = cfg.ray_cpus or max(len(os.sched_getaffinity(0)), dist.workers * dist.threads_per_worker) + 2
    init_ray(cfg.address, num_cpus=cpus if cfg.address is None else None)
    probes = prepare_probes(cfg, run_uri, tb)  # each stage records its time when it runs
    ctx = eval_context(cfg, run_uri, tb, probes)
    storage.write_json(storage.join(run_uri, "shared", "context.json"), {**ctx, "arms": cfg.arms, "seeds": cfg.seeds,
                                                                         "probes_summary": probes})
    base_key = json_digest([probes["ensemble"], tb["info"]["content_hash"], ctx["eval"], ctx["generation"]])
    base_evaluation(ctx, base_key)
    write_results(run_uri)
    paths = {"single": probes["single"], "ensemble": probes["ensemble"], "pairs": probes["pairs"],
             "control_sft": probes["control_sft"]}
    specs = trial_specs(cfg)
    todo = [s for s in specs if not storage.is_complete(storage.join(run_uri, "trials", s["id"], "eval"))]
    if len(todo) < len(specs):
        log.info(f"{len(specs) - len(todo)} of {len(specs)} trials already complete: skipping them")
    if todo:
        log.info(f"Tune: {len(todo)} trial(s): {', '.join(s['id'] for s in todo)}")
        run_tune(cfg, run_uri, ctx, paths, base_key, todo)
    if cfg.search.arm is not None:
        log.info(f"Tune search over {cfg.search.arm}: {cfg.search.num_samples} samples of {sorted(cfg.search.space)}")
        run_tune(cfg, run_uri, ctx, paths, base_key, [], search=True)
    _record_timing(run_uri, "this_run_total", time.perf_counter() - t0)
    out = write_results(run_uri)
    log.info(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {len(out['rows'])} trials; report at {out['html']}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``probe-dpo experiment``: the same arguments as this module run as a script."""
    setup_logs()
    parser = argparse.ArgumentParser(prog="probe-dpo experiment", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="toxicity",
                        help="YAML config file, or a bundled config by name: toxicity (default), demo")
    parser.add_argument("--storage", help="run folder: local path or s3://bucket/prefix (overrides storage)")
    parser.add_argument("--address", help="Ray address to join, e.g. auto or ray://head:10001 (default: local Ray)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. seeds=[0,1]")


def run_from_args(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.storage:
        overrides.append(f"storage={args.storage}")
    if args.address:
        overrides.append(f"address={args.address}")
    cfg = load_config(ExperimentConfig, bundled_config(args.config), overrides)
    out = run(cfg)
    print(f"results: {storage.join(cfg.storage, 'results.json')}\nreport: {out['html']}")
    return 0


if __name__ == "__main__":
    from probe_dpo.errors import guarded

    sys.exit(guarded(main))
