#!/usr/bin/env bash
# Make sure a Docker engine answers: start Debian's dockerd (docker.io) when it is installed but not
# running and we are root; else say in one line why there is none, and exit 1.
# `deploy/docker-engine.sh --client` prints the Docker client to use and exits: the one place that choice
# is made, at the moment it is asked (after `make docker-engine` may have installed docker.io), never
# when make starts.
# DOCKER: the client (default Debian's $DEBIAN_DOCKER, /usr/bin/docker, where it exists: 20.10 has
# BuildKit built in, a newer client wants the buildx plugin). The daemon's log: /var/log/gpuyard-dockerd.log.
set -uo pipefail

if [ -z "${DOCKER:-}" ]; then
    DEBIAN_DOCKER="${DEBIAN_DOCKER:-/usr/bin/docker}"
    if [ -x "$DEBIAN_DOCKER" ]; then DOCKER="$DEBIAN_DOCKER"; else DOCKER=docker; fi
fi
if [ "${1:-}" = --client ]; then echo "$DOCKER"; exit 0; fi
engine_up() { "$DOCKER" info >/dev/null 2>&1; }

engine_up && exit 0
command -v "$DOCKER" >/dev/null 2>&1 || { echo "no Docker here: $DOCKER is not installed (make docker-engine, as root)"; exit 1; }
DOCKERD="$(command -v dockerd || echo /usr/sbin/dockerd)"
[ -x "$DOCKERD" ] || { echo "no Docker engine here: dockerd is not installed (make docker-engine, as root)"; exit 1; }
[ "$(id -u)" = 0 ] || { echo "no Docker engine here: dockerd is not running and only root can start it"; exit 1; }
# Started detached from this shell, so it outlives `make`; containers of later runs find it up.
setsid "$DOCKERD" >>/var/log/gpuyard-dockerd.log 2>&1 < /dev/null &
for _ in $(seq 60); do
    engine_up && exit 0
    kill -0 $! 2>/dev/null || break
    sleep 1
done
echo "no Docker engine here: dockerd did not start (no kernel support or privileges?): $(tail -n 1 /var/log/gpuyard-dockerd.log)"
exit 1
