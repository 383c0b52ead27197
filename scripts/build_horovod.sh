#!/usr/bin/env bash
# Build and install Horovod 0.28.1 against the TensorFlow installed in $PYTHON's environment.
#
# Horovod's last release does not compile against TF 2.21 as shipped, and has bugs that this
# project meets. Our fixes are the patch files in scripts/horovod-patches/ (NNNN-what.patch,
# each headed by what it changes and why), applied in name order to the sdist before
# building (docs/horovod.md). We build TensorFlow + Gloo (+ MPI when an MPI compiler is
# found) and keep the wheel in $HOROVOD_WHEEL_CACHE so the next set-up installs it in
# seconds. The cache key ("flavour": TF version, MPI identity or gloo, patch level, a hash of
# the patch series) is written into the package (horovod/_hpc_resnet_patches.py:
# BUILD_FLAVOUR): a changed patch or MPI rebuilds, and an installed Horovod of another
# flavour is replaced. Runs as an ordinary user; installs no system package.
#
# Variables:
#   PYTHON               interpreter of the target environment (default .venv/bin/python)
#   HOROVOD_WHEEL_CACHE  wheel cache folder (default ~/.cache/hpc-resnet/horovod-wheels,
#                        shared by every clone on the machine)
#   MPI_HOME             root of a site MPI to build against (or `module load` it so that
#                        mpicxx is on PATH); without either the build is Gloo-only. Nothing
#                        here installs system packages (root: `make cluster-deps`).
#   HOROVOD_WITHOUT_MPI=1  force a Gloo-only build
#
# Usage: build_horovod.sh [--print-flavour]   (--print-flavour: print the wheel cache key
# for this TensorFlow and MPI and exit, building nothing)
set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpc-resnet/horovod-wheels}

PATCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/horovod-patches"

log() { echo "[build_horovod] $*"; }
die() { echo "[build_horovod] error: $*" >&2; exit 1; }

PRINT_FLAVOUR=0
case "${1:-}" in
  "") ;;
  --print-flavour) PRINT_FLAVOUR=1 ;;
  *) die "unknown argument '$1' (usage: build_horovod.sh [--print-flavour])" ;;
esac

PATCHES=("$PATCH_DIR"/[0-9][0-9][0-9][0-9]-*.patch)
[ -e "${PATCHES[0]}" ] || die "no patches in $PATCH_DIR"
# The patch level: names and contents of the series, in order (12 hex digits of a sha256).
PATCH_LEVEL=$(cd "$PATCH_DIR" && for p in "${PATCHES[@]}"; do basename "$p"; cat "$p"; done \
  | sha256sum | cut -c1-12)

# The MPI to build against: MPI_HOME's, else the mpicxx on PATH (`module load`), else none.
# Checked before anything is built so that a wrong MPI_HOME fails at once.
MPICXX=""
if [ "${HOROVOD_WITHOUT_MPI:-0}" = 1 ]; then
  log "HOROVOD_WITHOUT_MPI=1: building Gloo-only (horovodrun --gloo)"
elif [ -n "${MPI_HOME:-}" ]; then
  [ -x "$MPI_HOME/bin/mpicxx" ] || die "MPI_HOME=$MPI_HOME has no $MPI_HOME/bin/mpicxx (the MPI C++ compiler wrapper Horovod builds with)"
  MPICXX="$MPI_HOME/bin/mpicxx"
elif command -v mpicxx >/dev/null 2>&1; then
  MPICXX=$(command -v mpicxx)
else
  echo "[build_horovod] no MPI found (no MPI_HOME, no mpicxx on PATH): building Gloo-only (horovodrun --gloo); for MPI \`module load\` your MPI or set MPI_HOME=<its prefix> (on a Debian test machine as root: make cluster-deps), then rerun make setup" >&2
fi

# Which MPI, as a short key: implementation + version and 8 hex digits of a sha256 of the
# wrapper's full compile line (include and library paths, compiler). A wheel links that
# libmpi: one built for Debian's OpenMPI must not be installed for a site's MPICH or another
# prefix. The same MPI at the same paths (e.g. in a container) gives the same key.
mpi_key() {
  local show version
  if show=$("$MPICXX" --showme 2>/dev/null); then  # Open MPI
    version=$("$MPICXX" --showme:version 2>/dev/null \
      | sed -n 's/.*Open MPI \([0-9][0-9.a-z]*\).*/\1/p' || true)
    version="openmpi${version:-unknown}"
  elif show=$("$MPICXX" -show 2>/dev/null); then  # MPICH and its derivatives
    version=$("$MPICXX" -v 2>&1 | sed -n 's/.*MPICH version \([0-9][0-9.a-z]*\).*/\1/p' \
      | head -n 1 || true)
    version="mpich${version:-unknown}"
  else
    die "$MPICXX answers neither --showme (Open MPI) nor -show (MPICH): cannot tell which MPI it is"
  fi
  echo "${version}-$(printf '%s\n' "$show" | sha256sum | cut -c1-8)"
}

if [ -n "$MPICXX" ]; then
  MPI_PART="mpi-$(mpi_key)"
else
  MPI_PART=gloo
fi

# Installed already with this flavour (TF version, MPI, patch level)? The build writes the
# flavour into the package; a Horovod built Gloo-only, for another MPI or with other
# patches is replaced. One TensorFlow import: the check `make setup` runs every time.
installed_ok() {
  MPI_PART=$MPI_PART PATCH_LEVEL=$PATCH_LEVEL "$PYTHON" - <<'PY' 2>/dev/null
import os
import tensorflow as tf
import horovod, horovod.tensorflow as hvd
from horovod import _hpc_resnet_patches as built
assert horovod.__version__ == "0.28.1"
want = f"tf{tf.__version__}-{os.environ['MPI_PART']}-p{os.environ['PATCH_LEVEL']}"
assert getattr(built, "BUILD_FLAVOUR", None) == want
hvd.init()
PY
}
if [ "$PRINT_FLAVOUR" = 0 ] && installed_ok; then
  log "horovod $HOROVOD_VERSION (${MPI_PART}, patch level $PATCH_LEVEL) already installed"
  exit 0
fi

TF_VERSION=$("$PYTHON" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null) || {
  echo "[build_horovod] error: TensorFlow is not importable by $PYTHON; install the project first" >&2
  exit 1
}
# One cached wheel per (TF version, MPI identity or gloo, patch level): a wheel built
# against another TF ABI or another MPI breaks, and one built with other patches is not ours.
FLAVOUR="tf${TF_VERSION}-${MPI_PART}-p${PATCH_LEVEL}"
if [ "$PRINT_FLAVOUR" = 1 ]; then
  echo "$FLAVOUR"
  exit 0
fi

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
  printf '"""Patch level of this Horovod build (scripts/build_horovod.sh of hpc-resnet)."""\n%s\n%s\n%s\n' \
    "PATCH_LEVEL = \"$PATCH_LEVEL\"" \
    "PATCHES = ($(for p in "${PATCHES[@]}"; do printf '"%s", ' "$(basename "$p")"; done))" \
    "BUILD_FLAVOUR = \"$FLAVOUR\"" \
    > "$SRC/horovod/_hpc_resnet_patches.py"
  if [ -n "$MPICXX" ]; then
    # CMake's FindMPI looks in MPI_HOME and on PATH: pin both to the MPI of the key.
    MPI_ENV=(HOROVOD_WITH_MPI=1 MPI_HOME="$(dirname "$(dirname "$MPICXX")")"
             PATH="$(dirname "$MPICXX"):$PATH")
  else
    MPI_ENV=(HOROVOD_WITHOUT_MPI=1)
  fi
  env HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_WITH_GLOO=1 "${MPI_ENV[@]}" MAKEFLAGS="-j$(nproc)" \
      "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEEL_DIR" "$SRC" \
      > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; echo "[build_horovod] error: build failed" >&2; exit 1; }
  WHEEL=$(ls "$WHEEL_DIR"/horovod-$HOROVOD_VERSION-*.whl | head -n 1)
  log "built $WHEEL"
fi

"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL"
"$PYTHON" -m pip install -q "cloudpickle" "psutil" "pyyaml" "packaging"
# A wheel put into the cache by hand without its flavour would be reinstalled on every run.
installed_ok || die "the installed $WHEEL does not import or is not flavour $FLAVOUR; remove $WHEEL_DIR and rerun"
log "installed; build check:"
"$(dirname "$PYTHON")/horovodrun" --check-build
