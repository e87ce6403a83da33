#!/usr/bin/env bash
# Make sure a Docker engine answers: start Debian's dockerd (docker.io) when it is installed but not
# running and we are root; else say in one line why there is none, and exit 1.
# DOCKER: the client (default Debian's /usr/bin/docker where it exists). The daemon's log:
# /var/log/gpuyard-dockerd.log.
set -uo pipefail

if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
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
