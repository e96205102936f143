"""Experiment tracking in its offline / local modes: TRL's report_to (W&B offline, an MLflow file
store, TensorBoard event files) with the per-step metrics, Ray Tune's logger callbacks, and the
report's training curves from a saved log_history."""

from __future__ import annotations

import glob
import os

import pytest

from probe_dpo.tracking import TrackingSettings, trainer_args, trainer_env, tune_callbacks

PAIRS = [{"prompt": f"Question {i}:", "chosen": " a kind answer", "rejected": " a rude stupid answer"}
         for i in range(8)]


def _tb_tags(folder: str) -> set[str]:
    """Scalar tags in TensorBoard event files, read with tensorboardX's own record reader."""
    from tensorboardX.proto import event_pb2 as pb

    tags = set()
    for path in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True):
        raw = open(path, "rb").read()
        pos = 0
        while pos + 12 <= len(raw):
            length = int.from_bytes(raw[pos:pos + 8], "little")
            event = pb.Event()
            event.ParseFromString(raw[pos + 12:pos + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            pos += 12 + length + 4
    return tags


def test_trl_report_to_writes_per_step_metrics(tiny_model_dir, tmp_path, monkeypatch):
    from probe_dpo.config import load_config
    from probe_dpo.model import load_model, load_tokenizer
    from probe_dpo.tracking import apply_env
    from probe_dpo.training import TrainConfig
    from probe_dpo.training.trainers import build_trainer

    settings = TrackingSettings(report_to=["tensorboard", "mlflow", "wandb"], project="byo-test")
    run = str(tmp_path / "run")
    env = trainer_env(settings, run, "dpo-test")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    apply_env(env)
    cfg = load_config(TrainConfig, None, ["method=dpo", "train.max_steps=3", "train.batch_size=2",
                                          "train.max_length=32"])
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    trainer = build_trainer("dpo", model, tok, PAIRS, cfg, output_dir=str(tmp_path / "out"),
                            ref_model=load_model(tiny_model_dir), save_steps=-1,
                            tracking=trainer_args(settings, "dpo-test"))
    trainer.train()
    root = os.path.join(run, "tracking")
    tags = _tb_tags(os.path.join(root, "tensorboard", "dpo-test"))
    assert {"train/loss", "train/rewards/margins"} <= tags
    # MLflow file store: one line per logged step of the loss
    metric_files = glob.glob(os.path.join(root, "mlruns", "*", "*", "metrics", "loss"))
    assert metric_files and len(open(metric_files[0]).read().strip().splitlines()) == 3
    # W&B offline: a run folder with its .wandb log
    assert glob.glob(os.path.join(root, "wandb", "offline-run-*", "*.wandb"))


def test_tune_logger_callbacks(tmp_path, ray_cluster, monkeypatch):
    from ray import tune

    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = TrackingSettings(report_to=["tensorboard", "mlflow", "wandb"], project="tune-test")
    run = str(tmp_path / "run")

    def trainable(config):
        for step in range(4):
            tune.report({"loss": 1.0 / (step + 1 + config["x"]), "step": step})

    tuner = tune.Tuner(trainable, param_space={"x": tune.grid_search([0, 1])},
                       run_config=tune.RunConfig(name="t", storage_path=str(tmp_path / "tune"),
                                                 callbacks=tune_callbacks(settings, run), verbose=0))
    results = tuner.fit()
    assert not results.errors
    root = os.path.join(run, "tracking")
    assert "ray/tune/loss" in _tb_tags(str(tmp_path / "tune"))
    metric_files = glob.glob(os.path.join(root, "mlruns", "*", "*", "metrics", "loss"))
    assert len(metric_files) == 2 and all(len(open(f).read().strip().splitlines()) == 4 for f in metric_files)
    assert len(glob.glob(os.path.join(root, "wandb", "offline-run-*"))) == 2


def test_tracking_settings_and_curves(tmp_path):
    from probe_dpo.errors import UserError
    from probe_dpo.report.curves import curve_points, training_curves
    from probe_dpo.tracking import log_dir

    with pytest.raises(ValueError, match="unknown tracker"):
        TrackingSettings(report_to=["neptune"])
    assert trainer_args(TrackingSettings(), "n") == {"report_to": []}
    with pytest.raises(UserError, match="set tracking.dir"):
        log_dir(TrackingSettings(report_to=["mlflow"]), "s3://bucket/run")
    history = [{"loss": 0.69, "rewards/margins": 0.0, "step": 1}, {"loss": 0.6, "rewards/margins": 0.2, "step": 2},
               {"train_runtime": 3.0, "step": 2, "train_loss": 0.65}]
    assert curve_points(history, "loss") == ([1, 2], [0.69, 0.6])
    fig = training_curves({"probe-dpo": history, "sft": [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}]})
    assert [ax.get_title() for ax in fig.axes] == ["training loss", "reward margin (chosen - rejected)"]
    assert training_curves({"x": [{"epoch": 1}]}) is None


def test_exported_settings_win_over_the_defaults(tmp_path, monkeypatch):
    """What a user exports (MLFLOW_TRACKING_URI, WANDB_MODE, ...) beats the project's defaults; a value
    set in the config beats both. No Ray: the environment each training worker gets, the driver's
    logger callbacks, and what is forwarded to Ray workers."""
    from probe_dpo import ray_utils
    from probe_dpo.tracking import apply_env

    run = str(tmp_path / "run")
    both = ["wandb", "mlflow"]
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "WANDB_MODE",
                 "WANDB_PROJECT", "WANDB_DIR", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)
    defaults = trainer_env(TrackingSettings(report_to=both), run, "r")
    assert defaults["WANDB_MODE"] == "offline" and defaults["MLFLOW_TRACKING_URI"].startswith("file:")
    assert defaults["WANDB_PROJECT"] == defaults["MLFLOW_EXPERIMENT_NAME"] == "probe-dpo"
    exported = {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "MLFLOW_EXPERIMENT_NAME": "team-exp",
                "WANDB_MODE": "disabled", "WANDB_PROJECT": "team-proj", "WANDB_DIR": str(tmp_path / "wb"),
                "WANDB_SILENT": "false"}
    for name, value in exported.items():
        monkeypatch.setenv(name, value)
    env = trainer_env(TrackingSettings(report_to=both), run, "r")
    assert {k: env[k] for k in exported} == exported
    assert "MLFLOW_ALLOW_FILE_STORE" not in env  # a server, not the file store
    apply_env(env)  # what each Train worker does: the exports are still the user's
    assert {k: os.environ[k] for k in exported} == exported
    chosen = TrackingSettings(report_to=both, wandb_mode="online", mlflow_uri="file:/tmp/x", project="cfg")
    env = trainer_env(chosen, run, "r")  # the config's own values beat the exports
    assert (env["WANDB_MODE"], env["MLFLOW_TRACKING_URI"], env["WANDB_PROJECT"], env["MLFLOW_EXPERIMENT_NAME"]) == \
        ("online", "file:/tmp/x", "cfg", "cfg")
    # the Tune logger callbacks on the driver: the same order; the exports untouched
    monkeypatch.setenv("WANDB_MODE", "offline")
    mlflow_cb, wandb_cb = tune_callbacks(TrackingSettings(report_to=["mlflow", "wandb"]), run)
    assert mlflow_cb.tracking_uri == exported["MLFLOW_TRACKING_URI"]
    assert mlflow_cb.experiment_name == "team-exp"
    assert (wandb_cb.project, wandb_cb.kwargs["mode"], wandb_cb.kwargs["dir"]) == \
        ("team-proj", "offline", exported["WANDB_DIR"])
    assert os.environ["WANDB_MODE"] == "offline"
    # Ray workers (a joined cluster does not inherit this shell) get the same settings, never a key
    monkeypatch.setenv("WANDB_API_KEY", "secret-1234")
    forwarded = ray_utils.worker_env()
    assert forwarded["MLFLOW_TRACKING_URI"] == exported["MLFLOW_TRACKING_URI"] and "WANDB_API_KEY" not in forwarded
