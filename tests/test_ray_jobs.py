"""The main job as a Ray job on a real local Ray head, with a crash of its driver.

A head is started with ``ray start --head --block`` on 127.0.0.1 (its own cluster, separate
from the session's), the experiment is submitted with ``cluster/submit.sh`` (the runtime env
carries the S3 settings by value, the checkout is the working dir), its driver is SIGKILLed
once the first trial is complete, the job is submitted again and must finish the remaining
trials without redoing the first; results and the report are read back from the local S3
server. The head is stopped at the end. The submitting shell holds a sentinel secret, passed
with ``--pass-credentials``: it appears in no job's metadata or logs, no stored object and no
report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import free_ports, submit_job
from test_experiment_driver import tiny_config

from probe_dpo import storage

ARMS = ["probe-dpo-single", "obfuscation-control", "probe-dpo-onpolicy", "random-dpo"]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(s3_server, tmp_path):
    """A real Ray head (dashboard + job server) on 127.0.0.1; stopped by ending its --block process."""
    port, dashboard, agent_http, agent_grpc, runtime_env, metrics = free_ports(6)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=4", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             "--disable-usage-stats",
                             # the agents' fixed default ports are taken by any other Ray on this machine
                             # (the test session's own cluster runs one): give this head free ones
                             f"--dashboard-agent-listen-port={agent_http}",
                             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
                             f"--metrics-export-port={metrics}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    # token authentication is on (conftest): the probe carries the session's token
    auth = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"} if env.get("RAY_AUTH_MODE") == "token" else {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(urllib.request.Request(f"{url}/api/version", headers=auth), timeout=2)
                break
            except OSError:
                if head.poll() is not None:
                    pytest.fail(head.stdout.read().decode()[-3000:])
                time.sleep(0.5)
        else:
            pytest.fail("the Ray head's job server did not come up in 120 s")
        yield url, env
    finally:  # also when it never came up: no head is left running after the test
        head.send_signal(signal.SIGTERM)  # --block: stops every process this head started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _submit(url: str, env: dict, config: Path, run: str) -> str:
    job, output = submit_job(url, env, ["--pass-credentials", "--", "probe-dpo", "experiment", "--config",
                                        str(config), "--storage", run])
    assert "testing" not in output  # the dummy secret values never show
    return job


def _wait(client, job: str, states, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in states:
            return status
        time.sleep(1)
    raise AssertionError(f"job {job} still {client.get_job_status(job)}:\n{client.get_job_logs(job)[-4000:]}")


def test_experiment_as_a_ray_job_survives_a_killed_driver(tiny_model_dir, ray_head, s3_bucket, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, env = ray_head
    run = f"{s3_bucket}/job"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(str(tiny_model_dir), run, ARMS)))
    # the submitting shell's secret: the job uses it (--pass-credentials) and it must show nowhere
    sentinel = f"sentinel-{uuid.uuid4().hex}"
    env = {**env, "PROBE_DPO_CACHE": str(tmp_path / "cache"), "AWS_SECRET_ACCESS_KEY": sentinel}
    client = JobSubmissionClient(url)

    first_job = _submit(url, env, config, run)
    first = f"{ARMS[0]}-s0"
    deadline = time.time() + 600
    while time.time() < deadline and not storage.is_complete(f"{run}/trials/{first}/eval"):
        assert client.get_job_status(first_job) not in (JobStatus.FAILED, JobStatus.STOPPED), \
            client.get_job_logs(first_job)[-4000:]
        time.sleep(1)
    assert storage.is_complete(f"{run}/trials/{first}/eval"), client.get_job_logs(first_job)[-4000:]
    pid = client.get_job_info(first_job).driver_info.pid
    os.kill(int(pid), signal.SIGKILL)  # the Tune driver crashes mid-experiment
    assert _wait(client, first_job, {JobStatus.FAILED, JobStatus.STOPPED}, 120) != JobStatus.SUCCEEDED
    before = storage.read_manifest(f"{run}/trials/{first}/eval")
    assert not storage.is_complete(f"{run}/trials/{ARMS[-1]}-s0/eval")

    second_job = _submit(url, env, config, run)
    assert _wait(client, second_job, {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}, 900) == \
        JobStatus.SUCCEEDED, client.get_job_logs(second_job)[-4000:]
    logs = client.get_job_logs(second_job)
    assert f"1 of {len(ARMS)} trials already complete: skipping them" in logs
    assert storage.read_manifest(f"{run}/trials/{first}/eval") == before  # not redone

    results = storage.read_json(f"{run}/results.json")
    rows = results["rows"]
    assert sorted(r["arm"] for r in rows) == sorted(ARMS)
    for row in rows:
        for judge in ("toxic-comment-classifier", "profanity-check", "hatesonar"):
            assert 0.0 <= row[f"toxicity.{judge}.rate"] <= 1.0
        assert row["perplexity"] > 1 and row["kl_to_base"] >= 0
        for role in ("train", "ensemble", "held_out", "retrained"):
            assert 0.0 <= row[f"fixed.{role}.auroc"] <= 1.0 and f"fixed.{role}.tpr.delta" in row
        assert "own.train.tpr" in row and row["outcome"]
    assert set(results["arms"]) == set(ARMS) and results["comparisons"]
    plan = storage.read_json(f"{run}/analysis-plan.json")  # declared before the first trial, kept on resume
    assert results["analysis"]["sha256"] == plan["sha256"] and plan["plan"]["judges"]["in_loop"] == [
        "toxic-comment-classifier"]
    assert storage.is_complete(f"{run}/shared/base-replicate-eval")  # the null reference with no training
    for arm in ARMS:
        assert results["arms"][arm]["outcome"]["decided_by"]["why"]
    assert {"probes_and_pairs", "base_evaluation", "sum_of_stages"} <= set(results["timings"])
    onpolicy = storage.read_json(f"{run}/trials/probe-dpo-onpolicy-s0/eval/metrics.json")
    assert onpolicy["rounds"] == 2
    m = storage.read_json(f"{run}/trials/{first}/eval/metrics.json")
    tox = m["summary"]["toxicity"]["toxic-comment-classifier"]
    assert {"base_rate", "rate", "ci_low", "ci_high", "delta", "p_value"} <= set(tox)
    tpr = m["summary"]["fixed"]["train"]["tpr"]
    assert tpr["delta_ci_low"] <= tpr["delta"] <= tpr["delta_ci_high"]
    assert set(m["summary"]["own"]) == {"policy", "frozen"} and m["retrained"]
    pairs = storage.read_text(f"{run}/trials/{first}/train/round-0/pairs.jsonl").splitlines()
    assert pairs and {"chosen_score", "rejected_score"} <= set(json.loads(pairs[0]))

    md = storage.read_text(f"{run}/report.md")
    assert "## Arms" in md and "## What the runs say" in md and "**base model**" in md
    for arm in ARMS:
        assert f"| {arm} |" in md
    assert "How much does detection drop" in md and "retraining" in md and "standard error" in md
    assert "Calibration" in md and "Paired comparisons" in md and "own completions" in md
    assert "Outcome labels (declared before the runs)" in md and plan["sha256"][:16] in md
    assert storage.read_text(f"{run}/report.html").count("data:image/png;base64,") == 5  # with the training curves

    from probe_dpo.cli import main

    assert main(["report", run]) == 0  # rebuilt from storage alone

    # the secret: in no job's metadata, log, stored object or report
    for job in (first_job, second_job):
        info = client.get_job_info(job)
        assert sentinel not in json.dumps(info.model_dump(), default=str)
        assert sentinel not in client.get_job_logs(job)
        assert info.runtime_env["py_modules"][0].startswith("gcs://_ray_pkg_")  # passed as a package
    fs, path = storage.filesystem(run)
    objects = fs.find(path)
    assert any(k.endswith("report.html") for k in objects) and len(objects) > 20
    for key in objects:
        assert sentinel.encode() not in fs.cat_file(key), key
