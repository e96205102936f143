"""Experiment tracking: Weights & Biases, MLflow and TensorBoard, all optional and off by default.

Two places report, with the same ``TrackingSettings``:

- **Training steps**: ``report_to`` goes to TRL's / transformers' ``TrainingArguments``, whose
  own integrations (``WandbCallback``, ``MLFlowCallback``, ``TensorBoardCallback``) log every
  logging step of rank 0: loss, reward margins and accuracies (DPO), the probe penalty,
  learning rate. ``trainer_env`` gives the environment those integrations read (offline W&B,
  an MLflow file store), set in each Ray Train worker.
- **Tune trials**: ``tune_callbacks`` gives Ray Tune's logger callbacks
  (``WandbLoggerCallback``, ``MLflowLoggerCallback``, ``TBXLoggerCallback``), which log every
  result a trial reports (its training metrics as they arrive, then its evaluation).

Everything local by default, so nothing needs a server or network: W&B in offline mode
(``wandb sync`` uploads later), MLflow into a file store, TensorBoard event files, all under
``dir`` (default: ``<run folder>/tracking``). Install the packages with
``pip install probe-dpo[tracking]``.

The user's own settings win over these defaults: a value set in the config first, then what
the environment exports (``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_DIR``, ``WANDB_SILENT``,
``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``), then the project's default. Ray workers
get the driver's exports (``probe_dpo.ray_utils`` forwards ``WANDB_*`` / ``MLFLOW_*`` settings,
never their keys or passwords).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from probe_dpo.errors import UserError

TOOLS = ("wandb", "mlflow", "tensorboard")
_MODULES = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboardX"}


@dataclass
class TrackingSettings:
    report_to: list[str] = field(default_factory=list)
    """Trackers to log to: any of wandb, mlflow, tensorboard (empty: none; the extra
    probe-dpo[tracking] installs them)."""
    project: str | None = None
    """The W&B project and the MLflow experiment name. None: WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME
    when exported, else probe-dpo."""
    dir: str | None = None
    """A local folder for the logs (W&B offline runs, the MLflow file store, TensorBoard event
    files). None: <run folder>/tracking when the run folder is local."""
    wandb_mode: str | None = None
    """W&B's mode: offline (files only; wandb sync uploads them later) or online. None: WANDB_MODE
    when exported, else offline."""
    mlflow_uri: str | None = None
    """An MLflow tracking URI (a server). None: MLFLOW_TRACKING_URI when exported, else a file
    store under dir."""

    def __post_init__(self):
        unknown = [t for t in self.report_to if t not in TOOLS]
        if unknown:
            raise ValueError(f"key tracking.report_to: unknown tracker(s) {unknown} (valid: {', '.join(TOOLS)})")
        if self.wandb_mode not in (None, "offline", "online"):
            raise ValueError(f"key tracking.wandb_mode: offline or online, got {self.wandb_mode!r}")


DEFAULT_PROJECT = "probe-dpo"


def _exported(name: str) -> str | None:
    return os.environ.get(name) or None


def wandb_mode(settings: TrackingSettings) -> str:
    """The config's mode, else an exported ``WANDB_MODE``, else offline."""
    return settings.wandb_mode or _exported("WANDB_MODE") or "offline"


def project(settings: TrackingSettings, tool: str) -> str:
    """The config's project, else the tool's exported one, else ``probe-dpo``."""
    name = {"wandb": "WANDB_PROJECT", "mlflow": "MLFLOW_EXPERIMENT_NAME"}[tool]
    return settings.project or _exported(name) or DEFAULT_PROJECT


def mlflow_uri(settings: TrackingSettings) -> str | None:
    """The config's tracking URI, else an exported ``MLFLOW_TRACKING_URI``; None: the project's
    file store under the log folder (``mlflow_store``)."""
    return settings.mlflow_uri or _exported("MLFLOW_TRACKING_URI")


def mlflow_store(root: str) -> str:
    return "file:" + os.path.join(root, "mlruns")


def check_installed(settings: TrackingSettings) -> None:
    """UserError naming the package when a chosen tracker is not installed."""
    import importlib.util

    missing = [_MODULES[t] for t in settings.report_to if importlib.util.find_spec(_MODULES[t]) is None]
    if missing:
        raise UserError(f"tracking.report_to needs {', '.join(missing)}: pip install 'probe-dpo[tracking]'")


def log_dir(settings: TrackingSettings, run: str) -> str:
    """The local folder the logs go to."""
    from probe_dpo import storage

    if settings.dir:
        return storage.absolute(settings.dir)
    if storage.is_remote(run):
        raise UserError(f"tracking: the run folder {run} is not local; set tracking.dir to a local folder")
    return storage.join(storage.absolute(run), "tracking")


def trainer_env(settings: TrackingSettings, run: str, name: str = "train") -> dict[str, str]:
    """Environment variables transformers' integrations read (set in every training worker):
    W&B's mode and folder, MLflow's store, TensorBoard's folder for this run ``name``."""
    if not settings.report_to:
        return {}
    root = log_dir(settings, run)
    env: dict[str, str] = {}
    if "tensorboard" in settings.report_to:
        env["TENSORBOARD_LOGGING_DIR"] = os.path.join(root, "tensorboard", name)
    if "wandb" in settings.report_to:
        env.update(WANDB_MODE=wandb_mode(settings),
                   WANDB_DIR=(None if settings.dir else _exported("WANDB_DIR")) or root,
                   WANDB_PROJECT=project(settings, "wandb"), WANDB_SILENT=_exported("WANDB_SILENT") or "true")
    if "mlflow" in settings.report_to:
        uri = mlflow_uri(settings)
        env.update(MLFLOW_TRACKING_URI=uri or mlflow_store(root), MLFLOW_EXPERIMENT_NAME=project(settings, "mlflow"))
        if not uri:
            env.update({k: _exported(k) or v for k, v in _FILE_STORE.items()})
    return env


# MLflow 3.17 refuses its file store unless this is set (it is "in maintenance mode"; a database
# store needs SQLAlchemy, which the light mlflow-skinny does not bring). The file store is what a
# run without a server writes: plain files next to the run.
_FILE_STORE = {"MLFLOW_ALLOW_FILE_STORE": "true"}


def trainer_args(settings: TrackingSettings, name: str) -> dict[str, Any]:
    """``TrainingArguments`` keys: ``report_to`` and ``run_name`` (the folders are in ``trainer_env``)."""
    if not settings.report_to:
        return {"report_to": []}
    return {"report_to": list(settings.report_to), "run_name": name}


def apply_env(env: dict[str, str] | None) -> None:
    for key, value in (env or {}).items():
        if key.startswith(("WANDB_", "MLFLOW_", "TENSORBOARD_")):
            os.environ[key] = value


def tune_callbacks(settings: TrackingSettings, run: str) -> list:
    """Ray Tune logger callbacks for the chosen trackers (each trial's reported results)."""
    if not settings.report_to:
        return []
    check_installed(settings)
    root = log_dir(settings, run)
    os.makedirs(root, exist_ok=True)
    callbacks: list = []
    if "tensorboard" in settings.report_to:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())  # event files in each trial's folder under the Tune storage
    if "mlflow" in settings.report_to:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = mlflow_uri(settings)
        if not uri:
            for key, value in _FILE_STORE.items():  # the callback logs from this (the driver's) process
                os.environ.setdefault(key, value)

        callbacks.append(MLflowLoggerCallback(tracking_uri=uri or mlflow_store(root),
                                              experiment_name=project(settings, "mlflow"), save_artifact=False))
    if "wandb" in settings.report_to:
        from ray.air.integrations.wandb import WandbLoggerCallback

        mode = wandb_mode(settings)
        os.environ["WANDB_MODE"] = mode  # Ray's callback asks for an API key unless offline (mode: the user's first)

        callbacks.append(WandbLoggerCallback(project=project(settings, "wandb"), mode=mode,
                                             dir=(None if settings.dir else _exported("WANDB_DIR")) or root,
                                             upload_checkpoints=False))
    return callbacks
