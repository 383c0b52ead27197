#!/usr/bin/env bash
# Install a single-node SLURM from Debian's packages (idempotent: a second run only checks).
#
#   sudo make cluster-deps        (runs this script)
#
# The only place the project installs system packages (issue 20): `virtual_cluster up`, the
# cluster library and the test fixtures install nothing and name this command instead.
# Installs slurmctld slurmd slurm-client munge (SLURM 22.05 on Debian 12) and, for
# `srun --mpi=pmix`, libpmix2 plus Debian's OpenMPI (openmpi-bin, libopenmpi-dev) which
# Horovod's MPI build and `LAUNCHER=mpirun` use, and openssh-server (the virtual cluster's
# nodes run sshd for horovodrun's remote workers). The packages' own services are not
# used: slurm/cluster.py starts munged/slurmctld/slurmd by hand with a generated
# slurm.conf in a temporary folder. Needs root and apt-get (Debian/Ubuntu).
set -euo pipefail

PKGS=(slurmctld slurmd slurm-client munge libpmix2 openmpi-bin libopenmpi-dev openssh-server)
log() { echo "[install_slurm] $*"; }

log "system packages for the SLURM and multinode tests: ${PKGS[*]}"

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  log "already installed: ${PKGS[*]}"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "[install_slurm] error: missing packages ${missing[*]}; run this script as root" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install_slurm] error: apt-get not found; install ${missing[*]} with your package manager" >&2
  exit 1
fi
log "installing ${missing[*]} with apt-get (on a systemd host Debian enables their services"
log "at boot: munge, slurmctld, slurmd, ssh; the tests start their own daemons and need none)"
export DEBIAN_FRONTEND=noninteractive
# Packages' postinst scripts try to start services; there is no init here, so tell
# invoke-rc.d not to (policy-rc.d exit 101 = action forbidden) for the duration.
POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$POLICY" && chmod +x "$POLICY" && created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$POLICY"' EXIT
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for b in slurmctld slurmd sbatch srun scontrol munged; do
  command -v "$b" >/dev/null 2>&1 || { echo "[install_slurm] error: $b missing after install" >&2; exit 1; }
done
log "installed: $(slurmctld -V 2>/dev/null || true)"
