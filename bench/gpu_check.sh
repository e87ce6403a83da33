#!/usr/bin/env bash
# Every GPU check of gpuyard in one run (a few minutes on an H100): inventory, two jobs at 0.3 on one GPU,
# four at 0.25 together against one alone (aggregate samples/s, each within its budget),
# the watchdog killing an over-budget job (requeued once at its measured peak), GPU hygiene, a warm trainer (cap set after the import still
# holds; submit -> first step warm vs cold), and the trainer's step rate and extra wall time against bare
# Keras (interleaved, median of ratios).
# Needs no TensorFlow, no Redis server, no network: JAX backend, the supervisor driven directly on SQLite.
#
#   bench/gpu_check.sh                    # on a machine with an NVIDIA GPU
#   bench/gpu_check.sh --wheels DIR       # first install DIR/*.whl (what the machine lacks) into a temp dir
#   bench/gpu_check.sh --fake             # dry rehearsal on CPU with two fake 16 GiB GPUs (GPUYARD_FAKE_GPUS)
#
# --wheels DIR: pip installs the wheel files in DIR offline (--no-index --no-deps: DIR must hold every
# missing package, dependencies included) into a temporary site directory put first on PYTHONPATH; the
# machine's own environment is left untouched. Other arguments go to bench/gpu_check.py (--fake, --rows,
# --overhead-rows, --overhead-epochs, --overhead-rounds, --skip-overhead, --skip-warm).
# Results: bench/results/gpu-<date>.md, and $OUT/ when OUT is set. Each check fails on its own; the exit
# status is 1 when any failed.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
wheels=""
fake=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || { echo "gpu_check: --wheels needs a directory" >&2; exit 2; }; wheels="$2"; shift 2 ;;
    --wheels=*) wheels="${1#--wheels=}"; shift ;;
    --fake) fake=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
[ -x .venv/bin/python ] && [ -z "${PYTHON_FORCE:-}" ] && [ -n "$fake" ] && PYTHON=.venv/bin/python
site=""
if [ -n "$wheels" ]; then
  shopt -s nullglob
  files=("$wheels"/*.whl)
  shopt -u nullglob
  [ ${#files[@]} -gt 0 ] || { echo "gpu_check: no .whl files in $wheels" >&2; exit 2; }
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  site="$tmp/site"
  echo "gpu_check: installing ${#files[@]} wheel(s) from $wheels into $site" >&2
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${files[@]}" || {
    echo "gpu_check: pip could not install the wheels in $wheels" >&2
    exit 2
  }
fi
export PYTHONPATH="${site:+$site:}$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
unset KERAS_BACKEND GPUYARD_REDIS_URL
if [ -z "$fake" ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,uuid,name,memory.used,memory.total,driver_version --format=csv || true
fi
timeout 560 "$PYTHON" bench/gpu_check.py ${args[@]+"${args[@]}"}
status=$?
[ $status -eq 124 ] && echo "gpu_check: stopped after 560 s (under the device machine's 10-minute call limit)" >&2
exit $status
