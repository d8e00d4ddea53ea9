#!/usr/bin/env bash
# Make a local stand-in for the `python:3.11-slim` base image, for machines that cannot pull from
# Docker Hub: Debian bookworm (whose python3 is 3.11) from debootstrap, with pip, venv and the CA
# certificates, imported into podman under that name so `podman build --pull=never` finds it.
# See docs/deploy.md. Idempotent: does nothing when the image is already there.
#
#   tools/make-base-image.sh [IMAGE]     (as root; IMAGE defaults to python:3.11-slim)
#
# Environment: MIRROR (default http://deb.debian.org/debian), PODMAN (default podman),
# EXTRA_CA_DIR (default /usr/local/share/ca-certificates: the host's own extra CAs, e.g. an egress
# proxy's, copied in so pip inside the build reaches the package index the way the host does).
set -euo pipefail

IMAGE=${1:-python:3.11-slim}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PODMAN=${PODMAN:-podman}
EXTRA_CA_DIR=${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}

if "$PODMAN" image exists "$IMAGE"; then
    echo "make-base-image: $IMAGE exists, nothing to do"
    exit 0
fi
for tool in debootstrap "$PODMAN" tar; do
    command -v "$tool" >/dev/null || { echo "make-base-image: $tool not found" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "make-base-image: debootstrap needs root" >&2; exit 1; }

work=$(mktemp -d /var/tmp/p2p-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

start=$(date +%s)
debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
}

# The host's extra CAs (*.crt only, the layout update-ca-certificates reads).
if compgen -G "$EXTRA_CA_DIR/*.crt" >/dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp "$EXTRA_CA_DIR"/*.crt "$root/usr/local/share/ca-certificates/"
fi
chroot "$root" update-ca-certificates >"$work/ca.log" 2>&1 || { cat "$work/ca.log" >&2; exit 1; }

# pip system-wide, as in the official image (whose Python is not Debian's): PEP 668's marker off,
# and pip told to trust the system bundle rather than its own copy of certifi.
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
cat >"$root/etc/pip.conf" <<'CONF'
[global]
break-system-packages = true
cert = /etc/ssl/certs/ca-certificates.crt
CONF

# Smaller: no apt lists, caches or docs.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/locale/* "$root"/var/cache/debconf/*-old "$root"/var/log/*.log

tar --numeric-owner -C "$root" -c . | "$PODMAN" import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
echo "make-base-image: $IMAGE imported in $(($(date +%s) - start)) s"
