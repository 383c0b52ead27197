#!/usr/bin/env bash
# Host discovery for elastic Horovod inside a SLURM allocation (horovodrun
# --host-discovery-script): prints "host:slots" for every node of the job that SLURM reports
# usable, so a node that fails (down, not responding, drained) drops out of the job and one
# that comes back rejoins it. Used by slurm/common.sh with ELASTIC=1; see docs/elastic.md.
#
# Environment:
#   ELASTIC_NODELIST   nodes to consider (default: SLURM_JOB_NODELIST, the allocation)
#   ELASTIC_SLOTS      ranks per node (default: SLURM_NTASKS_PER_NODE, else 1)
#   ELASTIC_EXCLUDE    optional file of node names (one per line) to leave out by hand
#   ELASTIC_CACHE_S    Horovod runs this every second: reuse the last answer for this many
#                      seconds (default 10) to spare slurmctld; 0 = ask every time
#   ELASTIC_CACHE      cache file (default: cache in the private folder
#                      ${TMPDIR:-/tmp}/hpc-resnet-discovery-<uid>-<job>, made 0700)
#
# The answer decides which hosts Horovod ssh-es to and adds to the job, so the cache is used
# only when nobody else can have written it: its folder is a real folder (not a link) owned
# by this user and not writable by group or others, the file is a regular file owned by this
# user, and its mtime is not in the future (a planted future mtime would be "fresh" forever).
# Otherwise the cache is ignored (one warning line when the folder is not private) and
# rewritten when the folder allows it.
set -euo pipefail

die() { echo "elastic_discover: $*" >&2; exit 2; }

NODELIST=${ELASTIC_NODELIST:-${SLURM_JOB_NODELIST:-}}
[ -n "$NODELIST" ] || die "no SLURM_JOB_NODELIST (not in an allocation?) and no ELASTIC_NODELIST"
SLOTS=${ELASTIC_SLOTS:-${SLURM_NTASKS_PER_NODE:-1}}
CACHE_S=${ELASTIC_CACHE_S:-10}
[[ "$SLOTS" =~ ^[0-9]+$ ]] || die "ELASTIC_SLOTS must be a whole number, not $(printf '%q' "$SLOTS")"
[[ "$CACHE_S" =~ ^[0-9]+$ ]] || die "ELASTIC_CACHE_S must be a whole number, not $(printf '%q' "$CACHE_S")"
JOB=${SLURM_JOB_ID:-$$}
[[ "$JOB" =~ ^[0-9A-Za-z_.-]+$ ]] || die "SLURM_JOB_ID is not a job id: $(printf '%q' "$JOB")"
CACHE=${ELASTIC_CACHE:-${TMPDIR:-/tmp}/hpc-resnet-discovery-$(id -u)-$JOB/hosts}

# private_dir DIR: DIR (created 0700 when missing) is a folder, not a link, owned by us,
# writable by nobody else.
private_dir() {
  [ -e "$1" ] || [ -L "$1" ] || mkdir -m 0700 -- "$1" 2>/dev/null || true
  [ -d "$1" ] && [ ! -L "$1" ] && [ -O "$1" ] && [ -z "$(find "$1" -maxdepth 0 -perm /022)" ]
}

# fresh_cache: the cache file is ours, a regular file, written in the last CACHE_S seconds
# and not in the future.
fresh_cache() {
  local now mtime
  if [ ! -f "$CACHE" ] || [ -L "$CACHE" ] || [ ! -O "$CACHE" ]; then return 1; fi
  now=$(date +%s)
  mtime=$(stat -c %Y -- "$CACHE")
  [ "$mtime" -le "$now" ] && [ $(( now - mtime )) -lt "$CACHE_S" ]
}

USE_CACHE=0
if [ "$CACHE_S" -gt 0 ]; then
  if private_dir "$(dirname -- "$CACHE")"; then
    USE_CACHE=1
  else
    echo "elastic_discover: warning: not caching: $(dirname -- "$CACHE") is not a private folder of $(id -un) (a link, another owner, or writable by others)" >&2
  fi
fi
if [ "$USE_CACHE" = 1 ] && fresh_cache; then
  cat -- "$CACHE"
  exit 0
fi

# One sinfo call for all nodes: "name state". Usable states only; a suffix (* not
# responding, ~ powered off, # powering up, % powering down, $ maintenance, @ reboot
# pending, ^ rebooting, ! power down pending) makes a node unusable.
states=$(sinfo -h -N -n "$NODELIST" -o "%N %t")
mapfile -t nodes < <(scontrol show hostnames "$NODELIST")
answer=""
for node in "${nodes[@]}"; do
  state=$(awk -v n="$node" '$1 == n {print $2; exit}' <<<"$states")
  case "$state" in
    alloc|mix|idle|comp|resv|plnd) ;;
    *) continue ;;
  esac
  if [ -n "${ELASTIC_EXCLUDE:-}" ] && [ -f "$ELASTIC_EXCLUDE" ] && grep -qxF -- "$node" "$ELASTIC_EXCLUDE"; then
    continue
  fi
  answer+="$node:$SLOTS"$'\n'
done
if [ "$USE_CACHE" = 1 ]; then  # mktemp: a new file of ours; mv replaces a planted name
  { tmp=$(mktemp -- "$CACHE.XXXXXX") && printf '%s' "$answer" > "$tmp" && mv -f -- "$tmp" "$CACHE"; } || true
fi
printf '%s' "$answer"
