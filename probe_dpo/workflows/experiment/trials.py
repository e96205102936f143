"""The Tune driver's trials: one per arm and seed (or search sample), each a Ray Train +
DeepSpeed fine-tuning followed by the evaluation task."""

from __future__ import annotations

import logging
import time
from typing import Any

from probe_dpo import storage
from probe_dpo.config import set_dotted, to_dict
from probe_dpo.data import json_digest
from probe_dpo.errors import UserError
from probe_dpo.logs import setup as setup_logs
from probe_dpo.training.loop import TRAIN_METRICS, TRAIN_STEP
from probe_dpo.workflows.experiment.arms import ARMS, SharedInputs, arm_of, target_role
from probe_dpo.workflows.experiment.config import ExperimentConfig
from probe_dpo.workflows.experiment.evaluate import EvalContext, eval_files, load_eval, run_eval
from probe_dpo.workflows.experiment.results import flat_metrics, write_results
from probe_dpo.workflows.experiment.space import sampler_values
from probe_dpo.workflows.experiment.stages import cached, publish_json

log = logging.getLogger(__name__)


def check_arm_settings(cfg: ExperimentConfig) -> None:
    """Every arm's training config is valid (keys, types, ranges) before any compute; so are a
    search's keys (training keys of its arm, each sampler's values) and its metric."""
    from probe_dpo.training import TrainConfig
    from probe_dpo.training.run import check_penalty

    for arm in cfg.arms:
        tcfg = arm_of(arm).train_config(cfg, PLACEHOLDER, arm, 0, where=f"arm {arm} (its settings and arm_settings.{arm})")
        check_penalty(tcfg, f"arm {arm}: ")
    search = cfg.search
    if search.arm is None:
        return
    if not search.space:
        raise UserError(f"search.space: empty: name the training keys of arm {search.arm} to search, e.g. "
                        "{train.lr: {loguniform: [1.0e-6, 1.0e-4]}}")
    arm = ARMS[search.arm]
    arm.train_config(cfg, PLACEHOLDER, arm.name, 0, where=f"search arm {arm.name} (its settings and "
                                                          f"arm_settings.{arm.name})")
    for key, entry in search.space.items():
        where = f"search.space.{key}"
        set_dotted(TrainConfig, {}, key, None, f"{where} (a training key of arm {search.arm})")
        name = next(iter(entry))
        for value in sampler_values(entry):  # a range's bounds, or every value
            check_penalty(arm.train_config(cfg, PLACEHOLDER, arm.name, 0, {key: value},
                                           where=f"{where} ({name} value {value!r})"),
                          f"{where} ({name} value {value!r}): ")
    check_search_metric(cfg)
    check_search_plan(cfg, search_base(cfg))


# Placeholder shared inputs: an arm's training config checked before anything is built (their
# values are in the name of a search's Tune experiment: changing them would restart searches).
PLACEHOLDER = SharedInputs(run="r", testbed="t", base_model="m", probes={"single": "s", "ensemble": "e"},
                           pairs={"single": "p", "ensemble": "p", "classifier": "p"}, control_sft="c")


def search_base(cfg: ExperimentConfig) -> dict:
    """The searched arm's training settings before a sample's overrides (placeholder paths)."""
    arm = cfg.search.arm
    return arm_of(arm).train_settings(cfg, PLACEHOLDER, arm, 0)


def check_search_plan(cfg: ExperimentConfig, base: dict) -> None:
    """The search's algorithm, scheduler and metrics go together (one line before Ray starts
    otherwise): Optuna is installed; ASHA ranks on a training metric over one training round
    whose length (search.asha.max_t or the arm's train.max_steps) is known."""
    import importlib.util

    search = cfg.search
    if search.algorithm == "optuna" and importlib.util.find_spec("optuna") is None:
        raise UserError("search.algorithm=optuna: the optuna package is not installed "
                        "(pip install 'probe-dpo[search]')")
    if search.scheduler != "asha":
        return
    if search.metric not in TRAIN_METRICS:
        raise UserError(f"search.scheduler=asha: search.metric {search.metric!r} is measured once, after training, "
                        f"and ASHA stops trials on what they report while they train: use a training metric "
                        f"({', '.join(TRAIN_METRICS)}) or search.scheduler=fifo")
    rounds = search.space.get("dpo.rounds") and max(sampler_values(search.space["dpo.rounds"]))
    if (rounds or base.get("dpo", {}).get("rounds") or 1) > 1:
        raise UserError(f"search.scheduler=asha: arm {search.arm} trains more than one round (dpo.rounds) and each "
                        "round counts its steps from 0: search one round, or use search.scheduler=fifo")
    if search.asha.max_t is None and base["train"].get("max_steps") is None and "train.max_steps" not in search.space:
        raise UserError(f"search.asha.max_t: arm {search.arm} trains for train.epochs, not a number of steps: "
                        "give ASHA's last rung in optimizer steps (search.asha.max_t=...) or set train.max_steps")
    max_t = asha_max_t(cfg, base)
    if search.asha.grace_period > max_t:
        raise UserError(f"search.asha.grace_period: {search.asha.grace_period} steps is past ASHA's last rung "
                        f"({max_t} steps: search.asha.max_t or the arm's train.max_steps)")


def asha_max_t(cfg: ExperimentConfig, base: dict) -> int:
    """ASHA's last rung, in optimizer steps: search.asha.max_t, else the arm's train.max_steps
    (the largest a search of train.max_steps can sample)."""
    if cfg.search.asha.max_t is not None:
        return cfg.search.asha.max_t
    if "train.max_steps" in cfg.search.space:
        return int(max(sampler_values(cfg.search.space["train.max_steps"])))
    return int(base["train"]["max_steps"])


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
    """One line unless each ``search.metric`` is a key the search's trials report: an evaluation
    result (a results.json row's key) or a training metric the searched arm logs."""
    import difflib

    arm = ARMS[cfg.search.arm] if cfg.search.arm else None
    valid = search_metrics(cfg.eval.judges) + list(TRAIN_METRICS)
    for metric in cfg.search.metrics:
        if metric in TRAIN_METRICS and arm is not None:
            if metric == "train.probe_penalty" and arm.probes is None:
                raise UserError(f"search.metric {metric!r}: arm {cfg.search.arm} trains against no probe "
                                "(no probe penalty to log)")
            if metric == "train.probe_penalty" and arm.data == "prompts":
                raise UserError(f"search.metric {metric!r}: arm {cfg.search.arm} is a GRPO arm: its probe is a reward, "
                                "not a penalty (no probe penalty to log)")
            if metric.startswith("train.rewards.") and not arm.data.startswith("pairs:"):
                raise UserError(f"search.metric {metric!r}: arm {cfg.search.arm} is not a DPO arm (no rewards to log)")
        if metric in valid:
            continue
        close = difflib.get_close_matches(metric, valid, n=1, cutoff=0.6)
        raise UserError(f"search.metric {metric!r}: not a result of this run"
                        + (f" (did you mean {close[0]}?)" if close else "")
                        + f"; results have toxicity.<judge>.rate|change for the judges of eval.judges "
                          f"({', '.join(cfg.eval.judges)}), perplexity, perplexity_change, kl_to_base, "
                          "fixed.<role>.auroc|tpr|fpr[.delta] and own.<role>.auroc|tpr[.delta] "
                          f"(roles: {', '.join(_roles())}), and training metrics {', '.join(TRAIN_METRICS)}")


def trial_key_fields(tdict: dict) -> dict:
    """What identifies a trial's result: its training config without where it is logged or which
    GPU type runs it (so changing those reuses a finished trial)."""
    out = {k: v for k, v in tdict.items() if k != "tracking"}
    out["distributed"] = {k: v for k, v in out["distributed"].items() if k != "accelerator_type"}
    return out


def _train_progress_to_tune() -> Any:
    """Ray Train's ``TuneReportCallback`` for a search under ASHA: only the workers' progress
    reports (``TRAIN_STEP`` and the training metrics) reach Tune. Their checkpoint and closing
    reports carry no search metric, and Tune refuses a result without it."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrainProgressToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and TRAIN_STEP in metrics[0]:
                super().after_report(run_context, metrics, None)

    return TrainProgressToTune()


def run_trial(config: dict, *, experiment: ExperimentConfig, shared: SharedInputs, ctx: EvalContext,
              base_key: str) -> None:
    """A Tune function trainable: train one arm and seed on Ray Train, evaluate, report.

    ``config`` is Tune's: the trial's ``spec`` (arm, seed, id, or a search sample's
    ``overrides``) and ``progress``. The experiment's typed objects come as they are, through
    ``tune.with_parameters`` (``run_tune``): Tune writes its ``config`` to params.json and the
    trackers with ``str()`` for anything not JSON, so they stay out of it.

    The final report is the evaluation's flat metrics plus the training metrics at the end
    (``train.loss``, ``train.probe_penalty``, ... and ``train.step``). A search trial under ASHA
    (``config["progress"]``) also reports the training metrics while it trains: ASHA may stop
    it then, before it is evaluated. Other trials pass Ray Train's reports on as they come."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from probe_dpo.training import train
    from probe_dpo.workflows.experiment.search import final_train_metrics

    setup_logs()  # a Tune trial runs in its own Ray worker process
    spec, cfg = config["spec"], experiment
    arm, overrides = arm_of(spec["arm"]), spec.get("overrides")
    if overrides:  # named by its whole training config: the same sample of another search
        # (other base settings) is another trial; one with the same config reuses its evaluation
        sample = {k: v for k, v in trial_key_fields(arm.train_settings(cfg, shared, "-", spec["seed"],
                                                                       overrides)).items() if k != "out"}
        spec = {**spec, "id": f"search-{spec['arm']}-{json_digest(sample)[:8]}"}
    tdict = arm.train_settings(cfg, shared, spec["id"], spec["seed"], overrides)
    key = json_digest([trial_key_fields(tdict), to_dict(ctx.eval), base_key])
    eval_uri = storage.join(shared.run, "trials", spec["id"], "eval")
    if not cached(eval_uri, key, f"trial {spec['id']}"):
        tcfg = arm.train_config(cfg, shared, spec["id"], spec["seed"], overrides)
        progress = config.get("progress")
        if progress:
            summary = train(tcfg, callbacks=[_train_progress_to_tune()], report_steps=progress)
        elif overrides:  # a search's metric is in no Train report: Tune would refuse them
            summary = train(tcfg)
        else:
            summary = train(tcfg, callbacks=[TuneReportCallback()])
        reference = load_eval(storage.join(ctx.run, "shared", "base-eval"))
        result = run_eval(summary["policy"], ctx, reference, target_role(spec["arm"]))
        last = summary["rounds"][-1]
        result["metrics"].update(arm=spec["arm"], seed=spec["seed"], trial=spec["id"],
                                 overrides=spec.get("overrides") or {}, train=last.get("train", {}),
                                 train_seconds=summary.get("seconds"), rounds=len(summary["rounds"]),
                                 data=last.get("pairs") or last.get("sft"))
        publish_json(eval_uri, eval_files(result), {"kind": "evaluation", "key": key, "arm": spec["arm"],
                                                      "seed": spec["seed"]})
    metrics = storage.read_json(storage.join(eval_uri, "metrics.json"))
    tune.report({**flat_metrics(metrics), **final_train_metrics(metrics.get("train") or {})})


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


def run_tune(cfg: ExperimentConfig, shared: SharedInputs, ctx: EvalContext, base_key: str, specs: list[dict],
             search: bool = False) -> dict | None:
    """Run the arms' trials (a grid over ``specs``), or the search, as one Tune experiment.

    A search's Tune experiment is named after what it searches (the search settings, the arm's
    training config, the evaluation and the base model's key): run again, it is resumed with
    ``Tuner.restore`` (finished trials are not run again, unfinished and errored ones are),
    and its outcome (every trial, the Pareto set) is written to ``searches/<name>.json``."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from probe_dpo.ray_utils import fail_once_on_user_error, raise_user_errors
    from probe_dpo.tracking import tune_callbacks

    run = shared.run
    fs, path = storage.pyarrow_filesystem(storage.join(run, "tune"))
    s = cfg.search
    if search:
        from probe_dpo.workflows.experiment.search import search_algorithm, search_scheduler, tune_space

        base = search_base(cfg)
        max_t = asha_max_t(cfg, base) if s.scheduler == "asha" else 0
        param_space = {"spec": {"arm": s.arm, "seed": cfg.seeds[0], "overrides": tune_space(s)},
                       "progress": s.asha.report_steps if s.scheduler == "asha" else None}
        single = len(s.metrics) == 1  # several: the searcher holds them (Tune's metric is one key)
        tune_config = tune.TuneConfig(num_samples=s.num_samples, metric=s.metric if single else None,
                                      mode=s.mode if single else None, scheduler=search_scheduler(s, max_t),
                                      search_alg=search_algorithm(s), max_concurrent_trials=cfg.concurrent_trials)
        name = f"search-{s.arm}-" + json_digest([to_dict(s), trial_key_fields(base), to_dict(ctx.eval), base_key])[:8]
        metric = s.metrics
    else:
        param_space = {"spec": tune.grid_search(specs)}
        tune_config = tune.TuneConfig(max_concurrent_trials=cfg.concurrent_trials, scheduler=FIFOScheduler())
        name = f"arms-{time.strftime('%Y%m%d-%H%M%S')}"
        metric = None
    trainable = tune.with_parameters(fail_once_on_user_error(run_trial, metric=metric),  # no retries
                                     experiment=cfg, shared=shared, ctx=ctx, base_key=base_key)
    trainable = tune.with_resources(trainable, {"cpu": 1})
    experiment = f"{path.rstrip('/')}/{name}"
    restored = search and tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    if restored:
        log.info(f"Tune: resuming the search's experiment {storage.join(run, 'tune', name)}")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True, param_space=param_space,
                                   storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space, tune_config=tune_config,
            run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                                      callbacks=[_report_callback(run), *tune_callbacks(cfg.tracking, run)],
                                      failure_config=tune.FailureConfig(max_failures=cfg.trial_retries), verbose=1))
    results = tuner.fit()
    raise_user_errors(results)  # a trial's UserError, as the same one line
    outcome = None
    if search:
        from probe_dpo.workflows.experiment.search import search_outcome, write_outcome

        outcome = search_outcome(results, s, name, storage.join(run, "tune", name), restored=bool(restored))
        write_outcome(run, outcome)
        log.info(f"search {name}: {len(outcome['trials'])} trial(s); Pareto set {outcome['pareto']}")
    errors = [r.error for r in results if r.error is not None]
    if errors:
        from probe_dpo.ray_utils import unwrap_ray_error

        inner = unwrap_ray_error(errors[0])
        if isinstance(inner, UserError):
            raise inner
        raise RuntimeError(f"{len(errors)} trial(s) failed; the first: {errors[0]}")
    return outcome
