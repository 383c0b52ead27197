"""Process-level CPU settings that must happen before TensorFlow starts its thread pools."""
import os

import keras
import tensorflow as tf

# The 2018 Intel-optimised command line tuned the OpenMP runtime of an MKL build of TF 1.x.
# TF 2.21's wheels link no OpenMP runtime (ldd/nm of libtensorflow_framework and
# libtensorflow_cc) and run oneDNN, which is on by default on x86, on TensorFlow's own
# intra-op (Eigen) thread pool: these change nothing (bench/cpu_flags.py measures it).
OPENMP_ONLY_ENV = ("KMP_BLOCKTIME", "KMP_AFFINITY", "KMP_SETTINGS")
WHY_IDLE = ("TensorFlow 2.21 links no OpenMP runtime; oneDNN is on by default and runs on "
            "TensorFlow's intra-op pool, which --num_intra_threads sets")


def _thread_count(value: str | None) -> int:
    """A positive thread count from an environment value ("4"; OpenMP's nested "4,2" gives
    its outer level), else 0."""
    first = (value or "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def intra_op_threads(num_intra_threads: int, environ) -> tuple[int, str | None]:
    """The intra-op threads to set (0: leave TF's choice) and a note on where they came from.

    OMP_NUM_THREADS counts when neither --num_intra_threads nor TensorFlow's own
    TF_NUM_INTRAOP_THREADS is given: it was the threads each MKL-DNN op used in 2018, which
    is what the intra-op pool size is now that oneDNN runs on that pool."""
    omp = _thread_count(environ.get("OMP_NUM_THREADS"))
    acting = num_intra_threads or _thread_count(environ.get("TF_NUM_INTRAOP_THREADS"))
    if acting:
        if omp and omp != acting:
            return num_intra_threads, (f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']} changes "
                                       f"nothing ({acting} intra-op threads are set)")
        return num_intra_threads, None
    if omp:
        return omp, f"OMP_NUM_THREADS={omp} taken as --num_intra_threads={omp}"
    return 0, None


def legacy_cpu_notice(perf, environ=None) -> str | None:
    """One line on the 2018 CPU settings given (flags of `perf`, OpenMP variables) that
    change nothing on TF 2.21 and on OMP_NUM_THREADS's mapping; None if there are none."""
    env = os.environ if environ is None else environ
    default = type(perf)()
    idle = [f"--{name}={getattr(perf, name)}" for name in
            ("mkl", "kmp_blocktime", "kmp_affinity", "kmp_settings")
            if getattr(perf, name) != getattr(default, name)]
    idle += [f"{var}={env[var]}" for var in OPENMP_ONLY_ENV if var in env]
    _, threads_note = intra_op_threads(perf.num_intra_threads, env)
    parts = [f"{' '.join(idle)} change{'s' if len(idle) == 1 else ''} nothing ({WHY_IDLE})"
             ] if idle else []
    if threads_note:
        parts.append(threads_note)
    return "; ".join(parts) or None


def configure(perf, environ=None) -> str | None:
    """Apply a PerformanceConfig to TensorFlow's thread pools (--num_intra_threads, else
    OMP_NUM_THREADS: `intra_op_threads`; --num_inter_threads). Must run before the first
    TensorFlow op; returns `legacy_cpu_notice` for the caller to print once per job."""
    env = os.environ if environ is None else environ
    intra, _ = intra_op_threads(perf.num_intra_threads, env)
    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if perf.num_inter_threads:
            tf.config.threading.set_inter_op_parallelism_threads(perf.num_inter_threads)
    except RuntimeError as err:  # TF already running: a programming error, say which
        raise RuntimeError("threading flags must be applied before TensorFlow runs any op"
                           ) from err
    return legacy_cpu_notice(perf, env)


def set_precision(precision: str) -> str:
    """Keras's global dtype policy for "float32" or "bfloat16"; returns the policy name.

    Library `run()` functions call it before building their model, so the config they get
    is the only route by which precision reaches the code."""
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16"}.get(precision)
    if policy is None:
        raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
    keras.mixed_precision.set_global_policy(policy)
    return policy


def _cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The `flags` of /proc/cpuinfo (or of `cpuinfo`); empty where there is none."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    return {word for line in cpuinfo.splitlines() if line.startswith("flags")
            for word in line.split(":", 1)[1].split()}


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether an x86 CPU has bf16 arithmetic (AVX512_BF16 or AMX-BF16)."""
    return bool(_cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def precision_warning(precision: str, cpuinfo: str | None = None) -> str | None:
    """A warning for bfloat16 on an x86 CPU without bf16 instructions: TensorFlow then
    emulates it and training runs several times slower than float32 (9x measured on
    AVX2, docs/benchmarks.md). None otherwise (and on CPUs that are not x86)."""
    flags = _cpu_flags(cpuinfo)
    if precision != "bfloat16" or "sse2" not in flags or native_bf16(cpuinfo):
        return None
    return ("--precision=bfloat16 on a CPU without bf16 instructions (no avx512_bf16 or "
            "amx_bf16 in /proc/cpuinfo): training will be several times slower than "
            "float32 (9x measured on AVX2, docs/benchmarks.md)")
