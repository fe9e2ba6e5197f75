#!/usr/bin/env bash
# Build a python:3.11-slim-like base image from Debian with debootstrap, for machines that reach a
# Debian mirror but not Docker Hub. Debian 12 (bookworm) has CPython 3.11, the version the locks
# are resolved for. The image holds python3, its venv module and the CA certificates, nothing else.
#
# usage: images/debian-base.sh [--print] [--force]
#   --print   print the image reference and exit
#   --force   rebuild even if the engine has the image already
# DEBIAN_MIRROR chooses the mirror (default http://deb.debian.org/debian); needs root and debootstrap.
set -euo pipefail

SUITE=bookworm
IMAGE="pfedla/debian-python:3.11-$SUITE"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKER="${DOCKER:-docker}"

force=0
for arg in "$@"; do
  case "$arg" in
    --print) echo "$IMAGE"; exit 0 ;;
    --force) force=1 ;;
    *) echo "debian-base.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

if ((!force)) && "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE"
  exit 0
fi
[[ "$(id -u)" == 0 ]] || { echo "debian-base.sh: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null 2>&1 || {
  echo "debian-base.sh: debootstrap is not installed: run images/engine.sh install (as root)" >&2
  exit 1
}

root="$(mktemp -d "${TMPDIR:-/var/tmp}/pfedla-debian-base.XXXXXX")"
trap 'rm -rf "$root"' EXIT
started=$SECONDS
echo "debian-base.sh: debootstrap $SUITE from $MIRROR" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$root" "$MIRROR" \
  >"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# What the slim images leave out too: package caches and lists, documentation.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
  "$root"/usr/share/man/* "$root"/usr/share/info/*
tar -C "$root" --numeric-owner -c . | "$DOCKER" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase $SUITE with python3, python3-venv, ca-certificates" \
  - "$IMAGE" >/dev/null
echo "debian-base.sh: $IMAGE in $((SECONDS - started)) s" >&2
echo "$IMAGE"
