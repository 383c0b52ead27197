"""Process-level CPU settings that must happen before TensorFlow starts its thread pools."""
import os
from typing import Dict, MutableMapping, Optional

import keras
import tensorflow as tf


def cpu_environment(mkl: bool, num_intra_threads: int, kmp_blocktime: int,
                    kmp_affinity: str, kmp_settings: bool) -> Dict[str, str]:
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


def configure(perf, environ: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Apply a PerformanceConfig: environment, TF thread pools, Keras dtype policy.

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
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if perf.precision == "bfloat16" else "float32")
    return env
