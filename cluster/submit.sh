#!/usr/bin/env bash
# Submit a probe-dpo command to a Ray cluster as a Ray job (see --help).
#
# Why a script: the job needs the storage settings of the caller's shell (AWS_*, PROBE_DPO_*)
# by value, and those include credentials that must never be printed, logged or visible in
# the process list. They go into a runtime-env file readable only by the caller (mode 0600),
# which `ray job submit --runtime-env` reads and this script deletes on exit. Only variable
# names are ever printed. The image carries the packages (no pip/conda in the runtime env,
# so no node ever tries to install torch); `--working-dir .` carries this checkout's code.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cluster/submit.sh [--address URL] [--no-wait] [--dry-run] -- COMMAND [ARGS...]

Submit COMMAND as a Ray job with this repository as its working directory, e.g.
  cluster/submit.sh -- probe-dpo experiment --config workflows/toxicity.yaml --storage s3://my-bucket/probe-dpo --address auto
  cluster/submit.sh -- probe-dpo attribute --testbed s3://my-bucket/probe-dpo/testbed --out s3://my-bucket/probe-dpo/attribution --mitigate filter,swap

Options:
  --address URL  Ray dashboard address (default: $RAY_ADDRESS), e.g. http://head-node:8265
  --no-wait      return after submitting instead of following the job's logs
  --dry-run      print the command and the runtime env (values hidden), submit nothing
  -h, --help     show this help

Passed to the job by value when set (names are printed, values never):
  AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
  AWS_SESSION_TOKEN AWS_DEFAULT_REGION AWS_REGION HF_TOKEN PROBE_DPO_*
With nodes that have an IAM instance profile (cluster/ray-cluster.yaml), leave the AWS_*
key variables unset: the nodes' own credentials are used.
EOF
}

die() { echo "submit.sh: $*" >&2; exit 2; }

address="${RAY_ADDRESS:-}"
dry_run=0
no_wait=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --no-wait) no_wait=1; shift ;;
    --address) [[ $# -ge 2 ]] || die "--address needs a value"; address="$2"; shift 2 ;;
    --address=*) address="${1#--address=}"; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command to run goes after --; see --help)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no command after -- (e.g. -- probe-dpo experiment --config workflows/toxicity.yaml --storage s3://my-bucket/probe-dpo --address auto)"
if [[ -z "$address" ]]; then
  [[ $dry_run -eq 1 ]] || die "no Ray address: set RAY_ADDRESS (e.g. http://head-node:8265) or pass --address"
  address='$RAY_ADDRESS'
fi
python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "$python not found (needed to build the runtime env JSON)"

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # --working-dir . is the repository root

runtime_env=$(umask 077 && mktemp "${TMPDIR:-/tmp}/probe-dpo-runtime-env.XXXXXX")
trap 'rm -f "$runtime_env"' EXIT

# Writes the runtime env (values included) to the 0600 file; prints it with values hidden.
masked=$("$python" - "$runtime_env" <<'PY'
import json
import os
import sys

NAMES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
         "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_TOKEN")
env = {k: v for k, v in sorted(os.environ.items())
       if v and (k in NAMES or k.startswith("PROBE_DPO_"))}
# No "pip"/"conda"/"uv" key: the image has every package. Excludes keep uploads small
# (Ray also skips what .gitignore lists).
runtime_env = {"env_vars": env,
               "excludes": [".git", ".venv", "runs", "benchmarks/results", "**/__pycache__", "*.egg-info"]}
with open(sys.argv[1], "w") as f:
    json.dump(runtime_env, f)
print(json.dumps({**runtime_env, "env_vars": {k: "***" for k in env}}))
PY
)

cmd=("${RAY:-ray}" job submit --address "$address" --working-dir . --runtime-env "$runtime_env")
[[ $no_wait -eq 0 ]] || cmd+=(--no-wait)
cmd+=(-- "$@")

if [[ $dry_run -eq 1 ]]; then
  echo "would run (from $(pwd)):"
  printf '%q ' "${cmd[@]}"
  echo
  echo "runtime env (values hidden): $masked"
  exit 0
fi
command -v "${RAY:-ray}" >/dev/null || die "ray not found on PATH (pip install 'ray[default]==2.60.0')"
echo "submit.sh: submitting to $address; runtime env (values hidden): $masked" >&2
"${cmd[@]}"
