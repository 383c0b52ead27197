"""What a run records so that it can be reproduced and plotted (rank 0, in --model_dir):

- `flags.txt`: the run's resolved flags in absl `--flagfile` form (`flags.flagfile_text`),
  written when training starts; `--flagfile=MODEL_DIR/flags.txt --model_dir=ELSEWHERE`
  trains the same run again.
- `environment(...)`: the versions (Python, TensorFlow, Keras, numpy, oneDNN, Horovod with
  its patch level and controller, the MPI library), the project's git commit, the CPU
  model and flags, the world size, the launcher and the nodes; it goes into every
  checkpoint's state.json and into summary.json.
- `metrics.jsonl`: one JSON object per progress line and per evaluation, appended with
  one write each (a reader never sees half a line), never through a planted link.
"""
import ctypes
import json
import os
import platform
import socket
import subprocess
import time

from hooks.state import safe_files

FLAGS_FILE, METRICS_FILE = "flags.txt", "metrics.jsonl"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT_ENV = "HPC_RESNET_GIT_COMMIT"  # set by a container build that has no .git


def write_flags(model_dir: str, text: str, context) -> None:
    """Rank 0 writes `text` (flagfile form) to MODEL_DIR/flags.txt, atomically."""
    from hooks.distributed import horovod_glue

    def write(path):
        with open(path, "w") as f:
            f.write(text)

    horovod_glue.write_atomically(os.path.join(model_dir, FLAGS_FILE), write, context)


class MetricsLog:
    """Appends records to MODEL_DIR/metrics.jsonl, on rank 0 only (asked at each write:
    an elastic reset can make another process rank 0)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict, context) -> None:
        if not context.is_chief:
            return
        line = json.dumps({"time": round(time.time(), 3), **record}, sort_keys=True,
                          default=float) + "\n"
        fd = safe_files.open_for_write(self.path, append=True)
        try:
            os.write(fd, line.encode())  # O_APPEND + one write: lines never interleave
        finally:
            os.close(fd)


def environment(context, hosts: list[str] | None) -> dict:
    """What produced this run; `hosts` is every rank's host name (None: this one only)."""
    import keras
    import numpy
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": numpy.__version__,
            "onednn": _onednn(), "horovod": _horovod(), "mpi": mpi_library_version(),
            "git_commit": git_commit(), "cpu": cpu(), "world_size": context.size,
            "launcher": launcher(), "nodes": sorted(set(hosts or [socket.gethostname()]))}


def _horovod() -> dict:
    import horovod
    import horovod.tensorflow as hvd

    try:
        from horovod import _hpc_resnet_patches as patches
        level = patches.PATCH_LEVEL
    except ImportError:
        level = "unpatched"
    controller = "mpi" if hvd.mpi_enabled() else "gloo" if hvd.gloo_enabled() else "none"
    return {"version": horovod.__version__, "patch_level": level, "controller": controller}


def _loaded_library(fragment: str) -> str | None:
    """The path of a shared library this process has loaded whose name holds `fragment`."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if fragment in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


def mpi_library_version() -> str:
    """MPI_Get_library_version of the MPI library Horovod loaded (any MPI-3 library answers
    it before MPI_Init too), first line; "none" when no MPI library is loaded."""
    path = _loaded_library("libmpi.so")
    if path is None:
        return "none"
    try:
        lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
        buf, length = ctypes.create_string_buffer(8192), ctypes.c_int(0)  # MPICH: 8192
        if lib.MPI_Get_library_version(buf, ctypes.byref(length)) != 0:
            return f"unknown ({path})"
        return buf.value.decode(errors="replace").strip().splitlines()[0]
    except (OSError, AttributeError, IndexError):
        return f"unknown ({path})"


def _onednn() -> str:
    """oneDNN's version from TensorFlow's library when it exports dnnl_version, else
    whether TensorFlow's oneDNN ops are on."""
    enabled = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") not in ("0", "false", "False")
    for fragment in ("_pywrap_tensorflow_internal", "libtensorflow_framework"):
        path = _loaded_library(fragment)
        if path is None:
            continue
        try:
            version = ctypes.CDLL(path).dnnl_version
        except (OSError, AttributeError):
            continue
        version.restype = ctypes.POINTER(ctypes.c_int * 3)
        major, minor, patch = version().contents
        return f"{major}.{minor}.{patch}" + ("" if enabled else " (disabled)")
    return "enabled" if enabled else "disabled"


def git_commit(root: str = PROJECT_ROOT) -> str:
    """The project's commit (+"-dirty" with uncommitted changes), $HPC_RESNET_GIT_COMMIT
    (an image built without .git), or "unknown"."""
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=30, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(COMMIT_ENV) or "unknown"


def cpu(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The first processor's model name and flags (what lscpu shows)."""
    found = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags") and key not in found:
                    found[key] = value.strip()
                if len(found) == 2:
                    break
    except OSError:
        pass
    return {"model": found.get("model name", platform.processor() or "unknown"),
            "flags": found.get("flags", "").split(), "logical_cpus": os.cpu_count()}


def launcher(environ=None) -> str:
    """Which launcher started this process, from the variables each one sets."""
    env = os.environ if environ is None else environ
    if "HOROVOD_GLOO_RENDEZVOUS_ADDR" in env:
        return "horovodrun (gloo)"
    if "OMPI_COMM_WORLD_SIZE" in env:
        return "mpirun (Open MPI)"
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return "srun"
    if "PMI_SIZE" in env or "PMI_RANK" in env:
        return "mpiexec (PMI)"
    return "single process"
