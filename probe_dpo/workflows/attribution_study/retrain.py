"""Mitigations written as new pair files, then plain DPO on each (Ray Train, the same settings
for every arm) and the evaluation of every policy."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Sequence

import numpy as np

from probe_dpo import storage
from probe_dpo.data import json_digest
from probe_dpo.testbed.layout import TestbedPaths
from probe_dpo.workflows.attribution_study.inputs import Inputs
from probe_dpo.workflows.attribution_study.scoring import model_key

log = logging.getLogger(__name__)


def write_mitigations(inp: Inputs, result: dict) -> dict[str, dict]:
    """The cleaned pair files: every configured mitigation for the probe ranking and each retrained
    ranking (a source set already dropped by an earlier ranking is not trained twice); each
    ranking's filter (and swap) at every fixed budget; the clean-only floor. Returns
    ``{arm: {"uri", ...info}}``."""
    from probe_dpo.attribution import flagged_sources, mitigate, top_k_mask, write_pairs_like

    cfg = inp.cfg
    arms: dict[str, dict] = {}

    def write(name: str, scores: np.ndarray, how: str, k: int | None = None, sources: list[str] | None = None,
              **extra: Any) -> None:
        records, info = mitigate(inp.pairs, scores, how, k=k, sources=sources)
        info.update(extra)
        if inp.bad is not None:
            hit = np.isin(result["sources"], sources) if how == "drop-sources" else top_k_mask(scores, k)
            info["bad_affected"] = int((hit & inp.bad).sum())
        arms[name] = {"uri": write_pairs_like(records, storage.join(cfg.out, "mitigated", name), inp.pairs_uri), **info}
        log.info(f"mitigation {name}: {info['pairs_out']} pairs -> {arms[name]['uri']}")

    methods = ["probe"] + [m for m in cfg.retrain.methods if m != "probe"] if cfg.retrain.enabled else ["probe"]
    dropped: dict[tuple, str] = {}
    for method in methods:
        scores = result["scores"][method]
        for how in cfg.mitigate:
            if how != "drop-sources":
                write(f"{method}-{how}", scores, how, k=result["k"])
                continue
            sources = flagged_sources(result["tables"][method])
            if not sources:
                log.info(f"{method}-drop-sources: no source is flagged (none is over-represented in the top-k); skipped")
                arms[f"{method}-{how}"] = {"skipped": "no flagged source", "sources": []}
            elif tuple(sources) in dropped:
                arms[f"{method}-{how}"] = {"skipped": f"the same sources as {dropped[tuple(sources)]}",
                                           "sources": sources}
            else:
                dropped[tuple(sources)] = f"{method}-{how}"
                write(f"{method}-{how}", scores, how, sources=sources)
        for budget, how in itertools.product(cfg.retrain.budgets, cfg.retrain.budget_mitigations):
            write(budget_arm(method, how, budget), scores, how, k=max(1, int(round(budget * len(inp.pairs)))),
                  budget=budget, ranking=method)
    if cfg.retrain.clean_floor:
        records = [dict(p) for p, b in zip(inp.pairs, inp.bad) if not b]
        arms["clean-only"] = {"uri": write_pairs_like(records, storage.join(cfg.out, "mitigated", "clean-only"),
                                                      inp.pairs_uri),
                              "mitigation": "clean-only (oracle: the labels)", "pairs_in": len(inp.pairs),
                              "pairs_out": len(records), "affected": len(inp.pairs) - len(records),
                              "bad_affected": int(inp.bad.sum())}
    return arms


def budget_arm(method: str, how: str, budget: float) -> str:
    """The arm that filters (or swaps) ``method``'s top ``budget`` of the pairs; no % or @ in the
    name: object-store keys."""
    return f"{method}-{how}-top{100 * budget:g}pct"


def compare_with_random(results: dict[str, dict], arms: dict[str, dict], judges: Sequence[str], *, threshold: float,
                        n_boot: int, seed: int) -> dict[str, dict]:
    """Each budget arm's toxic rate against the random ranking's arm at the same budget and
    mitigation (``retrain.methods`` includes ``random``): the paired change over the same
    prompts, and its p-value Holm-adjusted per judge over every such comparison. A ranking that
    finds the behaviour removes more of it than removing as many pairs at random; the random arm
    is the control a reduction vs raw has to beat (dropping any pairs moves the rate a little)."""
    from probe_dpo.evaluation import paired_relative_change
    from probe_dpo.stats import holm

    out: dict[str, dict] = {}
    for name, info in arms.items():
        if info.get("ranking") in (None, "random") or name not in results:
            continue
        control = budget_arm("random", info["mitigation"], info["budget"])
        if control in results:
            out[name] = {"control": control, **{j: paired_relative_change(
                results[control]["samples"].scores[j], results[name]["samples"].scores[j], threshold=threshold,
                n_boot=n_boot, seed=seed) for j in judges}}
    for j in judges:
        names = list(out)
        for name, p in zip(names, holm([out[n][j]["p_value"] for n in names])):
            out[name][j]["p_holm"] = p
    return out


def train_arm(inp: Inputs, name: str, pairs_uri: str, extra: Sequence[str] = ()) -> str:
    """Plain DPO (method dpo) of the base model on ``pairs_uri``; returns the policy URI.
    ``extra``: TrainConfig overrides of this arm only (the feature intervention's penalty)."""
    from probe_dpo.config import load_config
    from probe_dpo.training import TrainConfig, train

    r = inp.cfg.retrain
    out = storage.join(inp.cfg.out, "runs", name)
    overrides = ["method=dpo", f"model={inp.model}", f"data.pairs={pairs_uri}", f"out={out}",
                 f"train.lr={r.lr}", f"train.epochs={r.epochs}", f"dpo.beta={r.beta}",
                 f"train.batch_size={r.batch_size}", f"train.max_length={r.max_length}",
                 f"distributed.workers={r.workers}", f"seed={r.seed}", *r.overrides, *extra]
    if inp.cfg.extraction.address:
        overrides.append(f"distributed.address={inp.cfg.extraction.address}")
    cfg = load_config(TrainConfig, None, overrides)
    summary = train(cfg)
    return summary.get("policy", storage.join(out, "policy"))


def policy_key(model: str) -> Any:
    if storage.is_complete(model):
        return json_digest(storage.read_manifest(model)["files"])
    return model_key(model)


def evaluate_retrained(inp: Inputs, name: str, model: str) -> dict:
    """Toxicity of the model's continuations of the (triggered) held-out prompts under every
    judge, and benign perplexity; cached at <out>/eval/<name>.{json,samples.jsonl}."""
    from probe_dpo.data import read_records, write_records
    from probe_dpo.evaluation import ToxicitySamples, perplexity, rate_with_ci, toxicity_samples
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.testbed import generation_settings

    ev = inp.cfg.evaluation
    prompts_uri = ev.prompts or TestbedPaths(inp.cfg.testbed).data("prompts_heldout")
    ppl_uri = ev.perplexity or TestbedPaths(inp.cfg.testbed).data("perplexity")
    settings = generation_settings(inp.cfg.testbed)
    key = json_digest({"model": policy_key(model), "eval": dataclasses.asdict(ev), "trigger": inp.trigger,
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
    import torch

    lm = load_model(model, device="cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(model)
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
    """Base, raw-mix DPO and every mitigated arm: toxicity, perplexity, the reduction of the
    behaviour's rate relative to raw-mix DPO (the published metric) and the share of the rise
    (raw minus base) removed."""
    import ray

    from probe_dpo.attribution import reduction_vs_raw, share_of_rise_removed
    from probe_dpo.ray_utils import resolve_use_gpu, run_heavy
    from probe_dpo.workflows.attribution_study.capability import capability_check

    ev = inp.cfg.evaluation
    gpu = resolve_use_gpu("auto") if ray.is_initialized() else False

    def evaluate(name: str, model: str) -> dict:  # model work off the driver on a joined cluster
        res = run_heavy(evaluate_retrained, inp, name, model, use_gpu=gpu)
        if inp.cfg.capability.items:  # the task-level check beside perplexity (capability.py)
            res["capability"] = run_heavy(capability_check, inp, name, model, policy_key(model), use_gpu=gpu)
        return res

    results: dict[str, dict] = {"base": evaluate("base", inp.model)}
    todo = {"raw": (inp.pairs_uri, []), **{a: (v["uri"], []) for a, v in arms.items() if "uri" in v}}
    r = inp.cfg.retrain
    for form in r.intervention_forms if r.intervention_weight > 0 else []:  # the raw set, penalised along the probes
        name = f"raw-penalty-{form}"
        todo[name] = (inp.pairs_uri, [f"probes={inp.cfg.probes}", f"penalty.weight={r.intervention_weight}",
                                      f"penalty.form={form}"])
        arms = {**arms, name: {"mitigation": f"probe penalty ({form}, weight {r.intervention_weight:g}) on the raw set",
                               "pairs_in": len(inp.pairs), "pairs_out": len(inp.pairs), "affected": 0}}
    for name, (uri, extra) in todo.items():
        t0 = time.perf_counter()
        policy = train_arm(inp, name, uri, extra)
        train_s = time.perf_counter() - t0
        results[name] = evaluate(name, policy)
        results[name]["train_seconds"] = round(train_s, 1)
    base, raw = results["base"], results["raw"]
    summary: dict[str, Any] = {"arms": {}, "judges": list(ev.judges)}
    for name, res in results.items():
        entry = {"rates": res["rates"], "perplexity": res["perplexity"],
                 "perplexity_change_vs_base": res["perplexity"] / base["perplexity"] - 1.0,
                 "perplexity_change_vs_raw": res["perplexity"] / raw["perplexity"] - 1.0,
                 "model": res["model"], "capability": res.get("capability")}
        if name not in ("base", "raw"):
            entry["share_removed"] = {j: share_of_rise_removed(base["samples"].scores[j], raw["samples"].scores[j],
                                                               res["samples"].scores[j], threshold=ev.threshold,
                                                               n_boot=ev.bootstrap, seed=ev.seed)
                                      for j in ev.judges}
            entry["reduction"] = {j: reduction_vs_raw(raw["samples"].scores[j], res["samples"].scores[j],
                                                      threshold=ev.threshold, n_boot=ev.bootstrap, seed=ev.seed)
                                  for j in ev.judges}
            entry.update({k: v for k, v in arms[name].items() if k != "uri"})
        summary["arms"][name] = entry
    for name, comparison in compare_with_random(results, arms, ev.judges, threshold=ev.threshold,
                                                n_boot=ev.bootstrap, seed=ev.seed).items():
        summary["arms"][name]["vs_random"] = comparison
    for j in ev.judges:
        rise = share_of_rise_removed(base["samples"].scores[j], raw["samples"].scores[j], base["samples"].scores[j],
                                     threshold=ev.threshold, n_boot=ev.bootstrap, seed=ev.seed)
        summary.setdefault("rise", {})[j] = {"rate_base": rise["rate_base"], "rate_raw": rise["rate_raw"],
                                             "rise": rise["rise"]}
    return summary
