"""Our Horovod build's patches (scripts/horovod-patches/, docs/horovod.md), each checked
against the behaviour it fixes:
- 0002: a Horovod re-initialised in the same process (hvd.shutdown + hvd.init, as every
  elastic reset does) keeps a cycle time and fusion threshold fixed by the environment;
- 0003: while a horovodrun job runs, nothing horovodrun listens on is bound to a wildcard
  address (0.0.0.0 or ::);
- 0004: horovodrun ends on SIGTERM/SIGINT, ending its workers, also when an elastic job
  waits for slots."""
import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import (
    BIN,
    LAUNCH_VAR,
    kill_group,
    marked_pids,
    python_cmd,
    run_cmd,
    start_group,
    wait_until,
)
from tests.workers import hvd_params

MIB = 1024 * 1024
DEFAULT_THRESHOLD = 128 * MIB  # Horovod's default HOROVOD_FUSION_THRESHOLD
CYCLE_MS = 50  # far above the default 1 ms, so a lost setting shows in the timing


def _fused_responses(threshold):
    """Byte sizes of the fused responses for hvd_params' group, by Horovod's documented rule:
    consecutive tensors are fused while their total stays at most the threshold."""
    sizes, current = [], 0
    for _ in range(hvd_params.TENSORS):
        if current and current + hvd_params.TENSOR_BYTES > threshold:
            sizes.append(current)
            current = 0
        current += hvd_params.TENSOR_BYTES
    return sizes + [current]


def _per_init(stdout):
    """[(cycle_ms, [fused response sizes])] per init, from hvd_params' output and Horovod's
    trace log (the tiny allreduces' 4-byte responses left out)."""
    inits = []
    for line in stdout.splitlines():
        if line.startswith("INIT "):
            inits.append([None, []])
        elif line.startswith("PARAMS "):
            inits[-1][0] = json.loads(line[len("PARAMS "):])["cycle_ms"]
        elif m := re.search(r"Created response of size (\d+)", line):
            if int(m.group(1)) >= hvd_params.TENSOR_BYTES:
                inits[-1][1].append(int(m.group(1)))
    return [tuple(i) for i in inits]


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [
    {"HOROVOD_CYCLE_TIME": str(CYCLE_MS)},  # unpatched: the threshold became 1 MB
    {"HOROVOD_CYCLE_TIME": str(CYCLE_MS), "HOROVOD_FUSION_THRESHOLD": str(4 * MIB)},  # crashed
    {"HOROVOD_FUSION_THRESHOLD": str(4 * MIB)},
], ids=["cycle", "cycle+fusion", "fusion"])
def test_reinitialised_horovod_keeps_fixed_cycle_time_and_fusion_threshold(fixed):
    inits = 3
    proc = run_cmd(python_cmd("-m", "tests.workers.hvd_params", str(inits)),
                   HOROVOD_LOG_LEVEL="trace", **fixed)
    results = _per_init(proc.stdout)
    print(f"\n{fixed}: (median ms per tiny allreduce, fused responses) per init: {results}")
    assert len(results) == inits
    expected = _fused_responses(int(fixed.get("HOROVOD_FUSION_THRESHOLD", DEFAULT_THRESHOLD)))
    assert expected != _fused_responses(1 * MIB)  # the test tells the unpatched value apart
    for cycle_ms, fused in results:
        assert fused == expected, results
        # An op waits for the next cycle: about CYCLE_MS when it is fixed, about 1 ms (the
        # default) plus the op's own cost otherwise.
        if "HOROVOD_CYCLE_TIME" in fixed:
            assert cycle_ms >= 0.8 * CYCLE_MS, results
        else:
            assert cycle_ms < 0.8 * CYCLE_MS, results


# ------------------------------------------------------------------ horovodrun's sockets
def _socket_inodes(pid):
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    return inodes


def _address(hex_addr):
    """An address of /proc/net/tcp{,6}: 32-bit words in the host's (little-endian) order."""
    raw = b"".join(bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, len(hex_addr), 8))
    return ipaddress.ip_address(raw)


def listening(pid):
    """[(address, port)] of the TCP sockets process `pid` listens on, from the kernel's
    tables (/proc/net/tcp and tcp6, state 0A = LISTEN) matched by the inodes of its fds."""
    inodes, found = _socket_inodes(pid), []
    for table in ("tcp", "tcp6"):
        for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                addr, port = fields[1].split(":")
                found.append((_address(addr), int(port, 16)))
    return found


def _worker_env(token, name):
    """The values of `name` in the environments of this launch's processes."""
    values = set()
    for pid in marked_pids(LAUNCH_VAR, token):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        values.update(kv.split(b"=", 1)[1].decode() for kv in env
                      if kv.startswith(name.encode() + b"="))
    return values


def _hold_cmd(out_dir, *launcher):
    return [BIN / "horovodrun", "--gloo", *launcher,
            sys.executable, "-m", "tests.workers.hvd_hold", out_dir]


def _discovery_script(tmp_path, listing):
    """A host-discovery script printing `listing`; it logs each call to discovered.log."""
    script, log = tmp_path / "discover.sh", tmp_path / "discovered.log"
    script.write_text(f"#!/bin/sh\nprintf '{listing}'\necho called >> {log}\n")
    script.chmod(0o755)
    return script, log


def _elastic_cmd(script, out_dir, np_):
    return [BIN / "horovodrun", "--gloo", "-np", np_, "--min-np", np_, "--max-np", np_,
            "--network-interface", "lo", "--host-discovery-script", script,
            "--log-level", "INFO",
            sys.executable, "-m", "tests.workers.hvd_hold", out_dir, "elastic"]


def _ready(out_dir, prefix, ranks):
    return lambda: all((out_dir / f"{prefix}-{r}").exists() for r in ranks)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("elastic", [False, True], ids=["static", "elastic"])
def test_horovodrun_listens_on_no_wildcard_address(tmp_path, elastic):
    if elastic:
        script, _ = _discovery_script(tmp_path, "localhost:2\\n")
        cmd, prefix = _elastic_cmd(script, tmp_path, 2), "step"
    else:
        cmd, prefix = _hold_cmd(tmp_path, "-np", "2"), "ready"
    with open(tmp_path / "log.txt", "w") as log:
        proc = start_group(cmd, log)
        try:
            wait_until(proc, _ready(tmp_path, prefix, (0, 1)), "both workers started")
            sockets = listening(proc.pid)
            told = (_worker_env(proc.launch_token, "HOROVOD_GLOO_RENDEZVOUS_ADDR"),
                    _worker_env(proc.launch_token, "HOROVOD_GLOO_RENDEZVOUS_PORT"))
        finally:
            kill_group(proc)
    print(f"\nhorovodrun listens on {sockets}; workers told {told}")
    assert sockets, "horovodrun listens on nothing: the rendezvous server was not found"
    assert not [s for s in sockets if s[0].is_unspecified], sockets
    # The rendezvous server is bound to exactly the address and port the workers use.
    (addr,), (port,) = told
    assert (ipaddress.ip_address(addr), int(port)) in sockets


# ------------------------------------------------------------------ horovodrun on signals
def _end_by_signal(proc, sig, workers, bound=120):
    """Send `sig` to horovodrun; it must exit within `bound` s and its workers be gone."""
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        pytest.fail(f"horovodrun still runs {bound} s after {sig.name}")
    left = [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    deadline = time.monotonic() + 60  # its SIGTERM to a worker, then SIGKILL after 5 s
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"workers left after horovodrun ended: {left}"
    assert proc.returncode != 0


def _worker_procs(token):
    procs = []
    for pid in marked_pids(LAUNCH_VAR, token):
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.cmdline()[1:3] == ["-m", "tests.workers.hvd_hold"]:  # not sh, horovodrun
                procs.append(p)
    return procs


@pytest.mark.slow
@pytest.mark.distributed
def test_horovodrun_ends_its_running_workers_on_sigterm(tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        proc = start_group(_hold_cmd(tmp_path, "-np", "2"), log)
        try:
            wait_until(proc, _ready(tmp_path, "ready", (0, 1)), "both workers started")
            _end_by_signal(proc, signal.SIGTERM, _worker_procs(proc.launch_token))
        finally:
            kill_group(proc)


@pytest.mark.slow
@pytest.mark.distributed
def test_elastic_horovodrun_waiting_for_hosts_at_start_ends_on_sigterm(tmp_path):
    script, calls = _discovery_script(tmp_path, "")  # no host at all
    with open(tmp_path / "log.txt", "w") as log:
        proc = start_group(_elastic_cmd(script, tmp_path, 2), log)
        try:
            wait_until(proc, lambda: calls.exists() and len(calls.read_text().split()) >= 2,
                       "the driver asking for hosts twice")
            _end_by_signal(proc, signal.SIGTERM, [])
        finally:
            kill_group(proc)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_elastic_horovodrun_waiting_for_slots_after_a_loss_ends_on_signal(tmp_path, sig):
    # Two hosts of one slot each, 2 ranks needed: when the worker on one is killed, that host
    # is blacklisted and the driver waits (--elastic-timeout, 600 s) for a second slot.
    script, _ = _discovery_script(tmp_path, "localhost:1\\n127.0.0.1:1\\n")
    log_path = tmp_path / "log.txt"
    waits = lambda: log_path.read_text().count("wait for available slots")  # noqa: E731
    with open(log_path, "w") as log:
        proc = start_group(_elastic_cmd(script, tmp_path, 2), log)
        try:
            wait_until(proc, _ready(tmp_path, "step", (0, 1)), "both workers stepping")
            workers = _worker_procs(proc.launch_token)
            ranks = {p: _rank(p) for p in workers}
            victim = next(p for p, r in ranks.items() if r == 1)
            victim.kill()
            wait_until(proc, lambda: waits() >= 2, "the driver waiting for slots again")
            _end_by_signal(proc, sig, [p for p in workers if p != victim])
        finally:
            kill_group(proc)


def _rank(proc):
    return int(proc.environ()["HOROVOD_RANK"])
