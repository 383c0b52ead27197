"""What every command-line entry point does the same way: quiet start-up, then
check -> start Horovod -> run, with a user's mistake reported as one line.

Imports nothing heavy at load, so `quiet_startup()` runs before TensorFlow is imported.
"""
import os
import sys
from collections.abc import Callable

VERBOSE_ENV = "HPC_RESNET_VERBOSE"


def quiet_startup(environ=None) -> None:
    """Hide TensorFlow's C++ start-up lines (oneDNN notice, CPU feature guard, absl
    pre-init warning) unless the user set TF_CPP_MIN_LOG_LEVEL or HPC_RESNET_VERBOSE=1.
    Call before TensorFlow is imported."""
    env = os.environ if environ is None else environ
    if env.get(VERBOSE_ENV, "") not in ("", "0"):
        return
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_entry(prog: str, perf, dist, config, validate: Callable, run: Callable) -> None:
    """Configure threads (before TF starts its pools), run the cheap checks, start Horovod,
    then `run(config, context)`. A `UserError` ends the process with one line, no
    traceback; any other exception is a bug and keeps its traceback."""
    from hooks import horovod_glue, runtime
    from hooks.errors import UserError

    runtime.configure(perf)
    try:
        validate(config)
        context = horovod_glue.init(dist.fusion_threshold_mb, dist.cycle_time_ms)
        run(config, context)
    except UserError as err:
        sys.exit(f"{prog}: error: {err}")
