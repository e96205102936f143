"""Fault tolerance of fine-tuning, measured: kill one Ray Train worker process mid-run.

The run reports checkpoints to the local S3 server. Once the first one is registered, one
``RayTrainWorker`` process of this test session's Ray cluster gets SIGKILL. Ray Train
(``FailureConfig(max_failures=1)``) restarts the worker group, which resumes from the last
checkpoint in S3; the finished run must match an uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
import torch
from conftest import write_planted_pairs
from safetensors.torch import load as load_bytes

from probe_dpo import storage
from probe_dpo.config import load_config
from probe_dpo.training import TrainConfig, train

torch.set_num_threads(1)


def _raylet_workers(gcs_address: str) -> list[psutil.Process]:
    """The RayTrainWorker processes started by THIS session's raylet (other Ray clusters may run)."""
    port = gcs_address.rsplit(":", 1)[1]
    raylets = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"]
               and "raylet" in p.info["cmdline"][0] and any(port in a for a in p.info["cmdline"])]
    workers = []
    for raylet in raylets:
        for child in raylet.children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(child.cmdline()):
                    workers.append(child)
            except psutil.Error:
                continue
    return workers


def _final(out: str) -> tuple[dict, dict]:
    summary = storage.read_json(f"{out}/train.json")["rounds"][0]["train"]
    weights = load_bytes(storage.read_bytes(f"{out}/policy/model.safetensors"))
    return summary, weights


def test_killed_train_worker_resumes_from_s3_and_matches_an_uninterrupted_run(tiny_model_dir, ray_cluster,
                                                                             s3_bucket, tmp_path):
    pairs = write_planted_pairs(str(tmp_path / "pairs.jsonl"))

    def cfg(out: str):
        return load_config(TrainConfig, None, [
            "method=dpo", f"model={tiny_model_dir}", f"data.pairs={pairs}", f"out={out}", "seed=3",
            "train.max_steps=16", "train.batch_size=2", "train.lr=5e-4", "train.max_length=48",
            "distributed.workers=2", "distributed.zero_stage=2", "distributed.checkpoint_steps=4",
            "distributed.max_failures=1", "distributed.keep_checkpoints=2",
            "distributed.keep_finished_checkpoints=true"])

    clean_out, killed_out = f"{s3_bucket}/uninterrupted", f"{s3_bucket}/killed"
    train(cfg(clean_out))

    gcs = ray_cluster.get_runtime_context().gcs_address
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        fs, root = storage.filesystem(f"{killed_out}/ray")
        while not stop.is_set():
            snaps = [p for p in fs.glob(f"{root}/*/checkpoint_manager_snapshot.json")]
            if snaps and json.loads(fs.cat_file(snaps[0])).get("checkpoint_results"):
                workers = _raylet_workers(gcs)
                if workers:
                    os.kill(workers[0].pid, signal.SIGKILL)  # one worker of the group, mid-run
                    killed.append(workers[0].pid)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = train(cfg(killed_out))
    finally:
        stop.set()
        thread.join(timeout=5)
    assert killed, "no worker was killed: the run finished before its first checkpoint was registered"

    got, got_w = _final(killed_out)
    want, want_w = _final(clean_out)
    assert got["resumed"] is True and got["resumed_from_step"] in (4, 8, 12)
    assert got["global_step"] == want["global_step"] == 16
    assert got["last_loss"] == pytest.approx(want["last_loss"], rel=1e-3, abs=1e-4)
    for name in want_w:
        torch.testing.assert_close(got_w[name], want_w[name], atol=1e-4, rtol=1e-3)
    assert summary["rounds"][0]["train"]["checkpoint"].startswith(killed_out.split("://")[1])
