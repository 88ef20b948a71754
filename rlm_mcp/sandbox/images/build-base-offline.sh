#!/bin/sh
# Build a Debian bookworm base image with python3 without a container registry.
#
#   rlm_mcp/sandbox/images/build-base-offline.sh [IMAGE_NAME]   (default: rlm-mcp-base:bookworm)
#
# `rlm-mcp sandbox build --offline` runs it from the installed package.
#
# For machines that cannot reach Docker Hub (so `FROM python:3.12-slim` cannot be pulled) but
# can reach a Debian mirror. Uses debootstrap (minbase variant, plus python3) with the mirror
# apt on this machine already uses (override with DEBIAN_MIRROR=...), then imports the root
# filesystem with `docker import`. Needs root, debootstrap and a running Docker engine.
# Idempotent: does nothing when the image already exists.
set -eu

NAME="${1:-rlm-mcp-base:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"

if docker image inspect "$NAME" >/dev/null 2>&1; then
    echo "base image $NAME already exists" >&2
    exit 0
fi
command -v debootstrap >/dev/null 2>&1 || {
    echo "debootstrap is not installed: apt-get install debootstrap" >&2; exit 1; }

# The first Debian archive apt is configured with (deb822 .sources files or one-line lists),
# skipping security and update suites.
find_mirror() {
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '
            /^[ \t]*$/ { if (uri != "" && suites ~ /(^| )'"$SUITE"'( |$)/) { print uri; exit } uri=""; suites=""; next }
            /^URIs:/ { uri=$2 }
            /^Suites:/ { $1=""; suites=$0 " " }
            END { if (uri != "" && suites ~ /(^| )'"$SUITE"'( |$)/) print uri }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                           if ($(i+1) == "'"$SUITE"'") print $i }' "$f"
    done
}
MIRROR="${DEBIAN_MIRROR:-$(find_mirror | head -n 1)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

ROOTFS="$(mktemp -d /tmp/rlm-base-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT INT TERM
echo "debootstrap $SUITE from $MIRROR into $ROOTFS" >&2
debootstrap --variant=minbase --include=python3 "$SUITE" "$ROOTFS" "$MIRROR" >&2
# Slim the image: no apt lists, caches, docs or man pages.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$NAME" >&2
echo "built base image $NAME" >&2
