#!/usr/bin/env bash
# Every GPU check of gpuyard in one run (a few minutes on an H100): inventory, two jobs at 0.3 on one GPU,
# the watchdog killing an over-budget job, GPU hygiene, and the trainer's overhead against bare Keras.
# Needs no TensorFlow, no Redis server, no network: JAX backend, the supervisor driven directly on SQLite.
#
#   bench/gpu_check.sh            # on a machine with an NVIDIA GPU
#   bench/gpu_check.sh --fake     # dry rehearsal on CPU with two fake 16 GiB GPUs (GPUYARD_FAKE_GPUS)
#
# Extra arguments go to bench/gpu_check.py (--rows, --overhead-rows, --overhead-epochs, --skip-overhead).
# Results: bench/results/gpu-<date>.md, and $OUT/ when OUT is set. Each check fails on its own; the exit
# status is 1 when any failed.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON_FORCE:-}" ] && [ "${1:-}" = "--fake" ] && PYTHON=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
unset KERAS_BACKEND GPUYARD_REDIS_URL
if [ "${1:-}" != "--fake" ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,uuid,name,memory.used,memory.total,driver_version --format=csv || true
fi
timeout 330 "$PYTHON" bench/gpu_check.py "$@"
status=$?
[ $status -eq 124 ] && echo "gpu_check: stopped after 330 s (the 6-minute budget)" >&2
exit $status
