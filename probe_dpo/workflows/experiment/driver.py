"""The experiment (any behaviour: toxicity and sentiment are configs): train against probes,
measure Goodhart, on a Ray Tune driver.

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
   A search (``search``: Tune's samplers, random or Optuna TPE, FIFO or ASHA on a training
   metric, one metric or several) is one more Tune experiment over one arm; run again, it is
   resumed (``Tuner.restore``). Its trials and Pareto set go to ``searches/<name>.json``.
5. ``results.json`` (per trial, per arm with seeds pooled, paired arm comparisons, stage
   timings, each search's trials and Pareto set) and the report are rewritten as each trial completes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

from probe_dpo import storage
from probe_dpo.analysis import PLAN_FILE, build_plan, in_loop_judges, write_plan
from probe_dpo.config import dump_yaml, load_config
from probe_dpo.data import json_digest
from probe_dpo.logs import setup as setup_logs
from probe_dpo.testbed.behaviour import TOXICITY
from probe_dpo.workflows import bundled_config
from probe_dpo.workflows.experiment.arms import SharedInputs, target_role
from probe_dpo.workflows.experiment.config import ExperimentConfig, trial_specs
from probe_dpo.workflows.experiment.evaluate import EvalContext, base_evaluation, eval_context
from probe_dpo.workflows.experiment.obfuscation_map import map_plan, refine
from probe_dpo.workflows.experiment.results import write_results
from probe_dpo.workflows.experiment.stages import (
    prepare_probes,
    prepare_testbed,
    read_built_testbed,
    record_timing,
)
from probe_dpo.workflows.experiment.trials import check_arm_settings, run_tune

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig) -> dict:
    """The whole experiment; re-running it skips everything already complete."""
    from probe_dpo.ray_utils import init_ray, resolve_use_gpu

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
    given = read_built_testbed(cfg.testbed_dir) if cfg.testbed_dir else None  # checked before Ray starts
    # declared before anything is measured: the labels' rule, effects and judges cannot follow the results
    digest = write_plan(run_uri, analysis_plan(cfg, given))
    log.info(f"analysis plan declared: {storage.join(run_uri, PLAN_FILE)} (sha256 {digest[:12]})")
    dist = cfg.distributed
    trial_cpus = cfg.concurrent_trials * (dist.workers * dist.threads_per_worker + 2)
    cpus = cfg.ray_cpus or max(len(os.sched_getaffinity(0)), trial_cpus) + 2
    init_ray(cfg.address, num_cpus=cpus if cfg.address is None else None)
    # one answer for every stage, trial, actor and task (and the bool, not "auto", in their keys)
    cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(dist, use_gpu=resolve_use_gpu(dist.use_gpu)))
    log.info(f"devices: {'GPUs (one per Train worker, sampler and model stage)' if cfg.distributed.use_gpu else 'CPUs'}")
    t = time.perf_counter()
    tb = prepare_testbed(cfg, run_uri)
    if time.perf_counter() - t > 5:  # built now (a cache hit takes a moment)
        record_timing(run_uri, "testbed", time.perf_counter() - t)
    probes = prepare_probes(cfg, run_uri, tb)  # each stage records its time when it runs
    ctx = eval_context(cfg, run_uri, tb, probes)
    storage.write_json(storage.join(run_uri, "shared", "context.json"),
                       {**ctx.to_dict(), "arms": cfg.arms, "seeds": cfg.seeds, "probes_summary": probes})
    base_key = json_digest([probes["ensemble"], tb["info"]["content_hash"], *ctx.key()])
    base_evaluation(ctx, base_key)
    if cfg.analysis.base_replicate:
        base_evaluation(ctx, base_key, replicate_offset=cfg.analysis.replicate_seed_offset)
    write_results(run_uri)
    shared = SharedInputs(run=run_uri, testbed=tb["uri"], base_model=tb["model"],
                          probes={"single": probes["single"], "ensemble": probes["ensemble"]},
                          pairs=probes["pairs"], control_sft=probes["control_sft"])
    run_trials(cfg, shared, ctx, base_key, trial_specs(cfg))
    for round_ in range(1, cfg.map.refine_rounds + 1):  # an obfuscation map's boundaries, round by round
        labels = {arm: (s.get("outcome") or {}).get("label") for arm, s in write_results(run_uri)["arms"].items()}
        cells = refine(cfg.map, labels)
        log.info(f"map refinement round {round_}: {len(cells)} new cell(s){': ' if cells else ''}{', '.join(cells)}")
        if not cells:
            break
        cfg = dataclasses.replace(cfg, arms=[*cfg.arms, *cells])
        run_trials(cfg, shared, ctx, base_key, [s for s in trial_specs(cfg) if s["arm"] in cells])
    if cfg.search.arm is not None:
        log.info(f"Tune search over {cfg.search.arm}: {cfg.search.num_samples} samples of {sorted(cfg.search.space)}")
        run_tune(cfg, shared, ctx, base_key, [], search=True)
    record_timing(run_uri, "this_run_total", time.perf_counter() - t0)
    out = write_results(run_uri)
    log.info(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {len(out['rows'])} trials; report at {out['html']}")
    return out


def run_trials(cfg: ExperimentConfig, shared: SharedInputs, ctx: EvalContext, base_key: str, specs: list[dict]) -> None:
    """The trials of ``specs`` that are not complete yet, as one Tune experiment."""
    todo = [s for s in specs if not storage.is_complete(storage.join(shared.run, "trials", s["id"], "eval"))]
    if len(todo) < len(specs):
        log.info(f"{len(specs) - len(todo)} of {len(specs)} trials already complete: skipping them")
    if todo:
        log.info(f"Tune: {len(todo)} trial(s): {', '.join(s['id'] for s in todo)}")
        run_tune(cfg, shared, ctx, base_key, todo)


def analysis_plan(cfg: ExperimentConfig, testbed_info: dict | None = None) -> dict:
    """The analysis this run declares (``probe_dpo.analysis``), from its config (and the info of a
    given, already built testbed, whose label judge is the one it was built with)."""
    from probe_dpo.goodhart import default_pairs

    a = cfg.analysis
    if cfg.behaviour.name != TOXICITY:
        label_judge = cfg.behaviour.label_judge
    else:
        label_judge = (testbed_info or {}).get("train_judge") or cfg.testbed.train_judge
    in_loop = in_loop_judges(label_judge, cfg.judge)
    comparisons = a.comparisons if a.comparisons is not None else default_pairs(cfg.arms, a.null_arms)
    return build_plan(a, arms=cfg.arms, seeds={arm: list(cfg.seeds) for arm in cfg.arms}, panel=cfg.eval.judges,
                      in_loop=in_loop, comparisons=comparisons, targets={arm: target_role(arm) for arm in cfg.arms},
                      map_rule=map_plan(cfg.map) if cfg.map.family else None)


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
