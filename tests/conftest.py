"""Shared test helpers: launching real multi-process jobs, making sure none of their
processes outlives its test, and locating sample data."""
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The sample data `make test` needs (imagenet/, chestxray14/); HPC_RESNET_SHARED_DATA points
# the tests elsewhere.
SHARED_DATA = Path(os.environ.get("HPC_RESNET_SHARED_DATA")
                   or ROOT / ".." / "shared" / "data").resolve()
BIN = Path(sys.executable).parent

# Quiet TF's C++ logs in child processes; keep their stderr for failure messages.
CHILD_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT),
             "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
             "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
             "OMPI_MCA_rmaps_base_oversubscribe": "1"}


# What hooks.distributed.horovod_glue.init() writes into os.environ when an in-process test starts
# Horovod: a child must not inherit it (its own flags and defaults decide).
SET_BY_INIT = ("HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "HOROVOD_GLOO_TIMEOUT_SECONDS")
_ENV_AT_START = {k: os.environ[k] for k in SET_BY_INIT if k in os.environ}


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in SET_BY_INIT}
    env.update(_ENV_AT_START)  # the user's own settings do reach children
    env.update(CHILD_ENV)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cmd(cmd, timeout=300, check=True, **env):
    """Run a command with the project's child environment; fail with its output. On its
    exit or timeout (TimeoutExpired) every process it started is killed, also those that
    left its session (Horovod starts each worker with setsid)."""
    # Output to files, not pipes: a left-behind process holding a pipe open would block
    # reading it to the end; the command is done when its own process exits.
    with (tempfile.TemporaryFile("w+", errors="replace") as out,
          tempfile.TemporaryFile("w+", errors="replace") as err):
        proc, launch = _launch(cmd, env, stdout=out, stderr=err)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_tree(proc, launch)
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    if timed_out:
        raise subprocess.TimeoutExpired(proc.args, timeout, proc.stdout, proc.stderr)
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
    """Start a launcher in its own session (`kill_group` ends all it started); output to
    `output` (an open file: nothing blocks on a full pipe) or a pipe."""
    proc, proc.launch_token = _launch(cmd, {}, stdout=output or subprocess.PIPE,
                                      stderr=subprocess.STDOUT)
    return proc


def kill_group(proc):
    """SIGKILL every process `start_group` started: its session and whatever carries its
    launch token (workers that called setsid, stopped ones too)."""
    kill_tree(proc, proc.launch_token)


# ---------------------------------------------------------------- no process outlives a test
# Every process a test starts inherits TOKEN_VAR (set in os.environ for the test, so also
# multiprocessing workers and plain subprocess calls) and, through run_cmd/start_group,
# LAUNCH_VAR for that one launch. /proc/PID/environ keeps them through setsid, double forks
# and re-parenting to init, where a process-group or parent walk loses the process.
TOKEN_VAR, LAUNCH_VAR = "HPC_RESNET_TEST_TOKEN", "HPC_RESNET_TEST_LAUNCH"
_SERIAL = itertools.count()


def _launch(cmd, env, **pipes):
    """Popen in a new session with a fresh launch token; (proc, token)."""
    token = f"{os.environ.get(TOKEN_VAR, f'hpcr-{os.getpid()}')}-launch{next(_SERIAL)}"
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, text=True,
                            env=child_env(**env, **{LAUNCH_VAR: token}),
                            start_new_session=True, **pipes)
    return proc, token


def marked_pids(name, token):
    """Live processes whose environment holds name=token (zombies have none)."""
    needle = f"\0{name}={token}\0".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue  # gone, or a kernel thread
        if needle in env and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def _descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def kill_pids(pids, timeout=30):
    """SIGKILL `pids` (psutil.Process or int); wait until they are gone or zombies."""
    procs = []
    for p in pids:
        try:
            procs.append(p if isinstance(p, psutil.Process) else psutil.Process(p))
            procs[-1].kill()
        except psutil.Error:
            continue
    alive = [p for p in procs if _running(p)]
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _running(p)]
    return alive


def _running(proc):
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_tree(proc, token):
    """SIGKILL a launch's whole tree: its descendants (walked before any kill, so nothing
    is re-parented away first) and every process carrying its launch token; reap it."""
    for _ in range(10):  # a dying launcher may still fork: repeat until nothing is found
        victims = {p.pid: p for p in _descendants(proc.pid)}
        victims.update({pid: pid for pid in marked_pids(LAUNCH_VAR, token)})
        if proc.poll() is None:
            victims[proc.pid] = proc.pid
        if not victims:
            break
        left = kill_pids(victims.values())
        assert not left, f"could not kill {left}"
    proc.wait(timeout=30)


# Helpers this pytest process starts for itself, the first time a test needs them, and that
# serve it until it exits: multiprocessing's resource tracker, the Open MPI singleton's
# daemon of an in-process Horovod. Not a test's leftovers.
SESSION_HELPERS = ("multiprocessing.resource_tracker", "--singleton-died-pipe")


def leftover_processes(token, grace=10.0):
    """Processes still carrying the test token `token` after `grace` seconds to exit by
    themselves, then SIGKILLed: [(pid, command line)] (empty: the test cleaned up)."""
    deadline = time.monotonic() + grace
    while True:
        left = []
        for pid in marked_pids(TOKEN_VAR, token):
            try:
                p = psutil.Process(pid)
                cmdline = " ".join(p.cmdline())
                if p.ppid() == os.getpid() and any(h in cmdline for h in SESSION_HELPERS):
                    continue
                left.append((p, cmdline))
            except psutil.Error:
                continue
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    kill_pids([p for p, _ in left])
    return [(p.pid, cmdline) for p, cmdline in left]


def _session_token_value() -> str:
    return f"hpcr-{os.getpid()}-session"


@contextlib.contextmanager
def owned_by_session():
    """Processes started inside belong to a module fixture, not to the test (a cluster
    node the test brings back): they carry the session's token, so the test's check
    leaves them to the fixture's teardown (and the session's check)."""
    test_token = os.environ[TOKEN_VAR]
    os.environ[TOKEN_VAR] = _session_token_value()
    try:
        yield
    finally:
        os.environ[TOKEN_VAR] = test_token


@pytest.fixture(scope="session", autouse=True)
def _session_token():
    """Processes started outside a test (module fixtures: clusters, pre-trained models)
    carry this token; none may be left when the session ends."""
    token = os.environ[TOKEN_VAR] = _session_token_value()
    yield
    left = leftover_processes(token)
    if left:
        pytest.fail(f"processes left running at the end of the session (killed): {left}",
                    pytrace=False)


@pytest.fixture(autouse=True)
def _no_process_left(_session_token):
    """Each test's processes carry its own token; any still running after the test (and
    its fixtures) ended is killed and fails the test."""
    outer = os.environ[TOKEN_VAR]
    token = os.environ[TOKEN_VAR] = f"hpcr-{os.getpid()}-test{next(_SERIAL)}"
    try:
        yield
    finally:
        os.environ[TOKEN_VAR] = outer
    left = leftover_processes(token)
    if left:
        pytest.fail(f"processes left running by this test (killed): {left}", pytrace=False)


def wait_until(proc, ready, what, seconds=480):
    """Until `ready()`; fails naming `what` if the job `proc` ends first or the bound passes
    (480 s: a loaded 2-core machine (load 10) took over 240 s to reach a first checkpoint)."""
    deadline = time.monotonic() + seconds
    while not ready():
        if proc.poll() is not None:
            kill_group(proc)  # so that nothing left holds its output open
            output = proc.stdout.read()[-5000:] if proc.stdout else ""
            pytest.fail(f"the job ended (rc {proc.returncode}) before {what}\n{output}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {seconds} s")
        time.sleep(0.1)


def wait_for_checkpoint(proc, model_dir, seconds=480):
    """Until model_dir holds a checkpoint; fails if the job ends or time runs out."""
    wait_until(proc, lambda: any(model_dir.glob("ckpt-*")), f"checkpoint in {model_dir}",
               seconds)


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


def shared_data(*parts):
    """SHARED_DATA/parts, or the test fails naming the missing path: `make test` runs every
    test, and a missing sample is a broken set-up, not a reason to skip."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"shared sample data missing: {path} (the README's data; set "
                    f"HPC_RESNET_SHARED_DATA to the folder holding imagenet/ and "
                    f"chestxray14/)", pytrace=False)
    return path


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
