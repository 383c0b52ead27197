"""Whether this process is a worker of an elastic horovodrun job, and what such a job
refuses; no TensorFlow here, so a mistake is reported before anything heavy starts."""
import importlib.metadata
import os

from hooks.errors import ConfigError

ELASTIC_ENV = "HOROVOD_ELASTIC"  # set by horovodrun in the workers of an elastic job
CYCLE_TIME_ENV = "HOROVOD_CYCLE_TIME"
# Our Horovod patch that keeps a fixed cycle time through the re-init of an elastic reset.
REINIT_PATCH = "0002-parameter-manager-reinit.patch"


def horovod_patches() -> str:
    """The patch list scripts/build_horovod.sh wrote into the installed Horovod ('' for a
    Horovod built otherwise), read without importing Horovod."""
    try:
        path = importlib.metadata.distribution("horovod").locate_file(
            "horovod/_hpc_resnet_patches.py")
        return path.read_text()
    except (importlib.metadata.PackageNotFoundError, OSError):
        return ""


def reinit_keeps_cycle_time() -> bool:
    """Whether the installed Horovod keeps a fixed cycle time through an elastic reset
    (docs/horovod.md, patch 0002)."""
    return REINIT_PATCH in horovod_patches()


def launched_elastic(environ=None) -> bool:
    """Whether this process is a worker of an elastic horovodrun job."""
    env = os.environ if environ is None else environ
    return env.get(ELASTIC_ENV, "") not in ("", "0")


def check_launch(elastic: bool, cycle_time_ms: float | None = None, environ=None,
                 reinit_safe: bool | None = None) -> None:
    """ConfigError for an elastic launch without --elastic (a worker that joins would run
    the start-up collectives while the others wait in the elastic sync, and hang), or with
    a fixed Horovod cycle time on a Horovod without our patch 0002 (`reinit_safe`, default:
    read from the installed Horovod): unpatched 0.28.1 re-initialises in the same process
    after a reset and its parameter manager then writes the default cycle time (1) into
    the tensor-fusion threshold (1 MB instead of 128: a re-initialised rank fuses
    differently from a new one and Gloo aborts), or, with HOROVOD_FUSION_THRESHOLD fixed
    too, crashes."""
    env = os.environ if environ is None else environ
    if not launched_elastic(env):
        return
    if not elastic:
        raise ConfigError("horovodrun started an elastic job (--min-np/--max-np/"
                          "--host-discovery-script): pass --elastic")
    if cycle_time_ms is None and not env.get(CYCLE_TIME_ENV):
        return
    if reinit_safe is None:
        reinit_safe = reinit_keeps_cycle_time()
    if not reinit_safe:
        given = (f"--cycle_time_ms={cycle_time_ms:g}" if cycle_time_ms is not None
                 else f"{CYCLE_TIME_ENV}={env[CYCLE_TIME_ENV]}")
        raise ConfigError(f"{given} cannot be used in an elastic job with this Horovod: "
                          "it lacks our patch " + REINIT_PATCH + " and loses its "
                          "tensor-fusion setting (or crashes) when it re-initialises after "
                          "a reset; rebuild it with scripts/build_horovod.sh "
                          "(docs/horovod.md)")
