#!/usr/bin/env bash
# Make the build's base image, python:3.11-slim-bookworm, when it can be neither found nor pulled:
# a builder that reaches the Python and Debian package indexes but no container registry
# (offline CI, a sandbox) builds it from Debian bookworm itself with debootstrap (~1 min).
#
#     bash deploy/base_image.sh [IMAGE]        (as root; IMAGE defaults to python:3.11-slim-bookworm)
#
# What it holds: Debian bookworm minbase + python3 (3.11, as in the official image), venv,
# pip and ca-certificates; `python` on PATH as in the official image; this machine's CA bundle
# and the index settings of its pip (`pip config list`) in /etc/pip.conf, so pip inside the
# build reaches the package index the way this machine does (through a proxy with its own CA,
# or another index). Prints what it did; exits 0 when IMAGE is there at the end.
set -euo pipefail
IMAGE=${1:-python:3.11-slim-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: present"
  exit 0
fi
if docker pull -q "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: pulled"
  exit 0
fi
echo "base image $IMAGE: cannot be pulled; making it from Debian bookworm with debootstrap"
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null

root=$(mktemp -d /tmp/base-image.XXXXXX)
trap 'rm -rf "$root"' EXIT
t0=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
# This machine's trust store (it may hold a proxy's CA) and its pip settings.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
{
  echo "[global]"
  echo "cert = /etc/ssl/certs/ca-certificates.crt"
  # index settings of this machine that mean something inside a container (URLs, not local paths)
  pip config list 2>/dev/null | sed -nE "s/^(global|:env:)\.(index-url|extra-index-url|trusted-host|timeout|default-timeout)='(.*)'$/\2 = \3/p" \
    | grep -v 'file://' || true
} >"$root/etc/pip.conf"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "base image $IMAGE: made in $(( $(date +%s) - t0 )) s, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
