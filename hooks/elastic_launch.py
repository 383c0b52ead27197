"""Whether this process is a worker of an elastic horovodrun job, and what such a job
refuses; no TensorFlow here, so a mistake is reported before anything heavy starts."""
import os

from hooks.errors import ConfigError

ELASTIC_ENV = "HOROVOD_ELASTIC"  # set by horovodrun in the workers of an elastic job
CYCLE_TIME_ENV = "HOROVOD_CYCLE_TIME"


def launched_elastic(environ=None) -> bool:
    """Whether this process is a worker of an elastic horovodrun job."""
    env = os.environ if environ is None else environ
    return env.get(ELASTIC_ENV, "") not in ("", "0")


def check_launch(elastic: bool, cycle_time_ms: float | None = None, environ=None) -> None:
    """ConfigError for an elastic launch without --elastic (a worker that joins would run
    the start-up collectives while the others wait in the elastic sync, and hang), or with
    a fixed Horovod cycle time: Horovod 0.28.1 re-initialises in the same process after a
    reset, and with a fixed cycle time its parameter manager then writes the default cycle
    time (1) into the tensor-fusion threshold (1 MB instead of 128: a re-initialised rank
    fuses differently from a new one and Gloo aborts), or, with HOROVOD_FUSION_THRESHOLD
    fixed too, crashes."""
    env = os.environ if environ is None else environ
    if not launched_elastic(env):
        return
    if not elastic:
        raise ConfigError("horovodrun started an elastic job (--min-np/--max-np/"
                          "--host-discovery-script): pass --elastic")
    if cycle_time_ms is not None or env.get(CYCLE_TIME_ENV):
        given = (f"--cycle_time_ms={cycle_time_ms:g}" if cycle_time_ms is not None
                 else f"{CYCLE_TIME_ENV}={env[CYCLE_TIME_ENV]}")
        raise ConfigError(f"{given} cannot be used in an elastic job: Horovod 0.28.1 "
                          "loses its tensor-fusion setting (or crashes) when it "
                          "re-initialises after a reset with a fixed cycle time; elastic "
                          "jobs run Horovod's default 1 ms cycle (docs/elastic.md)")
