#!/usr/bin/env bash
# Make a local base image from Debian's own packages: Debian bookworm (minbase) with python3 and
# python3-venv, nothing else. For machines that reach Debian's mirror but no image registry:
#   deploy/debian-base.sh [IMAGE]         # default gpuyard-debian-base:bookworm; about 2 minutes
#   docker build --build-arg BASE_IMAGE=gpuyard-debian-base:bookworm -f deploy/Dockerfile.cpu .
# Needs root (debootstrap), debootstrap and a running Docker engine. Does nothing if IMAGE exists.
# Settings (environment): SUITE (bookworm), MIRROR (default: the Debian mirror apt uses here), DOCKER.
set -euo pipefail

IMAGE="${1:-gpuyard-debian-base:bookworm}"
SUITE="${SUITE:-bookworm}"
DOCKER="${DOCKER:-docker}"

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE exists"
    exit 0
fi
# The mirror apt uses (deb822 sources or the one-line format), so that no other host is asked.
if [ -z "${MIRROR:-}" ]; then
    MIRROR="$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -oE 'https?://[^ ]*/debian/?( |$)' | grep -v security | head -n 1 | tr -d ' ')" || true
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: make compose-tools (or apt-get install debootstrap)"; exit 1; }

ROOTFS="$(mktemp -d "${TMPDIR:-/tmp}/gpuyard-rootfs.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
    || { tail -n 20 "$ROOTFS.log"; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
# What a registry's image would not carry: apt's downloaded packages and lists.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar --numeric-owner -C "$ROOTFS" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "$IMAGE: $("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"
