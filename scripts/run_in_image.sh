#!/usr/bin/env bash
# `make image-check`: a 2-rank resnet_main.py run inside the image built by `make image`.
#
# Runs without an OCI runtime (`podman run` fails on machines whose kernel refuses its
# setrlimit): `podman image mount` gives the image's file system, a throw-away writable layer
# (overlay) goes on top, /proc /sys /dev /tmp, /etc/hosts and the data and output folders
# are bound in at their host paths, and `chroot` runs the commands; Apptainer, too, runs an
# image's file system this way. Two runs on a small TFRecord set, a tiny ResNet-18 at 64 px:
#   1. inside: the image's own `mpirun -np 2`;
#   2. hybrid: the host's `mpirun -np 2` starts two ranks, each chrooted into the image, as
#      `srun --mpi=pmix apptainer exec` does on a cluster (needs a host Open MPI 4.x: the
#      ranks' MPI library is the image's Open MPI 4.1; HYBRID=0 skips it);
#   3. with SLURM=1: a one-node SLURM of this machine (slurm/cluster.py, `make cluster-deps`)
#      and `srun --mpi=pmix -n 2`, each rank chrooted: SLURM's PMIx server wires up the
#      image's Open MPI, as on a cluster with Apptainer.
# Each must print its SUMMARY line. Everything mounted is unmounted at the end, on failure too.
#
# Variables: IMAGE (default localhost/hpc-resnet:latest), DATA (a folder with images/ and
# synsets.txt; default ../shared/data/imagenet, else images are generated), OUT (output
# folder, default a new one under /var/tmp, kept), STEPS (training steps, default 6).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/hpc-resnet:latest}
DATA=${DATA:-../shared/data/imagenet}
STEPS=${STEPS:-6}

log() { echo "[run_in_image] $*"; }
die() { echo "[run_in_image] error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (podman image mount, mount and chroot)"
command -v podman >/dev/null || die "podman is missing (Debian: apt-get install podman)"
podman image exists "$IMAGE" || die "no image $IMAGE: build it with \`make image\`"
OUT=${OUT:-$(mktemp -d /var/tmp/hpc-resnet-image-check.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd -P)
WORK=$(mktemp -d /var/tmp/hpc-resnet-chroot.XXXXXX)
ROOT=$WORK/root
IMAGE_MOUNTED=0
HOST_PYTHON=${PYTHON:-.venv/bin/python}  # runs slurm/cluster.py for SLURM=1

cleanup() {
  local m
  if [ -f "$WORK/slurm/etc/slurm.conf" ]; then "$HOST_PYTHON" -m slurm.cluster down "$WORK/slurm" || true; fi
  # Innermost first; -l so a busy mount still leaves the tree (then nothing is deleted).
  for m in $(findmnt -rn -o TARGET | grep -F "$ROOT" | sort -r); do umount -l "$m" || true; done
  [ "$IMAGE_MOUNTED" = 1 ] && podman image unmount "$IMAGE" >/dev/null
  if findmnt -rn -o TARGET | grep -qF "$WORK"; then
    echo "[run_in_image] warning: still mounted below $WORK; left in place" >&2
  else
    rm -rf --one-file-system "$WORK"
  fi
}
trap cleanup EXIT

# $1 host path, bound at the same path inside; "ro" as $2 makes it read-only there.
bind_in() {
  mkdir -p "$ROOT$1"
  mount --rbind "$1" "$ROOT$1"
  mount --make-rslave "$ROOT$1"
  if [ "${2:-}" = ro ]; then mount -o remount,bind,ro "$ROOT$1"; fi
}

mount_image() {
  local lower
  lower=$(podman image mount "$IMAGE")
  IMAGE_MOUNTED=1
  mkdir -p "$WORK/upper" "$WORK/work" "$ROOT"
  mount -t overlay overlay -o "lowerdir=$lower,upperdir=$WORK/upper,workdir=$WORK/work" "$ROOT"
  local d
  for d in /proc /sys /dev /tmp; do bind_in "$d"; done
  # Host names resolve as on the host (Open MPI looks its own up).
  touch "$ROOT/etc/hosts" && mount --bind /etc/hosts "$ROOT/etc/hosts"
  bind_in "$OUT"
  if [ -d "$DATA/images" ]; then DATA=$(cd "$DATA" && pwd -P); bind_in "$DATA" ro; fi
  # The image's environment (PATH to its venv, ...), as a container runtime would set it.
  mapfile -t IMAGE_ENV < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' \
    "$IMAGE" | grep .)
  IMAGE_ENV+=(HOME=/root)
}

# Run "$@" (a shell command line) inside the image, in /opt/hpc-resnet, with only its environment.
in_image() {
  chroot "$ROOT" /usr/bin/env -i "${IMAGE_ENV[@]}" bash -c "cd /opt/hpc-resnet && $*"
}

make_records() {
  local src=$DATA/images synsets=$DATA/synsets.txt split
  if [ ! -d "$src" ]; then
    log "no ImageNet sample at $DATA: generating images"
    in_image python -m imagenet.sample_images --output_dir="$OUT/generated" >/dev/null 2>&1
    src=$OUT/generated/images; synsets=$OUT/generated/synsets.txt
  fi
  for split in train validation; do
    in_image python -m imagenet.build_tfrecords --input_dir="$src" --output_dir="$OUT/tfrecords" \
      --split=$split --synsets_file="$synsets" --num_shards=2 > "$OUT/records_$split.log" 2>&1 \
      || { tail -n 20 "$OUT/records_$split.log" >&2; die "building TFRecords failed"; }
  done
}

# The resnet_main.py arguments of both runs; $1 is the model folder.
train_args() {
  echo "--mode=train_and_eval --data_dir=$OUT/tfrecords --model_dir=$1 --resnet_depth=18" \
    "--image_size=64 --train_batch_size=16 --eval_batch_size=16 --train_steps=$STEPS" \
    "--iterations_per_loop=$STEPS --steps_per_eval=$STEPS --num_train_images=40" \
    "--base_learning_rate=0.4 --warmup_epochs=1 --log_every_n_steps=2"
}

# $1 the run's name: its log must hold a SUMMARY line, which is printed.
check_summary() {
  local line
  line=$(grep -m1 '^SUMMARY ' "$OUT/$1.log" || true)
  [ -n "$line" ] || { tail -n 30 "$OUT/$1.log" >&2; die "$1 run printed no SUMMARY line ($OUT/$1.log)"; }
  log "$1 run: $line"
}

run_inside() {
  log "inside: the image's mpirun -np 2 ($(in_image mpirun --version | head -n 1))"
  in_image mpirun --allow-run-as-root -np 2 python resnet_main.py "$(train_args "$OUT/inside")" \
    > "$OUT/inside.log" 2>&1 || { tail -n 30 "$OUT/inside.log" >&2; die "inside run failed"; }
  check_summary inside
}

# Run $1's resnet_main.py with the host's launcher "${@:2}" starting ranks that are each
# chrooted into the image. `env` without -i: a rank keeps the OMPI_*/PMIX_*/SLURM_* variables
# that connect it to the launcher; the image's own variables override PATH and the like.
launch_from_host() {
  local name=$1; shift
  # shellcheck disable=SC2046
  "$@" chroot "$ROOT" /usr/bin/env -u PYTHONPATH "${IMAGE_ENV[@]}" \
    sh -c 'cd /opt/hpc-resnet && exec python resnet_main.py "$@"' sh $(train_args "$OUT/$name") \
    > "$OUT/$name.log" 2>&1 || { tail -n 30 "$OUT/$name.log" >&2; die "$name run failed"; }
  check_summary "$name"
}

run_hybrid() {
  if [ "${HYBRID:-1}" = 0 ]; then return 0; fi
  if ! mpirun --version 2>/dev/null | grep -q 'Open MPI) 4\.'; then
    log "hybrid: skipped (no host Open MPI 4.x mpirun on PATH)"; return 0
  fi
  log "hybrid: the host's mpirun -np 2 ($(mpirun --version | head -n 1)), each rank chrooted"
  launch_from_host hybrid mpirun --allow-run-as-root -np 2
}

run_slurm() {
  if [ "${SLURM:-0}" != 1 ]; then return 0; fi
  log "slurm: a one-node SLURM of this machine, srun --mpi=pmix -n 2, each rank chrooted"
  chmod 711 "$WORK"  # munged wants its socket's folders searchable (not listable)
  "$HOST_PYTHON" -m slurm.cluster up "$WORK/slurm" >/dev/null || die "SLURM did not start"
  launch_from_host slurm env SLURM_CONF="$WORK/slurm/etc/slurm.conf" \
    OMPI_MCA_mpi_yield_when_idle=1 srun --mpi=pmix -n 2 --time=10
}

START=$(date +%s)
mount_image
log "image $IMAGE mounted; outputs in $OUT"
make_records
run_inside
run_hybrid
run_slurm
log "done in $(( $(date +%s) - START )) s"
