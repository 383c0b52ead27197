"""Drop TensorFlow's known C++ start-up lines from a process's stderr (fd 2).

Why a filter on fd 2 and not a setting: TensorFlow 2.21 prints these lines while its
shared libraries load (static initialisers, before any Python code can run after the
import), through absl logging before absl::InitializeLog(). Measured on 2.21:
TF_CPP_MIN_LOG_LEVEL=2 or 3 hides the CPU feature-guard lines but not the absl pre-init
warning and the oneDNN notice (each printed twice: two libraries carry their own absl);
absl reads no environment variable (its --minloglevel/--stderrthreshold are C++ flags that
nothing parses here) and TF_CPP_MAX_VLOG_LEVEL only concerns VLOG. TF_ENABLE_ONEDNN_OPTS=0
silences the notice only by turning oneDNN off, which changes speed and results.

Why a separate process and not a reader thread: a thread dies with its process, so what
a crashing process wrote last (a fatal C++ check, a faulthandler dump) would sit unread
in the pipe and be lost. The filter process holds the only copy of the original stderr
and reads until every writer has closed the pipe (the process and anything it started),
whatever way they end; it ignores the signals a launcher or a terminal sends to a whole
job (SIGINT, SIGTERM, SIGHUP, SIGUSR1) so that it outlives the process it serves.

Only whole lines that match one of PATTERNS exactly are dropped; everything else (Python
tracebacks, warnings, TF errors, partial lines) passes through unchanged.

    python -I -S hooks/stderr_filter.py      (what `install` starts; stdin -> stdout)
    python -m hooks.stderr_filter horovodrun -np 2 ...   (a launcher, its stderr filtered)
"""
import atexit
import os
import re
import select
import signal
import subprocess
import sys

# The absl prefix of a C++ log line before InitializeLog: "I0000 00:00:1796607117.125126
# 15691 port.cc:153] " (severity, MMDD, time: seconds since 1970 before InitializeLog, thread
# id, file:line).
_HEAD = rb"[IWEF]\d{4} \d\d:\d\d:\d+(?:\.\d+)?\s+\d+ "
PATTERNS = tuple(re.compile(p) for p in (
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    rb"STDERR",
    _HEAD + rb"port\.cc:\d+\] oneDNN custom operations are on\. You may see slightly "
    rb"different numerical results due to floating-point round-off errors from different "
    rb"computation orders\. To turn them off, set the environment variable "
    rb"`TF_ENABLE_ONEDNN_OPTS=0`\.",
    _HEAD + rb"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use "
    rb"available CPU instructions in performance-critical operations\.",
    rb"To enable the following instructions: [A-Z0-9_ ]+, in other operations, rebuild "
    rb"TensorFlow with the appropriate compiler flags\.",
))
# A line without its newline is passed on after this long without more input, so a
# prompt or a progress fragment is not held back.
FRAGMENT_WAIT_S = 0.05
# How long a program that exits waits for the filter to pass its last lines on.
DRAIN_WAIT_S = 5.0
_IGNORED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
_filter = None  # the running filter process (a reference keeps it from being collected)


def is_startup_line(line: bytes) -> bool:
    """Whether `line` (without its newline) is one of TensorFlow's known start-up lines."""
    line = line.rstrip(b"\r")
    return any(p.fullmatch(line) for p in PATTERNS)


def _write_all(fd: int, data: bytes) -> None:
    """Write everything, or drop it if the reader is gone (keep draining the pipe so the
    writer never blocks)."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass


def run(read_fd: int, write_fd: int) -> None:
    """Copy read_fd to write_fd until end of file, leaving out start-up lines."""
    pending = b""
    while True:
        if pending and not select.select([read_fd], [], [], FRAGMENT_WAIT_S)[0]:
            _write_all(write_fd, pending)  # a fragment with no more input behind it
            pending = b""
            continue
        chunk = os.read(read_fd, 65536)
        if not chunk:
            _write_all(write_fd, pending)
            return
        *lines, pending = (pending + chunk).split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not is_startup_line(line))
        _write_all(write_fd, kept)


def _start(read_end: int, fd: int) -> subprocess.Popen:
    """The filter process, reading `read_end` and writing to `fd`."""
    signals = {getattr(signal, name) for name in _IGNORED_SIGNALS}
    # Blocked across the start: the filter inherits the mask, so a Ctrl-C that arrives
    # before it has set its signals to "ignore" does not end it.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        return subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__)],
                                stdin=read_end, stdout=fd, stderr=fd, close_fds=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def install(fd: int = 2) -> bool:
    """Route `fd` through a filter process; returns False (and changes nothing) where that
    cannot be done (no usable fd, no interpreter to start). Call before importing
    TensorFlow; the filter ends by itself when the last writer of `fd` is gone."""
    global _filter
    if _filter is not None:
        return True
    try:
        saved = os.dup(fd)  # not inherited by children (Python's default)
        read_end, write_end = os.pipe()
    except OSError:
        return False
    try:
        _filter = _start(read_end, fd)
    except OSError:
        for end in (saved, write_end):
            os.close(end)
        return False
    finally:
        os.close(read_end)
    sys.stderr.flush()
    os.dup2(write_end, fd)
    os.close(write_end)
    atexit.register(_drain, fd, saved, os.getpid())
    return True


def _drain(fd: int, saved: int, installer: int) -> None:
    """At a normal exit (after Python printed any traceback or sys.exit message): send
    what comes later straight to the original stderr and give the filter DRAIN_WAIT_S to
    pass on what it holds, so that the program's last lines come before whatever runs next
    (a shell prompt, a script's next command). A child still writing keeps it running."""
    if os.getpid() != installer:  # a forked child inherited the registration
        return
    try:
        sys.stderr.flush()
        os.dup2(saved, fd)
        _filter.wait(timeout=DRAIN_WAIT_S)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass


def main(argv=None) -> None:
    """No arguments: be the filter (stdin to stdout). A command: run it (exec) with its
    stderr filtered, unless HPC_RESNET_VERBOSE=1; for launchers that import TensorFlow
    themselves (horovodrun does, to check its build)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        from hooks import entry  # only here: the filter itself runs isolated (-I -S)

        if not entry.verbose():
            install()
        try:
            os.execvp(argv[0], argv)
        except OSError as err:
            print(f"stderr_filter: cannot run {argv[0]}: {err.strerror}", file=sys.stderr)
            sys.exit(127)
    signals = {getattr(signal, name) for name in _IGNORED_SIGNALS}
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # blocked by install()
    run(sys.stdin.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    main()
