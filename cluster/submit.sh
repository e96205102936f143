#!/usr/bin/env bash
# Submit a probe-dpo command to a Ray cluster as a Ray job (see --help).
#
# Why a script: the job needs the storage settings of the caller's shell (endpoint, region,
# PROBE_DPO_*), and must never carry credentials where Ray records them. Ray keeps a job's
# runtime env (env_vars included) in its job table, which get_job_info, `ray list jobs` and
# the dashboard show. So only non-secret settings go into env_vars; credentials come from the
# cluster itself (instance role, Kubernetes Secret, credentials file on the nodes), or, with
# --pass-credentials, in a one-off package (a runtime-env py_module, mode 0600 here) that Ray
# uploads into the cluster and unpacks on the job's nodes: the job's metadata shows only its
# content-hash URI. The runtime-env file is readable only by the caller (0600), read by
# `ray job submit --runtime-env` and deleted on exit with the package. Only variable names are
# ever printed. The image carries the packages (no pip/conda in the runtime env, so no node
# ever tries to install torch); `--working-dir .` carries this checkout's code.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cluster/submit.sh [--address URL] [--pass-credentials] [--no-wait] [--dry-run] -- COMMAND [ARGS...]

Submit COMMAND as a Ray job with this repository as its working directory, e.g.
  cluster/submit.sh -- probe-dpo experiment --config toxicity --storage s3://my-bucket/probe-dpo --address auto
  cluster/submit.sh -- probe-dpo attribute --testbed s3://my-bucket/probe-dpo/testbed --out s3://my-bucket/probe-dpo/attribution --mitigate filter,swap

Options:
  --address URL       Ray dashboard address (default: $RAY_ADDRESS), e.g. http://head-node:8265
  --pass-credentials  also give the job the credentials of this shell (AWS_ACCESS_KEY_ID,
                      AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, HF_TOKEN), in a package Ray
                      uploads to the cluster, never in the job's metadata (cluster/README.md)
  --no-wait           return after submitting instead of following the job's logs
  --dry-run           print the command and the runtime env (values hidden), submit nothing
  -h, --help          show this help

Passed to the job by value when set (names are printed, values never):
  AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_DEFAULT_REGION AWS_REGION PROBE_DPO_*
Credentials are NOT passed unless --pass-credentials is given: the cluster's nodes use their
own (IAM instance profile, IRSA, a Kubernetes Secret, a credentials file; cluster/README.md).
With token authentication on (RAY_AUTH_MODE=token on the cluster), `ray job submit` reads the
token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
EOF
}

die() { echo "submit.sh: $*" >&2; exit 2; }

address="${RAY_ADDRESS:-}"
dry_run=0
no_wait=0
pass_credentials=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --no-wait) no_wait=1; shift ;;
    --pass-credentials) pass_credentials=1; shift ;;
    --address) [[ $# -ge 2 ]] || die "--address needs a value"; address="$2"; shift 2 ;;
    --address=*) address="${1#--address=}"; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command to run goes after --; see --help)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no command after -- (e.g. -- probe-dpo experiment --config toxicity --storage s3://my-bucket/probe-dpo --address auto)"
if [[ -z "$address" ]]; then
  [[ $dry_run -eq 1 ]] || die "no Ray address: set RAY_ADDRESS (e.g. http://head-node:8265) or pass --address"
  address='$RAY_ADDRESS'
fi
python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "$python not found (needed to build the runtime env JSON)"

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # --working-dir . is the repository root

runtime_env=$(umask 077 && mktemp "${TMPDIR:-/tmp}/probe-dpo-runtime-env.XXXXXX")
package_dir=$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/probe-dpo-credentials.XXXXXX")
trap 'rm -rf "$runtime_env" "$package_dir"' EXIT

# Writes the runtime env (settings by value) to the 0600 file and, with --pass-credentials, the
# credentials package (same layout as probe_dpo.ray_utils.write_credentials_module); prints the
# runtime env with values hidden, then (second line) the names of credentials left behind.
report=$("$python" - "$runtime_env" "$package_dir" "$pass_credentials" <<'PY'
import json
import os
import re
import sys

path, package_dir, passing = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HF_TOKEN",
           "HUGGING_FACE_HUB_TOKEN")
secret = re.compile(r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|PRIVATE|KEY)(_|$)")  # as ray_utils
env = {k: v for k, v in sorted(os.environ.items())
       if v and (k in SETTINGS or k.startswith("PROBE_DPO_")) and not secret.search(k)}
secrets = {k: os.environ[k] for k in SECRETS if os.environ.get(k)}
# No "pip"/"conda"/"uv" key: the image has every package. Excludes keep uploads small
# (Ray also skips what .gitignore lists).
runtime_env = {"env_vars": env,
               "excludes": [".git", ".venv", "runs", "benchmarks/results", "**/__pycache__", "*.egg-info"]}
shown = {**runtime_env, "env_vars": {k: "***" for k in env}}
if passing and secrets:
    package = os.path.join(package_dir, "_probe_dpo_credentials")
    os.mkdir(package, 0o700)
    with open(os.path.join(package, "__init__.py"), "w") as f:
        f.write('"""Credentials passed to one Ray job (probe_dpo.ray_utils)."""\n')
    fd = os.open(os.path.join(package, "env.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(secrets, f)
    runtime_env.update(py_modules=[package], worker_process_setup_hook="probe_dpo.ray_utils.load_passed_credentials")
    shown.update(py_modules=["(credentials package: " + ", ".join(sorted(secrets)) + ")"],
                 worker_process_setup_hook=runtime_env["worker_process_setup_hook"])
with open(path, "w") as f:
    json.dump(runtime_env, f)
print(json.dumps(shown))
print(" ".join(sorted(secrets)) if not passing else "")
PY
)
masked=$(sed -n 1p <<<"$report")
left_behind=$(sed -n 2p <<<"$report")

cmd=("${RAY:-ray}" job submit --address "$address" --working-dir . --runtime-env "$runtime_env")
[[ $no_wait -eq 0 ]] || cmd+=(--no-wait)
cmd+=(-- "$@")

note=""
[[ -z "$left_behind" ]] || note="not passed (the job uses the cluster's own credentials; --pass-credentials to pass them): $left_behind"
if [[ $dry_run -eq 1 ]]; then
  echo "would run (from $(pwd)):"
  printf '%q ' "${cmd[@]}"
  echo
  echo "runtime env (values hidden): $masked"
  [[ -z "$note" ]] || echo "$note"
  exit 0
fi
command -v "${RAY:-ray}" >/dev/null || die "ray not found on PATH (pip install 'ray[default]==2.60.0')"
echo "submit.sh: submitting to $address; runtime env (values hidden): $masked" >&2
[[ -z "$note" ]] || echo "submit.sh: $note" >&2
"${cmd[@]}"
