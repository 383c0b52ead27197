"""What every command-line entry point does the same way: quiet start-up, then
check -> start Horovod -> run, with a user's mistake reported as one line.

Imports nothing heavy at load, so `quiet_startup()` runs before TensorFlow is imported.
"""
import os
import sys
from collections.abc import Callable

VERBOSE_ENV = "HPC_RESNET_VERBOSE"


def verbose(environ=None) -> bool:
    """Whether the user asked for TensorFlow's start-up lines (HPC_RESNET_VERBOSE=1)."""
    env = os.environ if environ is None else environ
    return env.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_startup(environ=None) -> None:
    """Hide TensorFlow's C++ start-up lines (absl pre-init warning, oneDNN notice, CPU
    feature guard) unless HPC_RESNET_VERBOSE=1: TF_CPP_MIN_LOG_LEVEL=2 unless the user set
    it (TF's own INFO and WARNING lines), and a filter on fd 2 for the lines TF 2.21
    prints whatever that level says (hooks/stderr_filter.py says why). Call from a
    program's main, before TensorFlow is imported; everything else on stderr passes.
    With `environ` (a test's dict) only that dict is changed."""
    env = os.environ if environ is None else environ
    if verbose(env):
        return
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if environ is None:  # the real process, not a test's dict
        from hooks import stderr_filter

        stderr_filter.install()


def start(define_flags: Callable, main: Callable) -> None:
    """A program's start: quiet TensorFlow's start-up lines (before it is imported),
    define the flags, then let absl parse them and call `main(argv)`."""
    from absl import app

    quiet_startup()
    define_flags()
    app.run(main)


def run_entry(prog: str, perf, dist, config, validate: Callable, run: Callable) -> None:
    """Run the cheap checks (before TensorFlow is imported: a mistake is reported in a
    second), configure threads (before TF starts its pools), start Horovod and the stall
    watchdog, then `run(config, context)`.

    Exit status: 0 done; 1 a `UserError` (bad flags or files, a diverged run), one line, no
    traceback; 75 preempted (SIGTERM/SIGUSR1: a checkpoint was written, rerun to resume);
    86 a stalled rank (hooks.distributed.watchdog). Anything else is a bug and keeps its
    traceback."""
    from hooks.distributed import elastic_launch
    from hooks.errors import UserError

    try:
        validate(config)
        elastic_launch.check_launch(getattr(config, "elastic", False), dist.cycle_time_ms)
    except UserError as err:
        sys.exit(f"{prog}: error: {err}")
    from hooks import runtime
    from hooks.distributed import horovod_glue, watchdog
    from hooks.state import faults

    notice = runtime.configure(perf)
    try:
        context = horovod_glue.init(dist.fusion_threshold_mb, dist.cycle_time_ms)
        if notice and context.is_chief:
            print(f"{prog}: note: {notice}", file=sys.stderr, flush=True)
        model_dir = getattr(config, "model_dir", None)
        # Elastic: no collective before the first sync (a joining worker runs this while
        # the others wait there); the loop gives the watchdog the host names after it.
        hosts = None if getattr(config, "elastic", False) else horovod_glue.hostnames(context)
        watchdog.start(getattr(config, "stall_timeout_s", 0), context.rank, context.size,
                       hosts, os.path.join(model_dir, ".stall") if model_dir else None)
        run(config, context)
    except UserError as err:
        sys.exit(f"{prog}: error: {err}")
    except faults.Preempted as err:
        print(f"{prog}: preempted: {err} (exit {faults.PREEMPTED_EXIT_CODE})", flush=True)
        sys.exit(faults.PREEMPTED_EXIT_CODE)
    finally:
        watchdog.stop()
