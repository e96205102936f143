"""Shared test fixtures: offline environment, a real local S3 server, one Ray cluster per session.

Everything here is real: moto's server is an HTTP S3 endpoint that s3fs talks to over the
loopback interface, and Ray is a local cluster started once for the whole session (its
start-up costs seconds, so tests share it).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import time
import uuid

import pytest

# Before anything imports transformers/datasets/ray: nothing may come from a hub, and
# workers started by Ray inherit this environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Token authentication, as every cluster the project starts has it (probe_dpo.ray_utils): one
# random token for the session, known only to this process and the clusters it starts.
os.environ.setdefault("RAY_AUTH_MODE", "token")
if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/probe_dpo/torch_extensions"))


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are chosen.

    Binding and closing one socket at a time can hand the same port out twice (the kernel
    reuses a just-released ephemeral port); a CI run lost the Ray-jobs test to exactly that.
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on 127.0.0.1 (moto's server) with dummy credentials in the env.

    The variables are set for the whole session, before Ray starts, so Ray workers see the
    same endpoint and credentials.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ModuleNotFoundError:  # a GPU box given only the runtime packages: Ray tests run, S3 ones cannot
        yield None
        return
    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=url)
    yield url
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 server; yields its ``s3://name`` URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the whole test session (started after the S3 env is set).
    Workers get this checkout ahead of the driver's own PYTHONPATH (packages carried there stay visible)."""
    import ray

    if not ray.is_initialized():
        path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """A storage root on each backend: a local folder and a bucket on the local S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init 2-layer Llama (width 64) with SmolLM2's real tokenizer, saved as a folder."""
    from probe_dpo.testbed import tiny_model_dir as make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-model"))


# ---------------------------------------------------------------------------------------------
# Helpers several test modules share (imported with ``from conftest import ...``)


def submit_job(url: str, env: dict, args: list[str]) -> tuple[str, str]:
    """``cluster/submit.sh --address url --no-wait ARGS``: the job id and the script's output.
    Retried while a fresh head's job agent is not up yet (it comes a little after its dashboard)."""
    argv = ["bash", "cluster/submit.sh", "--address", url, "--no-wait", *args]
    for _ in range(20):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(1)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"raysubmit_\w+", done.stdout + done.stderr).group(0), done.stdout + done.stderr


def write_planted_pairs(path: str, n: int = 64) -> str:
    """``n`` preference pairs whose chosen side is benign and rejected side insulting, at ``path``."""
    from probe_dpo.data import write_records

    words = ["river", "garden", "music", "window", "coffee", "friend", "idiot", "stupid", "trash", "moron"]
    write_records([{"prompt": f"Item {i}: tell me about the {words[i % 5]}.",
                    "chosen": f" The {words[i % 5]} is lovely and calm.",
                    "rejected": f" You {words[5 + i % 5]}, nobody cares."} for i in range(n)], path)
    return path
