"""The Tune driver's trials: one per arm and seed (or search sample), each a Ray Train +
DeepSpeed fine-tuning followed by the evaluation task."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from probe_dpo import storage
from probe_dpo.config import set_dotted, to_dict
from probe_dpo.data import json_digest
from probe_dpo.errors import UserError
from probe_dpo.logs import setup as setup_logs
from probe_dpo.testbed.layout import TestbedPaths
from probe_dpo.workflows.experiment.config import ARMS, SAMPLERS, ExperimentConfig, SearchSettings, target_role
from probe_dpo.workflows.experiment.evaluate import eval_files, load_eval, run_eval
from probe_dpo.workflows.experiment.results import flat_metrics, write_results
from probe_dpo.workflows.experiment.stages import cached, publish_json

log = logging.getLogger(__name__)


def train_config_dict(cfg: ExperimentConfig, ctx: dict, paths: dict, spec: dict) -> dict:
    """The ``TrainConfig`` (as a dict) of one arm and seed: the experiment's training settings,
    then the arm's own, then ``arm_settings``, then a search sample's overrides."""
    arm = ARMS[spec["arm"]]
    is_dpo = arm.data.startswith("pairs:")
    data: dict[str, Any] = {}
    if is_dpo:
        data["pairs"] = paths["pairs"][arm.data.split(":", 1)[1]]
    elif arm.data == "prompts":  # GRPO: the same training prompts the DPO pairs were sampled from
        data["prompts"] = TestbedPaths(ctx["testbed"]).data("prompts_train")
        data["max_prompts"] = cfg.grpo_prompts
    elif arm.data == "control":
        data["sft"] = paths["control_sft"]
    else:
        data["sft"] = TestbedPaths(ctx["testbed"]).data("sft")
        data["max_sft"] = cfg.sft_rows
    out = {"method": arm.method, "model": ctx["base_model"],
           "out": storage.join(ctx["run"], "trials", spec["id"], "train"), "seed": spec["seed"], "judge": cfg.judge,
           "testbed": ctx["testbed"], "data": data, "dpo": to_dict(cfg.dpo), "grpo": to_dict(cfg.grpo),
           "train": to_dict(cfg.dpo_train if is_dpo or arm.data == "prompts" else cfg.sft_train),
           "lora": to_dict(cfg.lora),
           "distributed": {**to_dict(cfg.distributed), "address": None}}
    if arm.probes is not None:
        out["probes"] = paths[arm.probes]
    if cfg.tracking.report_to:  # every trial's training steps into the run's one tracking folder
        from probe_dpo.tracking import log_dir

        out["tracking"] = {**to_dict(cfg.tracking), "dir": log_dir(cfg.tracking, ctx["run"]),
                           "project": cfg.tracking.project}
    from probe_dpo.training import TrainConfig

    for dotted, value in [*arm.settings, *cfg.arm_settings.get(spec["arm"], {}).items(),
                          *(spec.get("overrides") or {}).items()]:
        set_dotted(TrainConfig, out, dotted, value, f"arm {spec['arm']}: training key {dotted!r}")
    return out


def check_arm_settings(cfg: ExperimentConfig) -> None:
    """Every arm's training config is valid (keys, types, ranges) before any compute; so are a
    search's keys (training keys of its arm, each sampler's values) and its metric."""
    from probe_dpo.config import from_dict
    from probe_dpo.training import TrainConfig

    fake = {"pairs": {"single": "p", "ensemble": "p", "classifier": "p"}, "control_sft": "c",
            "single": "s", "ensemble": "e"}
    ctx = {"run": "r", "testbed": "t", "base_model": "m"}
    for arm in cfg.arms:
        from_dict(TrainConfig, train_config_dict(cfg, ctx, fake, {"id": arm, "arm": arm, "seed": 0}),
                  f"arm {arm} (its settings and arm_settings.{arm})")
    search = cfg.search
    if search.arm is None:
        return
    if not search.space:
        raise UserError(f"search.space: empty: name the training keys of arm {search.arm} to search, e.g. "
                        "{train.lr: [loguniform, 1.0e-6, 1.0e-4]}")
    base = train_config_dict(cfg, ctx, fake, {"id": search.arm, "arm": search.arm, "seed": 0})
    from_dict(TrainConfig, base, f"search arm {search.arm} (its settings and arm_settings.{search.arm})")
    for key, (name, *args) in search.space.items():
        where = f"search.space.{key}"
        set_dotted(TrainConfig, {}, key, None, f"{where} (a training key of arm {search.arm})")
        for value in (args if SAMPLERS[name] == "range" else args[0]):  # the bounds, or every value
            tdict = copy.deepcopy(base)
            set_dotted(TrainConfig, tdict, key, value, where)
            from_dict(TrainConfig, tdict, f"{where} ({name} value {value!r})")
    check_search_metric(cfg)


def _roles() -> list[str]:
    from probe_dpo.detection import role_keys

    return list(role_keys({"best_probe": "p", "held_out": ["h"], "best_layer": 0}))


def search_metrics(judges: list[str]) -> list[str]:
    """The numeric result keys a search may optimise: ``flat_metrics`` of an evaluation of this
    shape (a judge panel, every probe role), the rows results.json and Tune get."""
    from probe_dpo.goodhart import OWN_ROLES

    roles = _roles()
    shape = {"perplexity": 0.0, "toxicity": {j: {"rate": 0.0} for j in judges},
             "summary": {"fixed": {role: {} for role in roles},
                         "own": {"policy": {judges[0]: {role: {} for role in OWN_ROLES if role in roles}}}}}
    return [k for k in flat_metrics(shape) if k not in ("trial", "arm", "seed", "atlas")]


def check_search_metric(cfg: ExperimentConfig) -> None:
    """One line unless ``search.metric`` is a key the search's result rows will have."""
    import difflib

    metric, valid = cfg.search.metric, search_metrics(cfg.eval.judges)
    if metric in valid:
        return
    close = difflib.get_close_matches(metric, valid, n=1, cutoff=0.6)
    raise UserError(f"search.metric {metric!r}: not a result of this run"
                    + (f" (did you mean {close[0]}?)" if close else "")
                    + f"; results have toxicity.<judge>.rate|change for the judges of eval.judges "
                      f"({', '.join(cfg.eval.judges)}), perplexity, perplexity_change, kl_to_base, "
                      "fixed.<role>.auroc|tpr|fpr[.delta] and own.<role>.auroc|tpr[.delta] "
                      f"(roles: {', '.join(_roles())})")


def trial_key_fields(tdict: dict) -> dict:
    """What identifies a trial's result: its training config without where it is logged or which
    GPU type runs it (so changing those reuses a finished trial)."""
    out = {k: v for k, v in tdict.items() if k != "tracking"}
    out["distributed"] = {k: v for k, v in out["distributed"].items() if k != "accelerator_type"}
    return out


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
    key = json_digest([trial_key_fields(tdict), ctx["eval"], config["base_key"]])
    eval_uri = storage.join(ctx["run"], "trials", spec["id"], "eval")
    if not cached(eval_uri, key, f"trial {spec['id']}"):
        tcfg = from_dict(TrainConfig, tdict, f"trial {spec['id']}")
        summary = train(tcfg, callbacks=[TuneReportCallback()])
        reference = load_eval(storage.join(ctx["run"], "shared", "base-eval"))
        result = run_eval(summary["policy"], ctx, reference, target_role(spec["arm"]))
        last = summary["rounds"][-1]
        result["metrics"].update(arm=spec["arm"], seed=spec["seed"], trial=spec["id"],
                                 overrides=spec.get("overrides") or {}, train=last.get("train", {}),
                                 train_seconds=summary.get("seconds"), rounds=len(summary["rounds"]),
                                 data=last.get("pairs") or last.get("sft"))
        publish_json(eval_uri, eval_files(result), {"kind": "evaluation", "key": key, "arm": spec["arm"],
                                                      "seed": spec["seed"]})
    metrics = storage.read_json(storage.join(eval_uri, "metrics.json"))
    tune.report(flat_metrics(metrics))


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
    """Tune's space of a search (its entries were checked when the config was built)."""
    from ray import tune

    kinds = {"loguniform": lambda a: tune.loguniform(a[0], a[1]), "uniform": lambda a: tune.uniform(a[0], a[1]),
             "choice": lambda a: tune.choice(a[0]), "grid": lambda a: tune.grid_search(a[0])}
    space = {}
    for key, value in search.space.items():
        name, *args = value
        space[key] = kinds[name](args)
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
