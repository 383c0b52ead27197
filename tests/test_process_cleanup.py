"""The launch helpers of tests/conftest.py leave no process behind, also one that left their
session with setsid (as Horovod starts each worker) and was re-parented to init. Each check
reads /proc itself, not the helpers' own bookkeeping."""
import os
import subprocess

import pytest

from tests import conftest
from tests.conftest import kill_group, run_cmd, start_group, wait_until

pytestmark = pytest.mark.slow  # starts subprocesses


def _tree(pidfile, then):
    """sh starting a grandchild in a new session (it writes its pid, then sleeps), waiting
    until the pid is written, then running `then`."""
    return ["sh", "-c", f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 600' & "
                        f"while [ ! -s {pidfile} ]; do sleep 0.05; done; {then}"]


def _stat(pid):
    """(state, session id) of a live process from /proc/PID/stat; None if gone or a zombie."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (fields[0], int(fields[3]))


def _with_env(value):
    """Live pids whose environment has a variable set to `value`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(kv.endswith(b"=" + value.encode()) for kv in env) and _stat(pid):
            found.append(int(pid))
    return found


def _grandchild(pidfile):
    pid = int(pidfile.read_text())
    assert _stat(pid) and _stat(pid)[1] == pid, "the grandchild did not start its own session"
    return pid


def test_run_cmd_timeout_kills_a_grandchild_that_left_the_session(tmp_path):
    pidfile = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_cmd(_tree(pidfile, "exec sleep 600"), timeout=10)
    # the grandchild was running when the time ran out (the pid file came first)
    pid = int(pidfile.read_text())
    assert _stat(pid) is None
    assert _with_env(os.environ[conftest.TOKEN_VAR]) == []


def test_run_cmd_kills_what_its_command_left_running(tmp_path):
    pidfile = tmp_path / "pid"
    run_cmd(_tree(pidfile, "exit 0"))
    assert _stat(int(pidfile.read_text())) is None
    assert _with_env(os.environ[conftest.TOKEN_VAR]) == []


def test_kill_group_kills_a_grandchild_that_left_the_session(tmp_path):
    pidfile = tmp_path / "pid"
    proc = start_group(_tree(pidfile, "exec sleep 600"))
    try:
        wait_until(proc, lambda: pidfile.exists() and pidfile.read_text().strip(),
                   "the grandchild's pid", seconds=60)
        pid = _grandchild(pidfile)
    finally:
        kill_group(proc)
    assert _stat(pid) is None and _stat(proc.pid) is None
    assert _with_env(os.environ[conftest.TOKEN_VAR]) == []


def test_a_process_left_by_a_test_is_found_and_killed(tmp_path):
    """What the autouse fixture does after each test: a process started by hand (no helper),
    in its own session, carrying a token, is named and killed."""
    token = f"{os.environ[conftest.TOKEN_VAR]}-leak"
    env = dict(os.environ, **{conftest.TOKEN_VAR: token})
    leak = subprocess.Popen(["sleep", "600"], env=env, start_new_session=True)
    try:
        assert _with_env(token) == [leak.pid]
        left = conftest.leftover_processes(token, grace=0.5)
        assert left == [(leak.pid, "sleep 600")]
        assert leak.wait(timeout=30) == -9
        assert _with_env(token) == []
    finally:
        leak.kill()
        leak.wait()
