#!/usr/bin/env bash
# Host discovery for elastic Horovod inside a SLURM allocation (horovodrun
# --host-discovery-script): prints "host:slots" for every node of the job that SLURM reports
# usable, so a node that fails (down, not responding, drained) drops out of the job and one
# that comes back rejoins it. Used by slurm/elastic.sbatch; see docs/elastic.md.
#
# Environment:
#   ELASTIC_NODELIST   nodes to consider (default: SLURM_JOB_NODELIST, the allocation)
#   ELASTIC_SLOTS      ranks per node (default: SLURM_NTASKS_PER_NODE, else 1)
#   ELASTIC_EXCLUDE    optional file of node names (one per line) to leave out by hand
#   ELASTIC_CACHE_S    Horovod runs this every second: reuse the last answer for this many
#                      seconds (default 10) to spare slurmctld; 0 = ask every time
#   ELASTIC_CACHE      cache file (default: ${TMPDIR:-/tmp}/hpc-resnet-discovery-<job>)
set -euo pipefail

NODELIST=${ELASTIC_NODELIST:-${SLURM_JOB_NODELIST:-}}
[ -n "$NODELIST" ] || { echo "elastic_discover: no SLURM_JOB_NODELIST (not in an allocation?) and no ELASTIC_NODELIST" >&2; exit 2; }
SLOTS=${ELASTIC_SLOTS:-${SLURM_NTASKS_PER_NODE:-1}}
CACHE=${ELASTIC_CACHE:-${TMPDIR:-/tmp}/hpc-resnet-discovery-${SLURM_JOB_ID:-$$}}
CACHE_S=${ELASTIC_CACHE_S:-10}

if [ "$CACHE_S" -gt 0 ] && [ -f "$CACHE" ] && [ $(( $(date +%s) - $(stat -c %Y "$CACHE") )) -lt "$CACHE_S" ]; then
  cat "$CACHE"
  exit 0
fi

# One sinfo call for all nodes: "name state". Usable states only; a suffix (* not
# responding, ~ powered off, # powering up, % powering down, $ maintenance, @ reboot
# pending, ^ rebooting, ! power down pending) makes a node unusable.
states=$(sinfo -h -N -n "$NODELIST" -o "%N %t")
answer=""
for node in $(scontrol show hostnames "$NODELIST"); do
  state=$(awk -v n="$node" '$1 == n {print $2; exit}' <<<"$states")
  case "$state" in
    alloc|mix|idle|comp|resv|plnd) ;;
    *) continue ;;
  esac
  if [ -n "${ELASTIC_EXCLUDE:-}" ] && [ -f "$ELASTIC_EXCLUDE" ] && grep -qxF "$node" "$ELASTIC_EXCLUDE"; then
    continue
  fi
  answer+="$node:$SLOTS"$'\n'
done
if [ "$CACHE_S" -gt 0 ]; then
  printf '%s' "$answer" > "$CACHE.tmp.$$" && mv -f "$CACHE.tmp.$$" "$CACHE"
fi
printf '%s' "$answer"
