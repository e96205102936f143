"""Starting or joining Ray without putting secrets where Ray records them.

Ray keeps a job's and a driver's ``runtime_env`` (``env_vars`` included) in its job table:
``JobSubmissionClient.get_job_info``, ``ray list jobs`` and the dashboard show it to anyone
who can reach the cluster. So credentials never go into ``runtime_env.env_vars``. Workers get
storage credentials one of these ways (``cluster/README.md`` has the set-up of each):

1. **A cluster this process starts** (``init_ray()`` without an address): its raylet and every
   worker are child processes of this one and inherit its environment. Nothing is forwarded.
2. **The cluster's own credentials** (the default when joining a cluster): an IAM instance
   profile or IRSA role, a Kubernetes Secret the pods load with ``envFrom``, or a credentials
   file on the nodes (``AWS_SHARED_CREDENTIALS_FILE``).
3. **Passed from the submitting shell, when a user must** (``PROBE_DPO_PASS_CREDENTIALS=1`` for
   ``init_ray``, ``cluster/submit.sh --pass-credentials``): the credential variables are written
   to a file in a one-off Python package (mode 0600 in a 0700 folder) shipped as a runtime-env
   ``py_module``. Ray uploads it into the cluster's internal store and unpacks it on the nodes
   that run the job's workers; the job's metadata holds only the package's content-hash URI
   (``gcs://_ray_pkg_<hash>.zip``). A worker setup hook (``load_passed_credentials``) copies
   the values into each worker's environment; they are never printed or logged.

Non-secret settings (S3 endpoint, region, offline flags, ``PROBE_DPO_*``, the trackers' ``WANDB_*`` and
``MLFLOW_*`` settings less their keys and passwords) are still forwarded by
value in ``env_vars``: workers need them and they reveal nothing.

Token authentication: a local cluster started here runs with Ray's token authentication
(``RAY_AUTH_MODE=token``, Ray 2.60's own default for new local clusters) unless the environment
sets ``RAY_AUTH_MODE=disabled``. The token is ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` when
set, else a fresh random one kept in this process's environment (so only its child processes,
the cluster's own, know it) and never written to disk.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from probe_dpo.errors import UserError, find_user_error, one_line

log = logging.getLogger(__name__)

# True once init_ray has started the embedded local cluster in this process (the driver's
# machine is then the whole cluster); False when it joined one or Ray was started elsewhere.
_STARTED_LOCAL_CLUSTER = False

# Credentials: never forwarded through runtime_env.env_vars.
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_SECRET_RE = re.compile(r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|PRIVATE|KEY)(_|$)")
# Non-secret settings passed to every Ray worker when set on the driver.
FORWARDED_NAMES = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
    "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR", "KERAS_BACKEND", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
)
FORWARDED_PREFIXES = ("PROBE_DPO_", "WANDB_", "MLFLOW_")  # trackers: the user's settings (probe_dpo.tracking)
# The package that carries passed credentials (cluster/submit.sh writes the same layout).
CREDENTIALS_MODULE = "_probe_dpo_credentials"
CREDENTIALS_FILE = "env.json"
SETUP_HOOK = "probe_dpo.ray_utils.load_passed_credentials"


def is_secret(name: str) -> bool:
    """True for a variable that holds a credential (never forwarded, never logged)."""
    return name in SECRET_NAMES or bool(_SECRET_RE.search(name))


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's non-secret settings to forward to workers (plus ``extra``, which must hold none)."""
    env = {k: v for k, v in os.environ.items()
           if (k in FORWARDED_NAMES or k.startswith(FORWARDED_PREFIXES)) and not is_secret(k)}
    secret = sorted(k for k in (extra or {}) if is_secret(k))
    if secret:
        raise UserError(f"refusing to put {', '.join(secret)} into Ray's runtime env (Ray records it in the "
                        "job's metadata): give workers credentials as cluster/README.md describes")
    env.update(extra or {})
    return env


def passed_secrets() -> list[str]:
    """Names of the credential variables set in this process's environment."""
    return sorted(k for k in SECRET_NAMES if os.environ.get(k))


def write_credentials_module(folder: str | Path) -> Path:
    """Write the credentials package (``SECRET_NAMES`` set here) under ``folder``; returns its path."""
    package = Path(folder) / CREDENTIALS_MODULE
    package.mkdir(mode=0o700, parents=True, exist_ok=False)
    (package / "__init__.py").write_text('"""Credentials passed to one Ray job (probe_dpo.ray_utils)."""\n')
    fd = os.open(package / CREDENTIALS_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({k: os.environ[k] for k in passed_secrets()}, f)
    return package


_LOADED: dict[str, list[str]] = {}  # "names": what load_passed_credentials set (once per process)


def load_passed_credentials() -> list[str]:
    """Copy credentials passed with the job (the ``_probe_dpo_credentials`` package) into this
    process's environment; returns their names. The runtime env's worker setup hook, and
    storage before its first S3 use (the job's driver runs no setup hook). Idempotent."""
    if "names" in _LOADED:
        return list(_LOADED["names"])
    _LOADED["names"] = []
    spec = importlib.util.find_spec(CREDENTIALS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return []
    path = Path(list(spec.submodule_search_locations)[0]) / CREDENTIALS_FILE
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    for name, value in values.items():
        if name in SECRET_NAMES and isinstance(value, str):
            os.environ[name] = value
            _LOADED["names"].append(name)
    return list(_LOADED["names"])


@contextlib.contextmanager
def _credentials_runtime_env(runtime_env: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``runtime_env`` plus the credentials package (``py_modules``) and its setup hook; the local
    copy is deleted once Ray has uploaded it (``ray.init`` returns)."""
    names = passed_secrets()
    if not names:
        yield runtime_env
        return
    folder = tempfile.mkdtemp(prefix="probe-dpo-credentials-")
    try:
        package = write_credentials_module(folder)
        yield {**runtime_env, "py_modules": [*(runtime_env.get("py_modules") or []), str(package)],
               "worker_process_setup_hook": SETUP_HOOK}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _token_auth_for_a_new_cluster() -> None:
    """Token authentication for a local cluster started here, with a token only this process and
    its children know (unless the environment chose a mode or a token)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


class _NoDefaultAuthWarning(logging.Filter):
    """Ray warns that it turned token authentication on by default: here that is the intent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def init_ray(address: str | None = None, num_cpus: int | None = None, *,
             env: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Start a local Ray (``address=None``) or join one (``"auto"``, ``"ray://host:10001"``, ...).

    Returns ``{"address", "started", "forwarded", "credentials"}``: the names (never the values)
    of the settings forwarded to workers, and how workers get storage credentials. When Ray is
    already initialised in this process it is reused as is.
    """
    import ray

    forwarded = worker_env(env)
    address = address or os.environ.get("RAY_ADDRESS") or None  # inside `ray job submit`: join that cluster
    in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    if in_job:
        # A Ray job's driver: the job's runtime env (cluster/submit.sh) already reaches every
        # worker, and Ray refuses a second one that names the same variables.
        forwarded = dict(env or {})
        load_passed_credentials()
    if ray.is_initialized():
        return {"address": _address(ray), "started": False, "forwarded": sorted(forwarded), "credentials": "as set up"}
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    if any(is_secret(k) for k in runtime_env.get("env_vars") or {}):
        worker_env(runtime_env["env_vars"])  # raises, naming them
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **forwarded}
    if address is None:
        how = "inherited by the local cluster's processes"
        _token_auth_for_a_new_cluster()
    elif in_job:
        how = "the job's (cluster/submit.sh)"
    elif _truthy("PROBE_DPO_PASS_CREDENTIALS") and passed_secrets():
        how = "passed as a runtime-env package: " + ", ".join(passed_secrets())
    else:
        how = "the cluster's own" + (f" (not passed: {', '.join(passed_secrets())}; set PROBE_DPO_PASS_CREDENTIALS=1 "
                                     "to pass them)" if passed_secrets() else "")
    # On a cluster (a Ray job, or joining one) the workers' log lines go to the driver, so that
    # `ray job logs` shows the training and evaluation progress; the embedded local default
    # keeps its console to the driver's own lines.
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": address is not None}
    if address is None:
        options["num_cpus"] = num_cpus
    options.update(kwargs)
    setup_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    quiet = _NoDefaultAuthWarning()
    setup_log.addFilter(quiet)
    passing = address is not None and not in_job and _truthy("PROBE_DPO_PASS_CREDENTIALS")
    try:
        with (_credentials_runtime_env(runtime_env) if passing else contextlib.nullcontext(runtime_env)) as renv:
            # "local": always a new local cluster. Plain ray.init() would join whatever cluster
            # `ray start` last started on this machine, with other CPUs and another environment.
            ray.init(address=address or "local", runtime_env=renv, **options)
        global _STARTED_LOCAL_CLUSTER
        _STARTED_LOCAL_CLUSTER = address is None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot start or join Ray at {address or 'a local cluster'}: {one_line(exc)[:300]}") from None
    finally:
        setup_log.removeFilter(quiet)
    log.info("ray %s; forwarding to workers: %s; storage credentials: %s", _address(ray),
             ", ".join(sorted(forwarded)) or "nothing", how)
    return {"address": _address(ray), "started": True, "forwarded": sorted(forwarded), "credentials": how}


def _address(ray: Any) -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - informational only
        return "?"


def cluster_gpus() -> int:
    """GPUs the Ray cluster has now, or can have: the most its autoscaler may add when it
    declares its node types (KubeRay, autoscaler v2), whichever is larger. An autoscaling
    cluster that starts with no GPU node still counts the GPUs it can scale to."""
    import ray

    return max(int(ray.cluster_resources().get("GPU", 0)), _declared_max_gpus())


def _declared_max_gpus() -> int:
    """The most GPUs the cluster's autoscaler declares it can have (0: no autoscaler config)."""
    try:  # the same reading Ray Train makes of the autoscaler's cluster config
        from ray._private.state import state

        most = int((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0))
    except Exception:  # noqa: BLE001 - no autoscaler config (a local or fixed-size cluster)
        most = 0
    return min(most, 1 << 20)


def check_gpus(needed: int, what: str, *, accelerator_type: str | None = None,
               resources: dict[str, float] | None = None, can_scale_to: int | None = None) -> int:
    """One line (``UserError``) when one unit of work needs more GPUs at once than the Ray cluster
    has or its autoscaler declares it can add: Ray would queue it and wait forever. Call it after
    Ray is up, before any compute. ``what`` names the setting (``distributed.workers=4 with
    distributed.use_gpu``); ``resources`` is ``ray.cluster_resources()`` and ``can_scale_to`` the
    autoscaler's most, both read from the cluster when None. Returns the GPUs counted."""
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    if can_scale_to is None:
        can_scale_to = _declared_max_gpus()
    now = int(resources.get("GPU", 0))
    have = max(now, can_scale_to)
    fix = "lower distributed.workers, or set distributed.use_gpu=false to train on CPUs"
    where = f"the Ray cluster has {now} GPU(s)" + (f" and can scale to {can_scale_to}" if can_scale_to else
                                                    " and declares none it can add")
    if needed > have:
        raise UserError(f"{what} needs {needed} GPU(s) at once; {where}: {fix}")
    if accelerator_type and not can_scale_to and f"accelerator_type:{accelerator_type}" not in resources:
        kinds = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
        raise UserError(f"distributed.accelerator_type {accelerator_type}: the Ray cluster has no GPU of this type "
                        f"(it has: {', '.join(kinds) or 'none named'}) and declares none it can add")
    return have


def resolve_use_gpu(setting: bool | str) -> bool:
    """``use_gpu`` as a bool: ``auto`` is true when the cluster has or can autoscale to a GPU.

    Resolved once per entry point (a training run, an experiment), after Ray is up, so every
    component after it (Train workers, extraction and sampling actors, evaluation tasks) uses
    the same answer and the run's config and keys record the bool that ran."""
    if setting == "auto":
        return cluster_gpus() > 0
    return bool(setting)


def gpu_options(use_gpu: bool, accelerator_type: str | None = None, num_cpus: float = 1) -> dict[str, Any]:
    """Ray resource options of one task or actor: one GPU (of ``accelerator_type`` when given)
    when ``use_gpu``, else ``num_cpus`` CPU slots. One definition for every GPU consumer."""
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if use_gpu:
        options["num_gpus"] = 1
        if accelerator_type:
            options["accelerator_type"] = accelerator_type
    return options


def run_heavy(fn: Callable[..., Any], *args: Any, use_gpu: bool, threads: int | None = None,
              accelerator_type: str | None = None) -> Any:
    """``fn(*args)`` where model work belongs. Joined to a cluster (an address, a Ray job, or a
    Ray this process did not start): a Ray task with declared resources (one GPU when
    ``use_gpu``, else one CPU slot with ``threads`` torch threads), outside any placement group,
    so the driver on the head node loads no model and a GPU stage waits for a GPU node instead
    of running on the head's CPUs. On the embedded local default (``init_ray()`` started Ray
    here, so this machine is the cluster): in this process, where its progress shows.

    A UserError raised inside the task comes back as itself (one line for the user)."""
    import ray

    if _STARTED_LOCAL_CLUSTER or not ray.is_initialized():
        return fn(*args)
    return run_task(fn, *args, use_gpu=use_gpu, threads=threads, accelerator_type=accelerator_type)


def run_task(fn: Callable[..., Any], *args: Any, use_gpu: bool, threads: int | None = None,
             accelerator_type: str | None = None) -> Any:
    """``fn(*args)`` as a Ray task, always: ``gpu_options`` resources, no retries, and outside
    any placement group ("DEFAULT": a Tune trial's slots are held by its Train workers). A
    UserError raised inside comes back as itself."""
    import ray

    options = {**gpu_options(use_gpu, accelerator_type), "max_retries": 0, "scheduling_strategy": "DEFAULT"}
    task = ray.remote(_in_task).options(**options)
    try:
        return ray.get(task.remote(fn, threads, *args))
    except Exception as exc:  # noqa: BLE001 - a UserError raised in the task is the user's
        raise unwrap_ray_error(exc) from None


def _in_task(fn: Callable[..., Any], threads: int | None, *args: Any) -> Any:
    import torch

    from probe_dpo.logs import setup as setup_logs

    setup_logs()  # a task runs in its own worker process
    if threads:  # Ray sets OMP_NUM_THREADS to the task's CPU slots (1)
        torch.set_num_threads(threads)
    return fn(*args)


def gpu_actors(asked: int, gpus: int, what: str) -> int:
    """Actors that each take one GPU: no more than the cluster has or can add (more would wait
    for a GPU that never comes, a silent hang on a one-GPU machine)."""
    if gpus == 0:
        log.warning(f"{what}: use_gpu is set but the Ray cluster has no GPU and declares none it can add; "
                    "its actors wait for a GPU node to join")
        return asked
    if asked > gpus:
        log.info(f"{what}: {asked} actors asked, the cluster has {gpus} GPU(s): starting {gpus}, one GPU each")
    return min(asked, gpus)


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The user's exception inside a Ray task error (a UserError raised in an actor), else ``exc``."""
    return find_user_error(exc) or exc


# ---------------------------------------------------------------------------------------------
# Tune: a UserError fails its trial once


USER_ERROR_KEY = "probe_dpo_user_error"


def fail_once_on_user_error(trainable: Callable[[dict], Any],
                            metric: str | list[str] | None = None) -> Callable[[dict], Any]:
    """A Tune function trainable that ends its trial, without a retry, when it raises a UserError.

    Tune retries every failed trial (``FailureConfig.max_failures``) and has no way to exempt an
    error type; bad input fails the same way every time, so a retry only wastes the cluster.
    The wrapper catches the UserError (also one a Ray Train worker raised), reports it as the
    trial's last result (``USER_ERROR_KEY``; ``metric``, the search metric(s) if any, as NaN so Tune's
    metric check passes) and returns: the trial ends once. ``raise_user_errors`` re-raises it in
    the driver as the same one line. Any other error still fails (and retries) the trial.
    """

    @functools.wraps(trainable)
    def wrapper(config: dict, **kwargs: Any) -> Any:  # kwargs: tune.with_parameters' objects
        try:
            return trainable(config, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unless a UserError is behind it
            user = find_user_error(exc)
            if user is None:
                raise
            from ray import tune

            result: dict[str, Any] = {USER_ERROR_KEY: one_line(user)}
            for name in [metric] if isinstance(metric, str) else (metric or []):
                result[name] = float("nan")
            tune.report(result)
            return None

    return wrapper


def raise_user_errors(results: Any) -> None:
    """Re-raise in the driver the first UserError a trial ended with (``fail_once_on_user_error``)."""
    for result in results:
        message = (getattr(result, "metrics", None) or {}).get(USER_ERROR_KEY)
        if message:
            raise UserError(message)
