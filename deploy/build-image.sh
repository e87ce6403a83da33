#!/usr/bin/env bash
# Build the CPU image (`make image`): deploy/build-image.sh [TAG]   (default gpuyard-cpu:dev)
#
# BASE_IMAGE (environment): the image to build on. Unset: the Dockerfile's default (the official slim
# Python image) when it is here or can be pulled, else a local Debian base made from Debian's own
# packages by deploy/debian-base.sh (for machines that reach no image registry).
# pip inside the build uses this machine's pip settings and CA bundle (deploy/pipconf.py), passed as
# BuildKit secrets: in no layer. The build runs on the host's network (`--network host`), so it reaches
# whatever index pip reaches here. Prints the image's size.
# DOCKER: the client; default `deploy/docker-engine.sh --client` (Debian's /usr/bin/docker, 20.10 with
# BuildKit built in, where it exists: a newer client wants the buildx plugin for BuildKit).
set -euo pipefail

TAG="${1:-gpuyard-cpu:dev}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER="${DOCKER:-$("$REPO/deploy/docker-engine.sh" --client)}"
export DOCKER
PYTHON="${PYTHON:-python3}"
DEFAULT_BASE="$(sed -n 's/^ARG BASE_IMAGE=//p' "$REPO/deploy/Dockerfile.cpu")"
LOCAL_BASE="gpuyard-debian-base:bookworm"

if [ -z "${BASE_IMAGE:-}" ]; then
    if "$DOCKER" image inspect "$DEFAULT_BASE" >/dev/null 2>&1 \
        || timeout 60 "$DOCKER" pull -q "$DEFAULT_BASE" >/dev/null 2>&1; then
        BASE_IMAGE="$DEFAULT_BASE"
    else
        echo "$DEFAULT_BASE cannot be pulled here: building on $LOCAL_BASE (Debian's own packages)"
        "$REPO/deploy/debian-base.sh" "$LOCAL_BASE"
        BASE_IMAGE="$LOCAL_BASE"
    fi
fi

SECRETS="$(mktemp -d)"
trap 'rm -rf "$SECRETS"' EXIT
"$PYTHON" "$REPO/deploy/pipconf.py" >"$SECRETS/pip.conf"
secret_args=(--secret "id=pipconf,src=$SECRETS/pip.conf")
if CA="$("$PYTHON" "$REPO/deploy/pipconf.py" --ca)"; then
    secret_args+=(--secret "id=ca,src=$CA")
fi

echo "building $TAG on $BASE_IMAGE"
DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" "${secret_args[@]}" \
    -f "$REPO/deploy/Dockerfile.cpu" -t "$TAG" "$REPO" >"$SECRETS/build.log" 2>&1 \
    || { tail -n 40 "$SECRETS/build.log"; exit 1; }
size="$("$DOCKER" image inspect --format '{{.Size}}' "$TAG")"
user="$("$DOCKER" image inspect --format '{{.Config.User}}' "$TAG")"
echo "$TAG: $((size / 1000000)) MB, runs as user ${user:-root}, base $BASE_IMAGE"
