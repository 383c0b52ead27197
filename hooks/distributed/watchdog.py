"""A per-rank stall watchdog: a job must never hang.

A rank that is stopped (SIGSTOP, a stuck node, a dead NFS mount) leaves the others blocked in
a collective forever under MPI (Gloo gives up after a fixed timeout, with a traceback). Each
rank runs a daemon thread; the training loop calls `beat()` when it makes progress. When no
beat comes for `timeout_s`, the thread says what it was waiting for, tries to find out which
ranks are stalled, and ends the process with `STALL_EXIT_CODE`; the launcher (horovodrun,
mpirun, srun) then ends the job.

Naming the stalled rank: a stopped process cannot speak, but the others can. A rank whose
watchdog fires writes `<stall_dir>/rank-<r>`; after a short grace period, the ranks that
wrote nothing are the stalled ones (stall_dir is on the shared model_dir, as a cluster's
checkpoints are). Without a stall_dir the message names the phase that stalled.

Long checkpoint writes by rank 0 must not look like a stall to the waiting ranks: while it
writes, rank 0 rewrites `<stall_dir>/chief-alive` with a new count (from the watchdog thread,
so a stopped rank 0 stops), and the others keep waiting as long as they saw the count change
within `timeout_s` by their own clock (no two nodes' clocks are compared).

All timing reads `clock` (time.monotonic): a test drives it and calls `check()` itself.
"""
import itertools
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence

from hooks.state.safe_files import is_real_dir, read_text, write_text

STALL_EXIT_CODE = 86
CHIEF_ALIVE = "chief-alive"
_GRACE_S = 5.0
# Start-up and the first step of training or evaluation (graph tracing) may take minutes on
# a loaded node without being a stall: they get this much longer.
SLOW_PHASE_S = 300.0


def _make_real_dir(path: str) -> None:
    """Create `path` if needed; OSError when it is a link (someone else's, in a shared
    model_dir: files written through it would land outside)."""
    os.makedirs(path, exist_ok=True)
    if not is_real_dir(path):
        raise OSError(f"{path} is not a folder (a symlink?)")


class Watchdog:
    """Ends this process when `beat()` is not called for `timeout_s` seconds."""

    def __init__(self, timeout_s: float, rank: int = 0, size: int = 1,
                 hosts: Sequence[str] | None = None, stall_dir: str | None = None,
                 exit=os._exit, stream=None, poll_s: float | None = None,
                 grace_s: float = _GRACE_S, clock=time.monotonic):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s, self.rank, self.size = float(timeout_s), rank, size
        self.hosts = list(hosts) if hosts else [socket.gethostname()] * size
        self.stall_dir, self.grace_s = stall_dir, grace_s
        self._exit, self._stream = exit, stream
        self._poll_s = poll_s if poll_s is not None else min(1.0, self.timeout_s / 10)
        self._clock = clock
        self._lock = threading.Lock()
        self._last = clock()
        self._step, self._phase = 0, "start-up"
        self._limit = self.timeout_s + SLOW_PHASE_S
        self._writing = False  # rank 0 is writing a checkpoint
        self._waiting_for_chief = False
        self._touched, self._touches = float("-inf"), itertools.count(1)  # rank 0's writes
        self._chief_count, self._chief_seen = None, float("-inf")  # others: what they saw
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self.fired = False

    # ------------------------------------------------------------ called by the loop
    def start(self) -> "Watchdog":
        # The folder is made only when a file is written into it: a run refused at its
        # first checks must leave no model_dir behind.
        if self.stall_dir and os.path.islink(self.stall_dir):
            self.stall_dir = None  # planted in a shared model_dir: never write through it
        if self.stall_dir and self.rank == 0 and is_real_dir(self.stall_dir):
            try:  # reports of an earlier run must not count as answers
                for name in os.listdir(self.stall_dir):
                    os.remove(os.path.join(self.stall_dir, name))
            except OSError:
                self.stall_dir = None  # a read-only model_dir: name the phase only
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beat(self, step: int | None = None, phase: str | None = None,
             slow: bool = False) -> None:
        """Progress: restart the clock (and say where we are, for the message). `slow`:
        what comes next may legitimately take SLOW_PHASE_S longer (graph tracing)."""
        with self._lock:
            self._last = self._clock()
            self._limit = self.timeout_s + (SLOW_PHASE_S if slow else 0.0)
            if step is not None:
                self._step = step
            if phase is not None:
                self._phase = phase

    def chief_writing(self, writing: bool) -> None:
        """Rank 0: a checkpoint write starts (True) or ends (False)."""
        self._writing = writing
        self._touch_chief_alive() if writing else None
        self.beat()

    def waiting_for_chief(self, waiting: bool) -> None:
        """Other ranks: waiting for rank 0's checkpoint write (a fresh chief-alive file
        extends the wait)."""
        self._waiting_for_chief = waiting
        self.beat()

    def world_changed(self, rank: int, size: int, hosts: Sequence[str]) -> None:
        """An elastic reset gave this process another rank in a world of another size: name
        ranks and hosts of the new world from now on (workers that Horovod removed are not
        stalls: they are gone from `hosts`)."""
        with self._lock:
            self.rank, self.size, self.hosts = rank, size, list(hosts)
        self.beat(phase="the first step after an elastic reset (graph tracing)", slow=True)

    # ------------------------------------------------------------ the thread
    def _touch_chief_alive(self) -> None:
        if not self.stall_dir:
            return
        count = f"{os.getpid()} {next(self._touches)}\n"  # new content at each touch
        try:
            _make_real_dir(self.stall_dir)
            # a planted link: ELOOP, not followed
            write_text(os.path.join(self.stall_dir, CHIEF_ALIVE), count)
        except OSError:
            pass  # a full disk must not kill the writer from here; the write itself will fail

    def _chief_alive(self, now: float) -> bool:
        """Whether rank 0's chief-alive count changed within timeout_s before `now`."""
        if not self.stall_dir:
            return False
        try:
            count = read_text(os.path.join(self.stall_dir, CHIEF_ALIVE))  # no link followed
        except OSError:
            count = None
        if count is not None and count != self._chief_count:
            self._chief_count, self._chief_seen = count, now
        return now - self._chief_seen < self.timeout_s

    def check(self) -> bool:
        """One look (the thread's, every poll_s): touch chief-alive while writing, watch
        it while waiting, fire after `timeout_s` without progress. True once fired."""
        now = self._clock()
        if self._writing and now - self._touched > self.timeout_s / 4:
            self._touch_chief_alive()
            self._touched = now
        chief_alive = self._waiting_for_chief and self._chief_alive(now)
        with self._lock:
            idle, limit = now - self._last, self._limit
        if idle < limit or self._writing or chief_alive:
            return False  # progress, or rank 0 is alive and writing: keep waiting
        self._fire(idle)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            if self.check():
                return

    def _stalled_ranks(self) -> list | None:
        """Ranks that did not report within the grace period (None: cannot tell)."""
        if not self.stall_dir or self.size == 1:
            return None
        try:
            _make_real_dir(self.stall_dir)
            write_text(os.path.join(self.stall_dir, f"rank-{self.rank}"),
                       f"{self._step} {time.time()}\n")
            time.sleep(self.grace_s)
            present = {int(n.split("-")[1]) for n in os.listdir(self.stall_dir)
                       if n.startswith("rank-") and n.split("-")[1].isdigit()}
        except OSError:
            return None
        return [r for r in range(self.size) if r not in present]

    def _fire(self, idle: float) -> None:
        self.fired = True
        where = (f"rank {self.rank} of {self.size} ({self.hosts[self.rank]}): no progress for "
                 f"{idle:.0f} s (--stall_timeout_s={self.timeout_s:g}) at step {self._step}, "
                 f"in {self._phase}")
        stalled = self._stalled_ranks()
        if stalled:
            names = ", ".join(f"{r} ({self.hosts[r]})" for r in stalled)
            where += f"; stalled rank(s): {names}"
        elif stalled == []:
            where += "; every rank reported: all are waiting (a collective mismatch?)"
        print(f"stall: {where}; ending the job (exit {STALL_EXIT_CODE})",
              file=self._stream or sys.stderr, flush=True)
        self._exit(STALL_EXIT_CODE)


# ---------------------------------------------------------------- the process's watchdog
# One per process, started by the entry point; the loop and evaluation report progress
# through these functions, which do nothing when no watchdog runs (tests, libraries).
_current: Watchdog | None = None


def start(timeout_s: float, rank: int = 0, size: int = 1, hosts=None,
          stall_dir: str | None = None) -> Watchdog | None:
    """Start the process's watchdog (timeout_s <= 0: none)."""
    global _current
    stop()
    if timeout_s and timeout_s > 0:
        _current = Watchdog(timeout_s, rank, size, hosts, stall_dir).start()
    return _current


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None


def beat(step: int | None = None, phase: str | None = None, slow: bool = False) -> None:
    if _current is not None:
        _current.beat(step, phase, slow)


def world_changed(rank: int, size: int, hosts: Sequence[str]) -> None:
    if _current is not None:
        _current.world_changed(rank, size, hosts)


def chief_writing(writing: bool) -> None:
    if _current is not None:
        _current.chief_writing(writing)


def waiting_for_chief(waiting: bool) -> None:
    if _current is not None:
        _current.waiting_for_chief(waiting)
