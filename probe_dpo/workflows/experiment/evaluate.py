"""Evaluation of a model (the base model once, every trial's policy) as a Ray task: the judge
panel's toxicity, perplexity, KL to the base model, probe detection by role."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from probe_dpo import storage
from probe_dpo.config import to_dict
from probe_dpo.data import json_digest
from probe_dpo.generation import GenerationSettings
from probe_dpo.testbed.layout import TestbedPaths
from probe_dpo.workflows.experiment.config import EvalSettings, ExperimentConfig
from probe_dpo.workflows.experiment.stages import cached, publish_json, record_timing, sample_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalContext:
    """Everything an evaluation reads, built once by the driver from the shared stages. It travels as
    it is to Tune trials and Ray tasks (pickled by Ray), and as ``to_dict`` to ``shared/context.json``,
    which results and the report read back."""

    run: str
    testbed: str
    base_model: str
    probes: str
    """The probe set every evaluation reads (the ensemble view: all train probes and held-out ones)."""
    retrain_layers: tuple[int, ...]
    best_probe: str
    best_layer: int
    held_out: tuple[str, ...]
    generation: GenerationSettings
    eval: EvalSettings
    threads: int | None
    """Torch threads of an evaluation (None: every core of its node; the base model's, run alone)."""
    use_gpu: bool
    accelerator_type: str | None
    behaviour: str
    threshold: float
    """The judge threshold the testbed's labels were made with."""

    def key(self) -> list:
        """What names an evaluation's result besides its model: the evaluation and generation settings."""
        return [to_dict(self.eval), self.generation.to_dict()]

    def to_dict(self) -> dict:
        return to_dict(self)


def eval_context(cfg: ExperimentConfig, run: str, tb: dict, probes: dict) -> EvalContext:
    """The run's evaluation context (``EvalContext``) from its config and shared stages."""
    from probe_dpo.evaluation import judge_threshold
    from probe_dpo.testbed import generation_settings

    return EvalContext(run=run, testbed=tb["uri"], base_model=tb["model"], probes=probes["ensemble"],
                       retrain_layers=tuple(sorted({probes["best_layer"], *probes["ensemble_layers"]})),
                       best_probe=probes["best_probe"], best_layer=probes["best_layer"],
                       held_out=tuple(probes["held_out"]), generation=generation_settings(tb["uri"]),
                       eval=cfg.eval, threads=cfg.eval.threads, use_gpu=cfg.distributed.use_gpu,
                       accelerator_type=cfg.distributed.accelerator_type, behaviour=cfg.behaviour.name,
                       threshold=judge_threshold(tb["info"]))


def _eval_inputs(ctx: EvalContext) -> dict:
    from probe_dpo.data import read_records

    e, tb = ctx.eval, TestbedPaths(ctx.testbed)
    prompts = sorted(read_records(tb.data("prompts_heldout"), required=("prompt",)),
                     key=lambda r: r["prompt_id"])[: e.heldout_prompts or None]
    ppl = read_records(tb.data("perplexity"), required=("text",))[: e.perplexity_passages or None]
    splits = {"train": sample_rows(read_records(tb.data("probe_train")), e.probe_train_rows, e.seed, "train"),
              "val": sample_rows(read_records(tb.data("probe_val")), e.probe_val_rows, e.seed, "val"),
              "test": read_records(tb.data("probe_test"))}
    return {"prompts": prompts, "perplexity": ppl, "splits": splits}


def evaluate_model(model_uri: str, ctx: EvalContext, reference: dict | None = None, target: str = "train") -> dict:
    """Toxicity (the judge panel), perplexity, KL to base, probe detection on fixed texts and on
    the model's own completions. Returns metrics and the raw arrays (``scores.json``); with a
    ``reference`` (the base model's evaluation), the changes against it, ``target`` being the
    probe role the model was trained against.

    Each model is loaded once; one forward pass of the policy and one of the base model over
    the policy's completions give both the KL and the probe readings (``policy_readings``)."""
    import torch

    from probe_dpo.detection import probe_scores, read_fixed, role_keys
    from probe_dpo.evaluation import perplexity, policy_readings, rate_with_ci, toxicity_samples
    from probe_dpo.goodhart import arm_summary, evaluation_files, load_evaluation
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.probes import ProbeSet

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        seconds[stage] = round(now - since, 1)
        return now

    e = ctx.eval
    device = "cuda" if ctx.use_gpu and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(ctx.threads or len(os.sched_getaffinity(0)))
    inputs = _eval_inputs(ctx)
    model, tok = load_model(model_uri, device=device), load_tokenizer(model_uri)
    base = load_model(ctx.base_model, device=device) if reference is not None else None
    probeset = ProbeSet.load(ctx.probes)
    t = lap("load", t_start)
    samples = toxicity_samples(model, inputs["prompts"], e.judges, e.samples_per_prompt, ctx.generation, e.seed,
                               tokenizer=tok, desc="eval generations")
    t = lap("generation_and_judges", t)
    metrics: dict[str, Any] = {"model": model_uri, "threshold": ctx.threshold,
                               "toxicity": {j: rate_with_ci(s, ctx.threshold, n_boot=e.bootstrap, seed=e.seed)
                                            for j, s in samples.scores.items()}}
    metrics["perplexity"] = perplexity(model, inputs["perplexity"], max_tokens=e.perplexity_tokens, tokenizer=tok)
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
    fixed, retrained = read_fixed(model, tok, probeset, inputs["splits"], retrain_layers=list(ctx.retrain_layers),
                                  dtype=e.probe_read_dtype)
    metrics["retrained"] = retrained
    t = lap("fixed_text_probes", t)
    files = evaluation_files(samples.scores, fixed, own, own_groups)
    if reference is not None:
        roles = role_keys(ctx.to_dict())
        this = load_evaluation(metrics, files)
        metrics["summary"] = arm_summary(reference, [this], roles, target, n_boot=e.bootstrap, seed=e.seed)
        lap("statistics", t)
    metrics["eval_seconds"] = round(time.perf_counter() - t_start, 1)
    metrics["seconds"] = seconds
    return {"metrics": metrics, "scores": files, "samples": samples.to_records()}


def eval_files(result: dict) -> dict:
    return {"metrics.json": result["metrics"], "scores.json": result["scores"], "samples.jsonl": result["samples"]}


def load_eval(uri: str) -> dict:
    """A published evaluation, as ``probe_dpo.goodhart`` reads it."""
    from probe_dpo.goodhart import load_evaluation

    return load_evaluation(storage.read_json(storage.join(uri, "metrics.json")),
                           storage.read_json(storage.join(uri, "scores.json")))


BASE_EVAL = "base-eval"
REPLICATE_EVAL = "base-replicate-eval"


def base_evaluation(ctx: EvalContext, key: str, replicate_offset: int | None = None) -> dict:
    """The base model's evaluation, once per run. It runs before any trial, alone, so it takes
    every core of the node it runs on whatever ``eval.threads`` gives each trial's evaluation
    (measured in the demo: 171 s with the demo's 1 thread).

    With ``replicate_offset`` it is the base model evaluated again with the sampling seed moved
    by that much (``shared/base-replicate-eval``): what sampling alone does to every statistic,
    a null reference for the outcome labels that no training touched."""
    name, e = (BASE_EVAL, ctx.eval) if replicate_offset is None else \
        (REPLICATE_EVAL, dataclasses.replace(ctx.eval, seed=ctx.eval.seed + replicate_offset))
    uri = storage.join(ctx.run, "shared", name)
    if replicate_offset is not None:
        key = json_digest([key, "replicate", e.seed])
    if not cached(uri, key, "a base-model evaluation"):
        log.info("evaluating the base model " + ("(once; every arm is compared with it)" if replicate_offset is None
                                                 else f"again with sampling seed {e.seed} (a null reference)"))
        t0 = time.perf_counter()
        result = run_eval(ctx.base_model, dataclasses.replace(ctx, eval=e, threads=None), None)
        publish_json(uri, eval_files(result), {"kind": "evaluation", "key": key,
                                               "arm": "base" if replicate_offset is None else "base-replicate"})
        record_timing(ctx.run, name.replace("-eval", "_evaluation").replace("-", "_"), time.perf_counter() - t0)
    return load_eval(uri)


def run_eval(model_uri: str, ctx: EvalContext, reference: dict | None, target: str = "train") -> dict:
    """``evaluate_model`` as a Ray task (also on the local default): on a GPU when the run uses
    GPUs, else on this node's CPUs (``evaluate_model`` sets its own torch threads)."""
    from probe_dpo.ray_utils import run_task

    return run_task(evaluate_model, model_uri, ctx, reference, target, use_gpu=ctx.use_gpu,
                    accelerator_type=ctx.accelerator_type)
