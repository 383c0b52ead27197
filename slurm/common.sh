# shellcheck shell=bash
# Shared launch logic of the slurm/*.sbatch scripts. Sourced, never run: the batch script
# sets its defaults first, then calls `hr_setup` and `hr_launch PROGRAM ARGS...`.
#
# What it does, in one place for all scripts:
#   * decides where it runs: inside a SLURM allocation (SLURM_JOB_ID set) or on a plain
#     machine (bash slurm/X.sbatch), and which launcher: srun (default in SLURM), mpirun
#     (default outside), none (one process, for debugging), or horovodrun (ELASTIC=1:
#     elastic Horovod over the allocation's usable nodes, docs/elastic.md);
#   * loads MODULES, activates VENV / picks PYTHON, puts the project on PYTHONPATH;
#   * derives the per-rank thread counts from the CPUs each task owns (SLURM_CPUS_PER_TASK,
#     else the node's CPUs / tasks per node): TF's intra/inter-op pools (and OMP_NUM_THREADS),
#     and exports Horovod's fusion settings;
#   * launches one rank per socket (srun --cpu-bind=sockets / mpirun --map-by socket
#     --bind-to socket) and prints a header a human (and tests) can read in the job log.
#
# Every variable below can be set in the environment (sbatch exports the submitting shell's
# environment by default) or edited at the top of the batch script.

hr_log() { echo "[hpc-resnet] $*"; }
HR_PREEMPTED=75  # exit status of a rank stopped by SIGTERM/SIGUSR1 after its checkpoint
hr_die() { echo "[hpc-resnet] error: $*" >&2; exit 2; }

# hr_check_int NAME...: each named variable that is set and not empty must be a whole number
# (^[0-9]+$); it is rewritten in base 10 (08 -> 8). Bash arithmetic, $(( )), evaluates a
# variable's value as an expression, and an array index in it runs $(...): BATCH='X[$(cmd)]'
# would run cmd. So every variable from the environment is checked before arithmetic.
hr_check_int() {
  local name value
  for name in "$@"; do
    value=${!name:-}
    [ -z "$value" ] && continue
    [[ "$value" =~ ^[0-9]+$ ]] || hr_die "$name must be a whole number, not $(printf '%q' "$value")"
    printf -v "$name" '%d' "$((10#$value))"
  done
}

# hr_split VALUE: HR_WORDS=(the words of VALUE, split at blanks and never globbed: a *
# stays a *). For the *_FLAGS and MODULES variables.
hr_split() { HR_WORDS=(); read -ra HR_WORDS <<<"$1" || true; }

# hr_container: CONTAINER=/path/hpc-resnet.sif runs every rank in that Apptainer (or
# Singularity) image (docs/container.md): the image's Python, TensorFlow, Horovod and
# OpenMPI, this checkout's code bound in at the same path (PYTHONPATH). The launcher stays
# on the host (srun --mpi=pmix or the site's mpirun: the hybrid model, so the site's MPI
# must be ABI-compatible with the image's OpenMPI 4.1). CONTAINER_FLAGS adds runtime
# options (e.g. "--bind /scratch" for the data and MODEL_DIR).
hr_container() {
  [ -f "$CONTAINER" ] || hr_die "CONTAINER=$CONTAINER: no such image file (apptainer build: docs/container.md)"
  CONTAINER_RUNTIME=${CONTAINER_RUNTIME:-$(command -v apptainer || command -v singularity || true)}
  [ -n "$CONTAINER_RUNTIME" ] || hr_die "CONTAINER is set but neither apptainer nor singularity is on PATH (add it to MODULES?)"
  [ "$LAUNCHER" = horovodrun ] && hr_die "ELASTIC=1 does not run with CONTAINER: horovodrun would have to start the image on each node over ssh"
  PYTHON=${CONTAINER_PYTHON:-/opt/hpc-resnet/.venv/bin/python}  # inside the image
}

hr_setup() {
  hr_check_int NP TASKS_PER_NODE CPUS_PER_TASK RESERVED_CORES INTRA_THREADS INTER_THREADS \
    HOROVOD_FUSION_THRESHOLD MIN_NP MAX_NP SLURM_JOB_NUM_NODES SLURM_NNODES \
    SLURM_NTASKS_PER_NODE SLURM_NTASKS SLURM_CPUS_ON_NODE SLURM_CPUS_PER_TASK
  # ---- where am I -------------------------------------------------------------------
  if [ -n "${SLURM_JOB_ID:-}" ]; then IN_SLURM=1; else IN_SLURM=0; fi
  ELASTIC=${ELASTIC:-0}
  [ "$ELASTIC" = 1 ] && LAUNCHER=${LAUNCHER:-horovodrun}
  if [ "$IN_SLURM" = 1 ]; then LAUNCHER=${LAUNCHER:-srun}; else LAUNCHER=${LAUNCHER:-mpirun}; fi
  case "$LAUNCHER" in srun|mpirun|none|horovodrun) ;; *) hr_die "LAUNCHER must be srun, mpirun, none or horovodrun, not '$LAUNCHER'";; esac
  if [ "$ELASTIC" = 1 ] && [ "$LAUNCHER" != horovodrun ]; then
    hr_die "ELASTIC=1 runs under horovodrun (LAUNCHER=horovodrun), not '$LAUNCHER'"
  fi
  if [ "$LAUNCHER" = horovodrun ] && [ "$IN_SLURM" = 0 ] && [ -z "${DISCOVERY_SCRIPT:-}" ]; then
    hr_die "ELASTIC=1 outside SLURM needs DISCOVERY_SCRIPT (a script printing host:slots lines)"
  fi
  if [ "$LAUNCHER" = srun ] && [ "$IN_SLURM" = 0 ]; then
    hr_die "LAUNCHER=srun needs a SLURM allocation; outside SLURM use LAUNCHER=mpirun NP=2 bash $0"
  fi

  # ---- software -----------------------------------------------------------------------
  if [ -n "${MODULES:-}" ]; then
    command -v module >/dev/null 2>&1 || hr_die "MODULES='$MODULES' set but no 'module' command"
    hr_split "$MODULES"
    module load "${HR_WORDS[@]}"
  fi
  if [ -n "${CONTAINER:-}" ]; then
    hr_container
  else
    VENV=${VENV:-$PROJECT_DIR/.venv}
    if [ -z "${PYTHON:-}" ]; then
      if [ -x "$VENV/bin/python" ]; then PYTHON=$VENV/bin/python; else PYTHON=$(command -v python3 || true); fi
    fi
    if [ -z "$PYTHON" ] || [ ! -x "$PYTHON" ]; then
      hr_die "no Python: set PYTHON or VENV (tried '$VENV/bin/python')"
    fi
    PATH=$(dirname "$PYTHON"):$PATH
  fi
  export PATH PYTHONPATH="$PROJECT_DIR${PYTHONPATH:+:$PYTHONPATH}"

  # ---- ranks and CPUs -------------------------------------------------------------------
  if [ "$IN_SLURM" = 1 ] && [ "$LAUNCHER" != none ]; then
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    TASKS_PER_NODE=${TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-2}}
    NP=${NP:-${SLURM_NTASKS:-$((NNODES * TASKS_PER_NODE))}}
    NODE_CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
    CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-$((NODE_CPUS / TASKS_PER_NODE))}}
  elif [ "$LAUNCHER" = none ]; then
    NNODES=1; NP=1; TASKS_PER_NODE=1
    CPUS_PER_TASK=${CPUS_PER_TASK:-$(nproc)}
  else  # mpirun outside SLURM: NP ranks on this machine, or on HOSTS (h1:2,h2:2)
    NP=${NP:-2}
    if [ -n "${HOSTS:-}" ]; then
      NNODES=$(tr ',' '\n' <<<"$HOSTS" | grep -c .)
      TASKS_PER_NODE=${TASKS_PER_NODE:-$(( (NP + NNODES - 1) / NNODES ))}
    else
      NNODES=1; TASKS_PER_NODE=$NP
    fi
    CPUS_PER_TASK=${CPUS_PER_TASK:-$(( $(nproc) / TASKS_PER_NODE ))}
  fi
  [ "$CPUS_PER_TASK" -ge 1 ] 2>/dev/null || CPUS_PER_TASK=1
  # 2018: intra-op threads = cores of the socket (minus some for Horovod's background
  # thread and the input pipeline on big sockets), inter-op = 2.
  RESERVED_CORES=${RESERVED_CORES:-$(( CPUS_PER_TASK >= 8 ? 1 : 0 ))}
  INTRA_THREADS=${INTRA_THREADS:-$(( CPUS_PER_TASK - RESERVED_CORES ))}
  [ "$INTRA_THREADS" -ge 1 ] || INTRA_THREADS=1
  INTER_THREADS=${INTER_THREADS:-2}
  # TensorFlow 2.21 takes its threads from --num_intra_threads (it links no OpenMP runtime);
  # OMP_NUM_THREADS keeps numpy's OpenBLAS and scikit-learn's OpenMP to the rank's CPUs.
  export OMP_NUM_THREADS=$INTRA_THREADS
  export TF_NUM_INTRAOP_THREADS=$INTRA_THREADS TF_NUM_INTEROP_THREADS=$INTER_THREADS
  export HOROVOD_FUSION_THRESHOLD=${HOROVOD_FUSION_THRESHOLD:-134217728}
  [ -n "${HOROVOD_CYCLE_TIME:-}" ] && export HOROVOD_CYCLE_TIME
  export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
  # Performance flags shared by resnet_main.py and `python -m chexnet` (flags.define_performance).
  # The 2018 --mkl/--kmp_* flags are not passed: TF 2.21 has no OpenMP runtime for them to
  # tune (docs/benchmarks.md, "The 2018 CPU flags"); resnet_main still accepts them.
  PERF_FLAGS=(--num_intra_threads="$INTRA_THREADS" --num_inter_threads="$INTER_THREADS")
}

hr_header() {
  hr_log "job ${SLURM_JOB_ID:-<no SLURM>} name ${SLURM_JOB_NAME:-$(basename "$0")} restart_count ${SLURM_RESTART_COUNT:-0} host $(hostname -s) date $(date -u +%FT%TZ)"
  hr_log "launcher $LAUNCHER nodes $NNODES ranks $NP tasks_per_node $TASKS_PER_NODE cpus_per_task $CPUS_PER_TASK intra $INTRA_THREADS inter $INTER_THREADS HOROVOD_FUSION_THRESHOLD $HOROVOD_FUSION_THRESHOLD"
  hr_log "python $PYTHON project $PROJECT_DIR${CONTAINER:+ container $CONTAINER}"
}

# hr_launch ARGS...: run ARGS (a python program and its flags) once per rank.
hr_launch() {
  local cmd=()
  case "$LAUNCHER" in
    srun)
      # srun (22.05+) does not inherit --cpus-per-task from sbatch: pass it explicitly.
      cmd=(srun --mpi="${SRUN_MPI:-pmix}" --ntasks="$NP" --ntasks-per-node="$TASKS_PER_NODE"
           --cpus-per-task="$CPUS_PER_TASK" --cpu-bind="${CPU_BIND:-sockets}"
           --kill-on-bad-exit=1 --export=ALL)
      hr_split "${SRUN_FLAGS:-}"
      cmd+=("${HR_WORDS[@]}")
      ;;
    mpirun)
      cmd=(mpirun -np "$NP" --map-by "${MPI_MAP_BY:-socket}" --bind-to "${MPI_BIND_TO:-socket}")
      [ "$(id -u)" = 0 ] && cmd+=(--allow-run-as-root)
      [ -n "${HOSTS:-}" ] && cmd+=(-H "$HOSTS")
      local v
      for v in PATH PYTHONPATH LD_LIBRARY_PATH OMP_NUM_THREADS TF_NUM_INTRAOP_THREADS \
               TF_NUM_INTEROP_THREADS TF_CPP_MIN_LOG_LEVEL HOROVOD_FUSION_THRESHOLD \
               HOROVOD_CYCLE_TIME; do
        [ -n "${!v:-}" ] && cmd+=(-x "$v")
      done
      hr_split "${MPIRUN_FLAGS:-}"
      cmd+=("${HR_WORDS[@]}")
      ;;
    horovodrun)
      # Elastic: horovodrun starts the ranks (over ssh) on the hosts the discovery script
      # lists, re-forms the job when one fails or comes back, from MIN_NP to MAX_NP ranks.
      export ELASTIC_SLOTS=$TASKS_PER_NODE
      cmd=(horovodrun --gloo -np "$NP" --min-np "${MIN_NP:-$TASKS_PER_NODE}"
           --max-np "${MAX_NP:-$NP}" --slots-per-host "$TASKS_PER_NODE"
           --host-discovery-script "${DISCOVERY_SCRIPT:-$PROJECT_DIR/slurm/elastic_discover.sh}")
      [ -n "${HOROVOD_NIC:-}" ] && cmd+=(--network-interface "$HOROVOD_NIC")
      hr_split "${HOROVODRUN_FLAGS:-}"
      cmd+=("${HR_WORDS[@]}")
      ;;
    none) ;;
  esac
  if [ -n "${CONTAINER:-}" ]; then
    hr_split "${CONTAINER_FLAGS:-}"
    cmd+=("$CONTAINER_RUNTIME" exec --bind "$PROJECT_DIR" "${HR_WORDS[@]}" "$CONTAINER")
  fi
  cmd+=("$PYTHON" "$@")
  [ "$LAUNCHER" = horovodrun ] && cmd+=(--elastic)
  hr_log "command: ${cmd[*]}"
  # Preemption: SLURM signals the batch shell (USR1 ahead of the time limit, from --signal
  # in the batch scripts; TERM on scancel or preemption). Forward USR1 to the launcher, which
  # passes it to every rank (srun and mpirun forward USR1; TERM would make mpirun kill the
  # ranks at once): the ranks stop at one agreed step, rank 0 checkpoints there, they exit
  # 75. After the time-limit notice the job requeues itself and resumes at that step; after
  # TERM, SLURM decides (a preemption with PreemptMode=REQUEUE requeues, scancel cancels).
  local rc=0 child
  HR_SIGNAL=
  "${cmd[@]}" &
  child=$!
  trap 'HR_SIGNAL=USR1; hr_log "USR1: asking the ranks to checkpoint and stop"; kill -USR1 "$child" 2>/dev/null' USR1
  trap 'HR_SIGNAL=TERM; hr_log "TERM: asking the ranks to checkpoint and stop"; kill -USR1 "$child" 2>/dev/null' TERM
  while :; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break  # wait returned early for a trapped signal
  done
  trap - USR1 TERM
  hr_log "finished rc=$rc job ${SLURM_JOB_ID:-<no SLURM>} date $(date -u +%FT%TZ)"
  if [ -n "${SLURM_JOB_ID:-}" ] && [ "${REQUEUE_ON_PREEMPT:-1}" = 1 ] && {
       [ "$HR_SIGNAL" = USR1 ] || { [ "$rc" = "$HR_PREEMPTED" ] && [ "$HR_SIGNAL" != TERM ]; }; }; then
    hr_log "stopped with a checkpoint: requeueing job $SLURM_JOB_ID (it resumes there)"
    scontrol requeue "$SLURM_JOB_ID" && return 0
  fi
  return "$rc"
}
