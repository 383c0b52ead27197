"""Process-level CPU settings that must happen before TensorFlow starts its thread pools."""
import os
from collections.abc import MutableMapping

import keras
import tensorflow as tf


def cpu_environment(mkl: bool, num_intra_threads: int, kmp_blocktime: int,
                    kmp_affinity: str, kmp_settings: bool) -> dict[str, str]:
    """The OpenMP/oneDNN variables the 2018 Intel-optimised command line relied on."""
    if not mkl:
        return {}
    env = {
        "TF_ENABLE_ONEDNN_OPTS": "1",
        "KMP_BLOCKTIME": str(kmp_blocktime),
        "KMP_AFFINITY": kmp_affinity,
        "KMP_SETTINGS": "1" if kmp_settings else "0",
    }
    if num_intra_threads > 0:
        env["OMP_NUM_THREADS"] = str(num_intra_threads)
    return env


def configure(perf, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Apply a PerformanceConfig: OpenMP/oneDNN environment and TF thread pools.

    Must run before the first TensorFlow op; returns the environment it set (for the log).
    """
    environ = os.environ if environ is None else environ
    env = cpu_environment(perf.mkl, perf.num_intra_threads, perf.kmp_blocktime,
                          perf.kmp_affinity, perf.kmp_settings)
    environ.update(env)
    try:
        if perf.num_intra_threads:
            tf.config.threading.set_intra_op_parallelism_threads(perf.num_intra_threads)
        if perf.num_inter_threads:
            tf.config.threading.set_inter_op_parallelism_threads(perf.num_inter_threads)
    except RuntimeError as err:  # TF already running: a programming error, say which
        raise RuntimeError("threading flags must be applied before TensorFlow runs any op"
                           ) from err
    return env


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
