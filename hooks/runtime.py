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
