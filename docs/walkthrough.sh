#!/usr/bin/env bash
# gpuyard over plain HTTP with curl: create a user, upload the digits data set, train a Highway network,
# follow it live, download model.h5 and load it in bare Keras (no gpuyard import) to check its accuracy.
#
# Start the stack first, in another terminal:   gpuyard up
# then:                                         bash docs/walkthrough.sh
#
# Settings (environment): GPUYARD_URL (default http://127.0.0.1:8000), GPUYARD_DATA_DIR (the stack's
# data directory, default the checkout's .gpuyard, where `make up` keeps it, so that `gpuyard users
# create` writes to the stack's database), PYTHON and GPUYARD (default: the checkout's .venv, where
# `make up` installed gpuyard), BARE_PYTHON (loads the model; default $PYTHON), SPEC (default
# examples/specs/highway.json), WORK (default: a new temp dir).
# tests/service/test_walkthrough.py runs this very script against a fresh `gpuyard up`.
set -euo pipefail

URL="${GPUYARD_URL:-http://127.0.0.1:8000}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$REPO/.venv/bin/python" ]; then VENV_BIN="$REPO/.venv/bin/"; else VENV_BIN=""; fi
PYTHON="${PYTHON:-${VENV_BIN}python3}"
BARE_PYTHON="${BARE_PYTHON:-$PYTHON}"
GPUYARD="${GPUYARD:-${VENV_BIN}gpuyard}"
# Absolute, since the script works in $WORK: `gpuyard users create` must reach the stack's database.
GPUYARD_DATA_DIR="${GPUYARD_DATA_DIR:-$REPO/.gpuyard}"
mkdir -p "$GPUYARD_DATA_DIR"
GPUYARD_DATA_DIR="$(cd "$GPUYARD_DATA_DIR" && pwd)"
export GPUYARD_DATA_DIR
SPEC="${SPEC:-$REPO/examples/specs/highway.json}"
WORK="${WORK:-$(mktemp -d)}"
cd "$WORK"
echo "working in $WORK"

# One JSON field of stdin (curl cannot parse JSON; this is the only thing Python does for curl here).
json_field() { "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# 1. A user, and its bearer token (printed once; only its hash is stored).
TOKEN="$("$GPUYARD" users create "walkthrough-$$")"
AUTH="Authorization: Bearer $TOKEN"
curl -sS --fail-with-body "$URL/v1/ready"; echo

# 2. The data set: scikit-learn's digits as HDF5 (X_train, Y_train, X_test, Y_test), uploaded as the raw
#    body. The API checks it in a sandbox and answers its id and a summary (shapes, classes, splits).
"$PYTHON" -c 'from models.data.digits import write_digits_h5; write_digits_h5("digits.h5")'
curl -sS --fail-with-body -H "$AUTH" -H "Content-Type: application/x-hdf5" \
     --data-binary @digits.h5 "$URL/v1/datasets?name=digits.h5" > dataset.json
DATASET="$(json_field id < dataset.json)"
echo "data set: $DATASET"

# 3. The job: the data set's id and a spec (a Highway MLP, 20 epochs with early stopping).
printf '{"dataset": "%s", "spec": %s}\n' "$DATASET" "$(cat "$SPEC")" > job-request.json
curl -sS --fail-with-body -H "$AUTH" -H "Content-Type: application/json" \
     --data-binary @job-request.json "$URL/v1/jobs" > job.json
JOB="$(json_field id < job.json)"
echo "job: $JOB ($(json_field state < job.json))"

# 4. Its events, live (Server-Sent Events); the stream ends after the job's final state event.
#    A dropped connection resumes with:  curl -N -H "Last-Event-ID: <last id seen>" ...
curl -sS -N --fail-with-body --max-time 900 -H "$AUTH" "$URL/v1/jobs/$JOB/events" \
    | grep --line-buffered '^data:' | tee events.txt
STATE="$(grep '"event":"state"' events.txt | tail -n 1 | sed 's/^data: //' | json_field state)"
echo "final state: $STATE"
if [ "$STATE" != "succeeded" ]; then
    curl -sS -H "$AUTH" "$URL/v1/jobs/$JOB/logs" | tail -n 30
    exit 1
fi

# 5. The trained model; its ETag is the file's SHA-256.
curl -sS --fail-with-body -H "$AUTH" -D headers.txt -o model.h5 "$URL/v1/jobs/$JOB/artifacts/model.h5"
ETAG="$(grep -i '^etag:' headers.txt | tr -d '\r"' | awk '{print $2}')"
SHA256="$( (sha256sum model.h5 2>/dev/null || shasum -a 256 model.h5) | awk '{print $1}')"
echo "model.h5: sha256 $SHA256, ETag $ETAG"
[ "$SHA256" = "$ETAG" ]

# 6. Plain Keras loads it: no gpuyard code involved. Test accuracy on the digits test split.
KERAS_BACKEND="${KERAS_BACKEND:-tensorflow}" "$BARE_PYTHON" - <<'EOF'
import sys

import h5py
import keras
import numpy as np

model = keras.models.load_model("model.h5")
with h5py.File("digits.h5", "r") as f:
    x_test, y_test = f["X_test"][:], f["Y_test"][:]
accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))
gpuyard_modules = sorted({name.split(".")[0] for name in sys.modules} & {"models", "worker", "service"})
assert not gpuyard_modules, f"gpuyard modules were imported: {gpuyard_modules}"
print(f"bare keras {keras.__version__}: {model.name}, {model.count_params()} parameters, "
      f"test accuracy {accuracy:.4f} on {len(y_test)} digits")
sys.exit(0 if accuracy >= 0.9 else 1)
EOF
