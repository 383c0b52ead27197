"""Shared test helpers: launching real multi-process jobs and locating sample data."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
BIN = Path(sys.executable).parent

# Quiet TF's C++ logs in child processes; keep their stderr for failure messages.
CHILD_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT),
             "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
             "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
             "OMPI_MCA_rmaps_base_oversubscribe": "1"}


# What hooks.horovod_glue.init() writes into os.environ when an in-process test starts
# Horovod: a child must not inherit it (an elastic job refuses a fixed cycle time).
SET_BY_INIT = ("HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "HOROVOD_GLOO_TIMEOUT_SECONDS")
_ENV_AT_START = {k: os.environ[k] for k in SET_BY_INIT if k in os.environ}


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in SET_BY_INIT}
    env.update(_ENV_AT_START)  # the user's own settings do reach children
    env.update(CHILD_ENV)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cmd(cmd, timeout=300, check=True, **env):
    """Run a command with the project's child environment; fail with its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def python_cmd(*args):
    return [sys.executable, *args]


def horovodrun_cmd(np_, *args):
    return [BIN / "horovodrun", "-np", np_, "--gloo", sys.executable, *args]


def mpirun_cmd(np_, *args):
    passthrough = []
    for var in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL", "PATH"):
        passthrough += ["-x", var]
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", np_, *passthrough,
            "--bind-to", "none", sys.executable, *args]


def start_group(cmd, output=None):
    """Start a launcher in its own process group (so `kill_group` ends all it started);
    output to `output` (an open file: nothing blocks on a full pipe) or a pipe."""
    return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=child_env(),
                            stdout=output or subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill_group(proc):
    """SIGKILL a process group started by `start_group` (stopped members too)."""
    try:
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for_checkpoint(proc, model_dir, seconds=480):
    """Until model_dir holds a checkpoint; fails if the job ends or time runs out."""
    # 480 s: a loaded 2-core machine (load 10) took over 240 s to reach the first one
    deadline = time.time() + seconds
    while not list(model_dir.glob("ckpt-*")):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "job ended"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.2)


def rank_pids(program, model_dir):
    """{rank: pid} of the `program` processes writing to model_dir (the rank their launcher
    gave them at start)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            if program not in cmdline or str(model_dir) not in cmdline:
                continue
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ", "rb").read()
                       .decode(errors="replace").split("\0") if "=" in kv)
        except OSError:
            continue
        rank = env.get("HOROVOD_RANK", env.get("OMPI_COMM_WORLD_RANK"))
        if rank is not None and "python" in cmdline.split("\0")[0]:
            found[int(rank)] = int(pid)
    return found


def pytest_collection_modifyitems(items):
    """Tests that start launchers or clusters are slow (`make test-fast` leaves them out)."""
    for item in items:
        if any(item.get_closest_marker(m) for m in ("distributed", "slurm", "multinode")):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tfrecords(tmp_path_factory):
    """TFRecords of 3 generated classes x 3 images (40 px, labels 1..3): train in 2 shards,
    validation in 1."""
    from imagenet import build_tfrecords, sample_images

    root = tmp_path_factory.mktemp("tiny_tfrecords")
    images, synsets = sample_images.generate(str(root / "gen"), num_classes=3, per_class=3,
                                             size=40)
    for split, shards in (("train", 2), ("validation", 1)):
        build_tfrecords.build(images, str(root / "records"), split, synsets, shards,
                              log=lambda *a, **k: None)
    return root / "records"
