"""A hyperparameter search in Ray Tune's terms: its space, search algorithm, scheduler, the
Tune experiment it runs in (resumed with ``Tuner.restore`` on a re-run) and its outcome (every
trial's final metrics and the Pareto set) for results.json.

The trials themselves are ``trials.run_trial``: train the searched arm with the sampled
overrides, evaluate it, report. Under ASHA a trial also reports its training metrics
(``train.loss``, ``train.probe_penalty``, ...) every ``search.asha.report_steps`` optimizer
steps while it trains (``TRAIN_STEP`` is ASHA's time); the evaluation's metrics exist only once
it has trained, so ASHA can only rank trials on a training metric.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from probe_dpo import storage
from probe_dpo.training.loop import TRAIN_METRICS, TRAIN_STEP
from probe_dpo.workflows.experiment.config import SearchSettings
from probe_dpo.workflows.experiment.space import SAMPLERS

SEARCHES = "searches"  # <run>/searches/<tune experiment name>.json: each search's outcome


def tune_space(search: SearchSettings) -> dict:
    """Tune's domains for ``search.space`` (entries normalised and checked when the config loaded)."""
    from ray import tune

    space = {}
    for key, entry in search.space.items():
        (name, args), = entry.items()
        space[key] = getattr(tune, name)(*args) if SAMPLERS[name] != ("values",) else getattr(tune, name)(list(args))
    return space


def search_algorithm(search: SearchSettings) -> Any:
    """Tune's search algorithm: random/grid sampling, or Optuna's TPE (seeded; several metrics:
    its multi-objective mode)."""
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        if len(search.metrics) > 1:  # Tune's own metric/mode take one: the searcher holds the list
            return OptunaSearch(metric=search.metrics, mode=search.modes, seed=search.seed)
        return OptunaSearch(seed=search.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search.seed)


def search_scheduler(search: SearchSettings, max_t: int) -> Any:
    """FIFO, or ASHA over ``TRAIN_STEP`` (rungs at grace_period x reduction_factor^k steps up to
    max_t). A trial past the last rung is not stopped: it trains to the end and is evaluated."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if search.scheduler == "asha":
        a = search.asha
        return ASHAScheduler(time_attr=TRAIN_STEP, max_t=max_t, grace_period=a.grace_period,
                             reduction_factor=a.reduction_factor, stop_last_trials=False)
    return FIFOScheduler()


def final_train_metrics(train: Mapping[str, Any]) -> dict:
    """A trial's training metrics at its end (the last logged values, NaN when not logged), from
    the Train run's summary: what the trial's final Tune result carries besides the evaluation."""
    out = {TRAIN_STEP: train.get("global_step")}
    for key, name in TRAIN_METRICS.items():
        value = train.get(f"last_{name}")
        out[key] = float(value) if value is not None else float("nan")
    return out


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def pareto_front(points: Sequence[Mapping[str, Any]], metrics: Sequence[str], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points: those no other point matches or beats on every metric
    while beating on at least one (``modes``: min or max per metric). A point missing a metric
    (absent, None or NaN) is in no front. Equal points are all kept."""
    signs = [1.0 if mode == "min" else -1.0 for mode in modes]
    scored = []
    for i, point in enumerate(points):
        values = [_number(point.get(m)) for m in metrics]
        if all(v is not None for v in values):
            scored.append((i, [s * v for s, v in zip(signs, values)]))
    front = []
    for i, a in scored:
        dominated = any(all(x <= y for x, y in zip(b, a)) and any(x < y for x, y in zip(b, a))
                        for j, b in scored if j != i)
        if not dominated:
            front.append(i)
    return front


def search_outcome(results: Any, search: SearchSettings, name: str, path: str, restored: bool) -> dict:
    """Every trial of a search (Tune's ``ResultGrid``) with its overrides, status and final
    metrics, and the Pareto set of the evaluated ones (one objective: the best, ties kept)."""
    trials = []
    for result in results:
        m = dict(result.metrics or {})
        config = result.config or {}
        overrides = (config.get("spec") or {}).get("overrides") or {}
        if result.error is not None:
            status = "failed"
        elif m.get("trial"):  # the evaluation's row: trained to the end and evaluated
            status = "evaluated"
        else:
            status = "stopped early" if search.scheduler == "asha" else "not finished"
        row = {"tune_trial": m.get("trial_id") or getattr(result, "path", None), "trial": m.get("trial"),
               "status": status, "overrides": overrides, TRAIN_STEP: m.get(TRAIN_STEP),
               "reports": m.get("training_iteration")}
        row.update({metric: _number(m.get(metric)) for metric in search.metrics})
        trials.append(row)
    trials.sort(key=lambda r: str(r["tune_trial"]))
    evaluated = [r for r in trials if r["status"] == "evaluated"]
    front = [evaluated[i] for i in pareto_front(evaluated, search.metrics, search.modes)]
    return {"name": name, "tune_experiment": path, "arm": search.arm, "algorithm": search.algorithm,
            "scheduler": search.scheduler, "metric": search.metrics, "mode": search.modes,
            "space": search.space, "num_samples": search.num_samples, "resumed": restored,
            "trials": trials, "pareto": [r["trial"] for r in front],
            "pareto_rows": [{"trial": r["trial"], "overrides": r["overrides"],
                             **{metric: r[metric] for metric in search.metrics}} for r in front]}


def write_outcome(run: str, outcome: dict) -> str:
    uri = storage.join(run, SEARCHES, f"{outcome['name']}.json")
    storage.write_json(uri, outcome)
    return uri


def read_outcomes(run: str) -> list[dict]:
    """Every search's outcome written to this run folder (by name)."""
    folder = storage.join(run, SEARCHES)
    if not storage.exists(folder):
        return []
    return [storage.read_json(storage.join(folder, f)) for f in sorted(storage.list_dir(folder))
            if f.endswith(".json")]
