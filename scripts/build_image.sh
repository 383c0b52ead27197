#!/usr/bin/env bash
# `make image`: build the OCI image of container/Containerfile with podman (docs/container.md).
#
# The base is $BASE when given. Without it: localhost/bookworm-base when present, else
# Debian's bookworm-slim from the registry, else (no registry reachable) a bookworm base made
# here from Debian's packages with debootstrap and imported as localhost/bookworm-base.
# The host's Horovod wheel cache is lent to the build, so a wheel built for the same
# TensorFlow, MPI and patch level is installed instead of compiled (10-25 min on 2 cores).
#
# Variables:
#   BASE          base image (a Debian bookworm: Python 3.11, OpenMPI 4.1 with PMIx)
#   IMAGE         name of the built image (default localhost/hpc-resnet); tagged :latest and
#                 :<version>-<git short sha>
#   WHEEL_CACHE   host folder mounted at the build's ~/.cache/hpc-resnet (default
#                 ~/.cache/hpc-resnet; WHEEL_CACHE= lends none); a wheel the build makes is
#                 kept there only with WHEEL_CACHE_WRITE=1 (the mount is read-only otherwise)
#   CA_BUNDLE     host CA bundle lent to pip in the build (default: $PIP_CERT when set), for
#                 networks whose TLS proxy signs with a local CA
#   ARCHIVE       also save the image as an OCI archive to this file (for `apptainer build`)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/hpc-resnet}
LOCAL_BASE=localhost/bookworm-base
REGISTRY_BASE=docker.io/library/debian:bookworm-slim
WHEEL_CACHE=${WHEEL_CACHE-${XDG_CACHE_HOME:-$HOME/.cache}/hpc-resnet}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { echo "[build_image] $*"; }
die() { echo "[build_image] error: $*" >&2; exit 1; }

# podman (and debootstrap, needed only without a base) from apt when root; else say what's missing.
install_tools() {
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  if [ -z "${BASE:-}" ] && ! command -v debootstrap >/dev/null; then missing+=(debootstrap); fi
  [ ${#missing[@]} = 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    command -v podman >/dev/null || die "podman is missing: install it (Debian: apt-get install podman)"
    return 0  # debootstrap is asked for only if the base has to be made
  fi
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Unmount whatever debootstrap left mounted below $1, then delete it (never crossing into a mount).
remove_rootfs() {
  local dir=$1 m
  [ -d "$dir" ] || return 0
  for m in $(findmnt -rn -o TARGET | grep -F "$dir/" | sort -r); do umount -l "$m" || true; done
  rm -rf --one-file-system "$dir"
}

# A minimal Debian bookworm from its packages, imported as $LOCAL_BASE (about 30 s + download).
make_local_base() {
  [ "$(id -u)" = 0 ] || die "no base image: debootstrap needs root (run as root, or pass BASE=IMAGE)"
  command -v debootstrap >/dev/null || die "debootstrap is missing (Debian: apt-get install debootstrap)"
  ROOTFS=$(mktemp -d /var/tmp/hpc-resnet-rootfs.XXXXXX)
  trap 'remove_rootfs "$ROOTFS"' EXIT
  log "making $LOCAL_BASE with debootstrap from $MIRROR"
  debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" > "$ROOTFS.log" 2>&1 \
    || { tail -n 20 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; die "debootstrap failed (log above)"; }
  rm -f "$ROOTFS.log"
  # The same suites as Debian's own images: security fixes reach `apt-get install`.
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
    "$MIRROR" "$MIRROR" "$MIRROR" > "$ROOTFS/etc/apt/sources.list"
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb
  tar --numeric-owner -C "$ROOTFS" -c . \
    | podman import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
  remove_rootfs "$ROOTFS"
  trap - EXIT
}

choose_base() {
  if [ -n "${BASE:-}" ]; then return 0; fi
  if podman image exists "$LOCAL_BASE"; then
    BASE=$LOCAL_BASE
  elif podman pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then
    BASE=$REGISTRY_BASE
  else
    log "no registry reachable for $REGISTRY_BASE"
    make_local_base
    BASE=$LOCAL_BASE
  fi
}

install_tools
choose_base
VERSION=$(sed -n 's/^version *= *//p' setup.cfg)
REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# Uncommitted changes go into the image too: say so in the revision runs record.
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && REVISION=$REVISION-dirty
TAG="$VERSION-$REVISION"
MOUNT=()
if [ -n "$WHEEL_CACHE" ]; then
  mkdir -p "$WHEEL_CACHE/horovod-wheels"
  MOUNT=(-v "$WHEEL_CACHE:/root/.cache/hpc-resnet:$([ "${WHEEL_CACHE_WRITE:-0}" = 1 ] && echo rw || echo ro)")
fi
CA_BUNDLE=${CA_BUNDLE-${PIP_CERT:-}}
if [ -n "$CA_BUNDLE" ]; then
  [ -f "$CA_BUNDLE" ] || die "CA_BUNDLE=$CA_BUNDLE is not a file"
  MOUNT+=(-v "$CA_BUNDLE:/run/hpc-resnet-build-ca.crt:ro" --build-arg PIP_CERT=/run/hpc-resnet-build-ca.crt)
fi
log "building $IMAGE:$TAG from $BASE (wheel cache: ${WHEEL_CACHE:-none})"
START=$(date +%s)
podman build --isolation=chroot -f container/Containerfile --build-arg BASE="$BASE" \
  --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" "${MOUNT[@]}" \
  -t "$IMAGE:$TAG" -t "$IMAGE:latest" .
SECONDS_TAKEN=$(( $(date +%s) - START ))
if [ -n "${ARCHIVE:-}" ]; then
  log "saving $IMAGE:$TAG to $ARCHIVE (OCI archive)"
  podman save --format oci-archive -o "$ARCHIVE" "$IMAGE:$TAG"
fi
log "built $IMAGE:$TAG ($(podman image inspect --format '{{.Size}}' "$IMAGE:$TAG" \
  | awk '{printf "%.0f MB", $1 / 1e6}')) in $((SECONDS_TAKEN / 60)) min $((SECONDS_TAKEN % 60)) s"
