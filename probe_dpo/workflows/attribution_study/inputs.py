"""Every input of a study resolved and checked before any heavy compute: the pairs (or the
poisoned mix built from a testbed), the model, the probes and layer, behaviour data, the judge."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from probe_dpo import storage
from probe_dpo.attribution import MITIGATIONS
from probe_dpo.errors import UserError
from probe_dpo.testbed.layout import MODEL, TestbedPaths
from probe_dpo.workflows.attribution_study.config import (
    COMPARATORS,
    CONTRAST_METHODS,
    GRADIENT_MODES,
    METHODS,
    AttributionConfig,
)

log = logging.getLogger(__name__)


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
    planted: np.ndarray | None = None
    """Which pairs carry the planted, unlabelled behaviour (evaluation only; a mix built with
    planted_source)."""


def sample_behaviour(records: list[dict], per_class: int, seed: int) -> list[dict]:
    if per_class <= 0:
        return records
    rng = np.random.default_rng([seed, 0xBE4A])
    out = []
    for label in (1, 0):
        idx = [i for i, r in enumerate(records) if (float(r["label"]) > 0.5) == bool(label)]
        pick = sorted(rng.choice(len(idx), size=min(per_class, len(idx)), replace=False).tolist())
        out += [records[idx[i]] for i in pick]
    return out


def prepare_inputs(cfg: AttributionConfig) -> Inputs:
    """Resolve and check every input; UserError (one line) before any heavy compute."""
    from probe_dpo.attribution import read_pair_file
    from probe_dpo.data import check_labels, read_records
    from probe_dpo.judges import HATESONAR, JUDGE_NAMES, get_judge
    from probe_dpo.model import check_fit, model_facts
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
        if m == "behaviour-change" and not cfg.behaviour_change.enabled:
            raise UserError("config key retrain.methods: behaviour-change needs behaviour_change.enabled=true")
        if m in CONTRAST_METHODS and not cfg.behaviour_contrast.enabled:
            raise UserError(f"config key retrain.methods: {m} needs behaviour_contrast.enabled=true")
        if m in CONTRAST_METHODS[1:] and not cfg.behaviour_contrast.bank:
            raise UserError(f"config key retrain.methods: {m} needs behaviour_contrast.bank=true")
        if m == "probe-weights" and (not cfg.probes or cfg.direction == "probe"):
            raise UserError("config key retrain.methods: probe-weights (the probe's own direction next to the "
                            "difference of means) needs probes and direction=diff-of-means")
    if cfg.retrain.intervention_weight > 0 and not cfg.probes:
        raise UserError("config key retrain.intervention_weight: the feature intervention penalises the probes' "
                        "direction: give --probes")
    from probe_dpo.objectives import PENALTY_FORMS

    for form in cfg.retrain.intervention_forms:
        if form not in PENALTY_FORMS:
            raise UserError(f"config key retrain.intervention_forms: unknown penalty form {form!r}; "
                            f"use {', '.join(PENALTY_FORMS)}")
    for how in cfg.retrain.budget_mitigations:
        if how not in ("filter", "swap"):
            raise UserError(f"config key retrain.budget_mitigations: {how!r} does not act on a number of pairs; "
                            "use filter or swap")
    for b in cfg.retrain.budgets:
        if not 0.0 < b < 1.0:
            raise UserError(f"config key retrain.budgets: {b} is not a fraction of the pairs in (0, 1)")
    if cfg.behaviour_change.enabled and not (cfg.behaviour_change.prompts or cfg.testbed):
        raise UserError("config key behaviour_change.prompts: give the prompts where the regression shows "
                        "(or a testbed, whose training prompts are the default)")
    if cfg.behaviour_contrast.enabled and not (cfg.behaviour_contrast.prompts or cfg.testbed):
        raise UserError("config key behaviour_contrast.prompts: give the scenario prompts (or a testbed, whose "
                        "training prompts are the default)")
    if cfg.behaviour_contrast.judge:
        get_judge(cfg.behaviour_contrast.judge)
    info = read_testbed_info(cfg.testbed) if cfg.testbed else None
    model = cfg.model or (storage.join(cfg.testbed, (info or {}).get("model", {}).get("path", MODEL))
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
        check_fit(probeset.probes, model, where=f"probes {cfg.probes}", arch=probeset.meta.get("arch_hash"))
        if cfg.probe:
            try:
                probe = probeset[cfg.probe]
            except KeyError:
                raise UserError(f"probes {cfg.probes}: no probe named {cfg.probe} (has: "
                                f"{', '.join(p.name for p in probeset.probes)})") from None
        else:
            probe = probeset.default_probe
    layer = cfg.layer if cfg.layer is not None else (probe.layer if probe is not None else None)
    if layer is None:
        raise UserError("no layer: give probes (their layer is used) or layer=<index>")
    n_layers = facts["num_layers"]
    if n_layers is not None:
        if not -n_layers <= layer < n_layers:
            raise UserError(f"layer {layer} is out of range: model {model} has layers 0..{n_layers - 1}")
        layer = layer % n_layers

    behaviour = None
    b_uri = cfg.behaviour_data or (TestbedPaths(cfg.testbed).data("probe_train") if cfg.testbed else None)
    if b_uri:
        records = read_records(b_uri, required=("prompt", "completion", "label"), non_empty=("prompt",),
                               what="behaviour data")
        check_labels(records, "label", what=f"behaviour data {b_uri}")
        behaviour = sample_behaviour(records, cfg.behaviour_examples, cfg.seed)
    if cfg.direction == "diff-of-means" and behaviour is None and probe is None:
        raise UserError("no behaviour direction: give behaviour_data (difference of means) or probes")
    if cfg.direction == "probe" and probe is None:
        raise UserError("direction=probe needs --probes")
    if any(c in GRADIENT_MODES for c in cfg.comparators):
        if behaviour is None:
            raise UserError("the gradient comparator needs behaviour_data (examples of the behaviour)")

    labels_uri = cfg.poison_labels or (storage.join(cfg.out, "mix", "poison_labels.jsonl") if mix else None)
    bad = read_poison_labels(labels_uri, pairs) if labels_uri else None
    if cfg.ranking.k_from_labels and (bad is None or not bad.any()):
        raise UserError("ranking.k_from_labels needs poison_labels with at least one bad pair")
    trigger = cfg.evaluation.trigger if cfg.evaluation.trigger is not None else (mix["trigger"] if mix else "")
    if cfg.retrain.clean_floor and (bad is None or bad.all()):
        raise UserError("config key retrain.clean_floor: needs poison_labels with at least one clean pair "
                        "(a built mix's, or poison_labels=URI)")
    if cfg.behaviour_change.enabled and cfg.behaviour_change.contrast and not trigger:
        raise UserError("config key behaviour_change.contrast: needs a trigger (evaluation.trigger, or a built mix's)")
    # the judges that defined the poison (with mix.poison_judges=all, every testbed judge did)
    defining = {mix.get("train_judge")} | {c[len("score_"):].replace("_", "-") for c in mix.get("poison_judges") or []
                                           if c.startswith("score_")} if mix else set()
    judge = cfg.judge
    if judge is None:
        heldout = (info or {}).get("heldout_judges") or []
        judge = heldout[0] if heldout else "profanity-check"
        if judge in defining:
            judge = next((j for j in (*JUDGE_NAMES, HATESONAR) if j not in defining), judge)
    get_judge(judge)
    for j in cfg.evaluation.judges:
        get_judge(j)
    if judge in defining:
        log.info(f"warning: the judge baseline uses {judge}, a judge that defined the poisoned pairs (circular)")
    if cfg.retrain.enabled:
        if not (cfg.evaluation.prompts or cfg.testbed):
            raise UserError("retrain.enabled needs evaluation.prompts (held-out prompts) or a testbed")
        if not (cfg.evaluation.perplexity or cfg.testbed):
            raise UserError("retrain.enabled needs evaluation.perplexity (benign texts) or a testbed")
    storage.check_reachable(cfg.out)  # an unreachable or missing bucket fails here
    planted = None
    if mix and mix.get("planted") and labels_uri:
        planted = read_poison_labels(labels_uri, pairs, column="planted")
    return Inputs(cfg, model, pairs_uri, pairs, probeset, probe, layer, behaviour, bad, mix, trigger, info, judge,
                  planted)
