"""Starting or joining Ray with the environment workers need.

Workers on a remote cluster do not see the driver's environment, so ``init_ray`` passes
the variables that storage and offline loading depend on (``AWS_*``, ``HF_*_OFFLINE``,
``PROBE_DPO_CACHE``, ...) through ``runtime_env.env_vars``. Only variable *names* are ever
logged or returned; values (credentials) never are.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

from probe_dpo.errors import UserError, find_user_error, one_line

log = logging.getLogger(__name__)

# Variables passed to every Ray worker when set on the driver.
FORWARDED_PREFIXES = ("AWS_",)
FORWARDED_NAMES = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
    "PROBE_DPO_CACHE", "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR", "KERAS_BACKEND",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
)


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The driver variables to forward to workers (plus ``extra``)."""
    env = {k: v for k, v in os.environ.items()
           if k in FORWARDED_NAMES or k.startswith(FORWARDED_PREFIXES)}
    env.update(extra or {})
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None, *,
             env: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Start a local Ray (``address=None``) or join one (``"auto"``, ``"ray://host:10001"``, ...).

    Returns ``{"address", "started", "forwarded"}`` where ``forwarded`` lists the names
    (never the values) of the variables passed to workers. When Ray is already
    initialised in this process it is reused as is.
    """
    import ray

    forwarded = worker_env(env)
    address = address or os.environ.get("RAY_ADDRESS") or None  # inside `ray job submit`: join that cluster
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A Ray job's driver: the job's runtime env (cluster/submit.sh) already reaches every
        # worker, and Ray refuses a second one that names the same variables.
        forwarded = dict(env or {})
    if ray.is_initialized():
        return {"address": _address(ray), "started": False, "forwarded": sorted(forwarded)}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.update(forwarded)
    runtime_env["env_vars"] = env_vars
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "runtime_env": runtime_env}
    if address is None:
        options["num_cpus"] = num_cpus
    options.update(kwargs)
    try:
        # "local": always a new local cluster. Plain ray.init() would join whatever cluster
        # `ray start` last started on this machine, with other CPUs and another environment.
        ray.init(address=address or "local", **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        from probe_dpo.errors import UserError

        raise UserError(f"cannot start or join Ray at {address or 'a local cluster'}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    log.info("ray %s; forwarding to workers: %s", _address(ray), ", ".join(sorted(forwarded)) or "nothing")
    return {"address": _address(ray), "started": True, "forwarded": sorted(forwarded)}


def _address(ray: Any) -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - informational only
        return "?"


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The user's exception inside a Ray task error (a UserError raised in an actor), else ``exc``."""
    return find_user_error(exc) or exc


# ---------------------------------------------------------------------------------------------
# Tune: a UserError fails its trial once


USER_ERROR_KEY = "probe_dpo_user_error"


def fail_once_on_user_error(trainable: Callable[[dict], Any], metric: str | None = None) -> Callable[[dict], Any]:
    """A Tune function trainable that ends its trial, without a retry, when it raises a UserError.

    Tune retries every failed trial (``FailureConfig.max_failures``) and has no way to exempt an
    error type; bad input fails the same way every time, so a retry only wastes the cluster.
    The wrapper catches the UserError (also one a Ray Train worker raised), reports it as the
    trial's last result (``USER_ERROR_KEY``; ``metric``, the search metric if any, as NaN so Tune's
    metric check passes) and returns: the trial ends once. ``raise_user_errors`` re-raises it in
    the driver as the same one line. Any other error still fails (and retries) the trial.
    """

    @functools.wraps(trainable)
    def wrapper(config: dict) -> Any:
        try:
            return trainable(config)
        except Exception as exc:  # noqa: BLE001 - re-raised unless a UserError is behind it
            user = find_user_error(exc)
            if user is None:
                raise
            from ray import tune

            result: dict[str, Any] = {USER_ERROR_KEY: one_line(user)}
            if metric:
                result[metric] = float("nan")
            tune.report(result)
            return None

    return wrapper


def raise_user_errors(results: Any) -> None:
    """Re-raise in the driver the first UserError a trial ended with (``fail_once_on_user_error``)."""
    for result in results:
        message = (getattr(result, "metrics", None) or {}).get(USER_ERROR_KEY)
        if message:
            raise UserError(message)
