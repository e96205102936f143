"""Credentials never in Ray's job metadata or logs, on a real local head with token authentication.

The head (``ray start --head``, token authentication on, as the session's environment sets it)
plays a cluster whose nodes have their own storage credentials (the session's dummy ones). The
submitting shell holds a sentinel ``AWS_SECRET_ACCESS_KEY``. A small job runs a Ray task that
writes to the local S3 server and reports the sha256 of the secret it sees:

- without ``--pass-credentials`` the worker sees the cluster's own secret;
- with it, the worker sees the sentinel (so it really arrived), and in both cases the sentinel
  appears nowhere in ``JobSubmissionClient.get_job_info``, ``list_jobs``, the job's logs or
  anything the job wrote to S3.

The full experiment submitted the same way (tests/test_ray_jobs.py) checks the run folder and
the report too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
from conftest import submit_job
from test_ray_jobs import ray_head  # noqa: F401 - the real head fixture

from probe_dpo import storage

JOB = r"""
import hashlib, json, os, sys
import ray
from probe_dpo import storage
from probe_dpo.ray_utils import init_ray

init_ray()  # inside a job: joins the job's cluster

@ray.remote
def work(root):
    # read before any storage call: what the worker process started with (the setup hook's doing)
    seen = hashlib.sha256(os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest()
    storage.write_json(storage.join(root, "from-worker.json"), {"pid": os.getpid()})
    return seen

root = sys.argv[1]
seen = ray.get(work.remote(root))
storage.write_json(storage.join(root, "from-driver.json"), {"worker_secret_sha256": seen})
print("WORKER-SECRET-SHA256", seen, flush=True)
"""


def _wait(client, job: str, timeout: float = 300) -> None:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-4000:]
            return
        time.sleep(1)
    raise AssertionError(f"job {job} still running:\n{client.get_job_logs(job)[-4000:]}")


def _everything_under(uri: str) -> bytes:
    fs, path = storage.filesystem(uri)
    return b"".join(fs.cat_file(key) for key in fs.find(path))


def test_a_sentinel_secret_never_reaches_job_metadata_logs_or_storage(ray_head, s3_bucket):  # noqa: F811
    from ray.job_submission import JobSubmissionClient

    url, head_env = ray_head
    assert os.environ["RAY_AUTH_MODE"] == "token"
    with pytest.raises(urllib.error.HTTPError) as denied:  # the head refuses requests without the token
        urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
    assert denied.value.code in (401, 403)
    client = JobSubmissionClient(url)  # the token comes from this process's environment
    sentinel = f"sentinel-secret-{uuid.uuid4().hex}"
    cluster_secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # what the head's nodes have themselves
    env = {**head_env, "AWS_SECRET_ACCESS_KEY": sentinel, "PROBE_DPO_CACHE": "/tmp/probe-dpo-cache-creds-test"}
    results = {}
    for mode, extra in (("cluster", []), ("passed", ["--pass-credentials"])):
        root = f"{s3_bucket}/{mode}"
        job, out = submit_job(url, env, [*extra, "--", "python", "-c", JOB, root])
        assert sentinel not in out
        assert ("not passed" in out) == (mode == "cluster")
        _wait(client, job)
        logs = client.get_job_logs(job)
        info = client.get_job_info(job)
        everything = json.dumps(info.model_dump() if hasattr(info, "model_dump") else vars(info), default=str)
        assert sentinel not in logs and sentinel not in everything
        assert sentinel not in json.dumps([vars(j) for j in client.list_jobs()], default=str)
        assert sentinel.encode() not in _everything_under(root)
        runtime_env = info.runtime_env or {}
        assert not any(k.startswith("AWS_") and "SECRET" in k for k in runtime_env.get("env_vars", {}))
        seen = re.search(r"WORKER-SECRET-SHA256 ([0-9a-f]{64})", logs).group(1)
        assert storage.read_json(f"{root}/from-driver.json") == {"worker_secret_sha256": seen}
        assert storage.read_json(f"{root}/from-worker.json")["pid"] > 0  # the job wrote to S3
        results[mode] = (seen, runtime_env)
    assert results["cluster"][0] == hashlib.sha256(cluster_secret.encode()).hexdigest()
    assert results["passed"][0] == hashlib.sha256(sentinel.encode()).hexdigest()  # it did arrive
    assert "py_modules" not in results["cluster"][1]
    assert all(m.startswith("gcs://_ray_pkg_") for m in results["passed"][1]["py_modules"])  # a URI only


DRIVER = r"""
import hashlib, json, os, sys
import ray
from probe_dpo.ray_utils import init_ray

info = init_ray(sys.argv[1])  # join the cluster as a plain driver (not a job)

@ray.remote
def seen():
    return hashlib.sha256(os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest()

print("RESULT " + json.dumps({"seen": ray.get(seen.remote()), "credentials": info["credentials"],
                              "runtime_env": ray.get_runtime_context().runtime_env}), flush=True)
"""


def test_init_ray_joining_a_cluster_passes_credentials_only_on_request(ray_cluster):
    """A driver that joins a running cluster (the session's, token-authenticated) with a secret in
    its environment: by default the workers keep the cluster's credentials; with
    PROBE_DPO_PASS_CREDENTIALS=1 they get the driver's through the package, and the runtime env Ray
    records for the driver's job holds no value either way."""
    address = ray_cluster.get_runtime_context().gcs_address
    sentinel = f"sentinel-secret-{uuid.uuid4().hex}"
    out = {}
    for mode, flag in (("cluster", "0"), ("passed", "1")):
        env = {**os.environ, "AWS_SECRET_ACCESS_KEY": sentinel, "PROBE_DPO_PASS_CREDENTIALS": flag}
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run([sys.executable, "-c", DRIVER, address], env=env, capture_output=True, text=True,
                              timeout=300)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        assert done.returncode == 0 and line, (done.stdout + done.stderr)[-4000:]
        assert sentinel not in done.stdout + done.stderr
        out[mode] = json.loads(line.removeprefix("RESULT "))
    assert out["cluster"]["seen"] == hashlib.sha256(os.environ["AWS_SECRET_ACCESS_KEY"].encode()).hexdigest()
    assert out["cluster"]["credentials"].startswith("the cluster's own (not passed: AWS_ACCESS_KEY_ID, ")
    assert out["passed"]["seen"] == hashlib.sha256(sentinel.encode()).hexdigest()
    assert out["passed"]["credentials"].startswith("passed as a runtime-env package: ")
    assert all(m.startswith("gcs://_ray_pkg_") for m in out["passed"]["runtime_env"]["py_modules"])
    for mode in out:
        assert not any(k.startswith("AWS_") and "SECRET" in k for k in out[mode]["runtime_env"].get("env_vars", {}))
