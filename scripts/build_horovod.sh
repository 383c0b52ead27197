#!/usr/bin/env bash
# Build and install Horovod 0.28.1 against the TensorFlow installed in $PYTHON's environment.
#
# Horovod's last release does not compile against TF 2.21 as shipped, and has bugs that this
# project meets. Our fixes are the patch files in scripts/horovod-patches/ (NNNN-what.patch,
# each headed by what it changes and why), applied in name order to the sdist before
# building (docs/horovod.md). We build TensorFlow + Gloo (+ MPI when an MPI compiler is
# found) and keep the wheel in $HOROVOD_WHEEL_CACHE so the next set-up installs it in
# seconds. The patch level (a hash of the patch series) is part of the cache key and is
# written into the package (horovod/_hpc_resnet_patches.py): a changed patch rebuilds, and
# an installed Horovod built with other patches is replaced.
#
# Variables:
#   PYTHON               interpreter of the target environment (default .venv/bin/python)
#   HOROVOD_WHEEL_CACHE  wheel cache folder (default ~/.cache/hpc-resnet/horovod-wheels,
#                        shared by every clone on the machine)
#   MPI_HOME             root of a site MPI to build against (or `module load` it so that
#                        mpicxx is on PATH); without either, Debian's OpenMPI is installed
#                        when running as root, else the build is Gloo-only
#   HOROVOD_WITHOUT_MPI=1  force a Gloo-only build
set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpc-resnet/horovod-wheels}

PATCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/horovod-patches"

log() { echo "[build_horovod] $*"; }
die() { echo "[build_horovod] error: $*" >&2; exit 1; }

PATCHES=("$PATCH_DIR"/[0-9][0-9][0-9][0-9]-*.patch)
[ -e "${PATCHES[0]}" ] || die "no patches in $PATCH_DIR"
# The patch level: names and contents of the series, in order (12 hex digits of a sha256).
PATCH_LEVEL=$(cd "$PATCH_DIR" && for p in "${PATCHES[@]}"; do basename "$p"; cat "$p"; done \
  | sha256sum | cut -c1-12)

if PATCH_LEVEL=$PATCH_LEVEL "$PYTHON" - <<'PY' 2>/dev/null
import os
import horovod, horovod.tensorflow as hvd
from horovod import _hpc_resnet_patches as built
assert horovod.__version__ == "0.28.1"
assert built.PATCH_LEVEL == os.environ["PATCH_LEVEL"]
hvd.init()
PY
then
  log "horovod $HOROVOD_VERSION (patch level $PATCH_LEVEL) with TensorFlow already installed"
  exit 0
fi

TF_VERSION=$("$PYTHON" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null) || {
  echo "[build_horovod] error: TensorFlow is not importable by $PYTHON; install the project first" >&2
  exit 1
}

# MPI: the user's (MPI_HOME or mpicxx on PATH), else Debian's OpenMPI when we are root.
if [ -n "${MPI_HOME:-}" ]; then
  export PATH="$MPI_HOME/bin:$PATH"
fi
WITH_MPI=0
if [ "${HOROVOD_WITHOUT_MPI:-0}" != 1 ]; then
  if ! command -v mpicxx >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "no MPI found: installing Debian's openmpi-bin libopenmpi-dev"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
  fi
  if command -v mpicxx >/dev/null 2>&1; then
    WITH_MPI=1
  else
    log "no MPI compiler (mpicxx) found and not root: building Gloo-only (horovodrun --gloo)"
  fi
fi

# One cached wheel per (TF version, MPI or not, patch level): a wheel built against another
# TF ABI breaks, and one built with other patches is not ours.
FLAVOUR="tf${TF_VERSION}-$([ $WITH_MPI = 1 ] && echo mpi || echo gloo)-p${PATCH_LEVEL}"
WHEEL_DIR="$CACHE/$FLAVOUR"
mkdir -p "$WHEEL_DIR"
WHEEL=$(ls "$WHEEL_DIR"/horovod-$HOROVOD_VERSION-*.whl 2>/dev/null | head -n 1 || true)

if [ -z "$WHEEL" ]; then
  command -v patch >/dev/null || die "the 'patch' program is missing (Debian: apt-get install patch)"
  log "building horovod $HOROVOD_VERSION for TF $TF_VERSION ($FLAVOUR); 8-25 min on 2 cores"
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  "$PYTHON" -m pip install -q "cmake>=3.18,<4" packaging
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK"
  tar xzf "$WORK/horovod-$HOROVOD_VERSION.tar.gz" -C "$WORK"
  SRC="$WORK/horovod-$HOROVOD_VERSION"
  for p in "${PATCHES[@]}"; do
    log "applying patch $(basename "$p")"
    patch -p1 --forward --batch --quiet -d "$SRC" < "$p" || die "patch $p did not apply"
  done
  printf '"""Patch level of this Horovod build (scripts/build_horovod.sh of hpc-resnet)."""\n%s\n%s\n' \
    "PATCH_LEVEL = \"$PATCH_LEVEL\"" \
    "PATCHES = ($(for p in "${PATCHES[@]}"; do printf '"%s", ' "$(basename "$p")"; done))" \
    > "$SRC/horovod/_hpc_resnet_patches.py"
  env HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_WITH_GLOO=1 \
      $([ $WITH_MPI = 1 ] && echo HOROVOD_WITH_MPI=1 || echo HOROVOD_WITHOUT_MPI=1) \
      MAKEFLAGS="-j$(nproc)" \
      "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEEL_DIR" "$SRC" \
      > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; echo "[build_horovod] error: build failed" >&2; exit 1; }
  WHEEL=$(ls "$WHEEL_DIR"/horovod-$HOROVOD_VERSION-*.whl | head -n 1)
  log "built $WHEEL"
fi

"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL"
"$PYTHON" -m pip install -q "cloudpickle" "psutil" "pyyaml" "packaging"
log "installed; build check:"
"$(dirname "$PYTHON")/horovodrun" --check-build
