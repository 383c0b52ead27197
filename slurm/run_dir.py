"""The cluster tools' folder, files and pid files, safe against other local users (issue 20).

The clusters run as root and keep everything in one run folder. A folder someone else made
(or can write to) would let them plant slurm.conf, keys or links that root then follows, so:

* `check_run_dir` accepts a run folder only when it and every existing folder above it are
  real folders (no symlink) that only we (or root) can write; it creates a missing one.
* `ensure_dir` / `check_planted` refuse a sub-folder or file name that is a link or not ours.
* `write_file` writes a new file under a private temporary name (O_EXCL|O_NOFOLLOW) and
  renames it in: a link planted under the final name is replaced, never followed.
* `record_pid` / `trusted_pid`: a pid file is believed only while the process still has the
  program name and start time (field 22 of /proc/PID/stat) recorded when we started it.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path


class ClusterError(RuntimeError):
    """The cluster could not be brought up; the message says why (with log tails)."""


class RunDirError(ClusterError):
    """A run folder, a file in it or a pid file is not safe to use; one line says why."""


# Every path of the run folder is written into slurm.conf and sshd_config, which cannot quote.
SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+@%,:=-]+$")


def _why_unsafe(info: os.stat_result, me: int, is_run_dir: bool, sticky_ok: bool) -> str:
    if stat.S_ISLNK(info.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    owners = (me,) if is_run_dir else (me, 0)
    if info.st_uid not in owners:
        return f"is owned by uid {info.st_uid}, not by uid {me}" + ("" if is_run_dir else
                                                                     " or root")
    if not is_run_dir and not info.st_mode & 0o001:
        return (f"is not searchable by others (mode {stat.S_IMODE(info.st_mode):04o}), "
                "which munged requires above its socket")
    writable = info.st_mode & 0o022
    if writable and not (sticky_ok and not is_run_dir and info.st_mode & stat.S_ISVTX):
        return f"is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return ""


def check_run_dir(path, sticky_ok: bool = True, create: bool = True) -> Path:
    """The absolute run folder, checked (lstat of every existing component), created when
    missing (if `create`) and given mode 0711 (munged wants its socket's folders searchable);
    RunDirError naming the path and why otherwise. `sticky_ok`: a folder above it may be
    world-writable when sticky (as /tmp), where others cannot rename or delete our entries
    (sshd's StrictModes does not accept that)."""
    path = Path(os.path.abspath(path))  # not resolve(): a symlink component must be seen
    if not SAFE_PATH.match(str(path)):
        raise RunDirError(f"run folder {path}: only letters, digits and ._-+@%,:= may appear "
                          "in its path (it is written into slurm.conf and sshd_config)")
    me = os.geteuid()
    for component in [*reversed(path.parents), path]:
        try:
            info = os.lstat(component)
        except FileNotFoundError:
            if component != path or not create:
                raise RunDirError(f"run folder {path}: {component} does not exist") from None
            os.mkdir(path, 0o700)
            info = os.lstat(path)
        why = _why_unsafe(info, me, component == path, sticky_ok)
        if why:
            raise RunDirError(f"run folder {path}: {component} {why}; use a folder only you "
                              "can write")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o711)
    finally:
        os.close(fd)
    return path


def check_planted(path: Path, folder: bool = False) -> bool:
    """Whether `path` exists; RunDirError when it is a symlink, of the wrong kind or not
    ours (someone planted it: we neither follow nor reuse it)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    kind_ok = stat.S_ISDIR(info.st_mode) if folder else stat.S_ISREG(info.st_mode)
    if stat.S_ISLNK(info.st_mode) or not kind_ok or info.st_uid != os.geteuid():
        what = "a symlink" if stat.S_ISLNK(info.st_mode) else (
            "not ours" if kind_ok else f"not a {'folder' if folder else 'regular file'}")
        raise RunDirError(f"{path} is {what}: not used; remove it")
    return True


def ensure_dir(path: Path, mode: int) -> Path:
    """`path` as a real folder of ours with `mode` (made when missing, never through a link)."""
    if not check_planted(path, folder=True):
        os.mkdir(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


def write_file(path: Path, data, mode: int = 0o644) -> Path:
    """Write `data` (str or bytes) to `path`: created exclusively under a temporary name with
    `mode`, then renamed over the name. A planted link or foreign file there is refused."""
    check_planted(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def open_append(path: Path):
    """`path` opened for appending (created 0600), never through a link."""
    check_planted(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "ab")


# ---------------------------------------------------------------------------- pid files
def proc_identity(pid: int):
    """(program name, start time in clock ticks) of process `pid`, or None when it is gone.
    The name is argv[0]'s base name; daemons that retitle themselves ("sshd: /usr/sbin/sshd
    ...") keep it as their first word."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    fields = raw.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 onwards
    if fields[0] == "Z":
        return None  # a zombie child of ours counts as gone
    first = cmdline.split(b"\0", 1)[0].decode(errors="replace").split()
    name = os.path.basename(first[0]).rstrip(":") if first else ""
    return name, int(fields[19])  # field 22 of /proc/PID/stat: start time


def record_pid(record: Path, pid: int) -> bool:
    """Write 'PID NAME START' of the process we just started beside its pid file."""
    ident = proc_identity(pid)
    if ident is None:
        return False
    write_file(record, f"{pid} {ident[0]} {ident[1]}\n", mode=0o600)
    return True


def trusted_pid(pidfile: Path, record: Path, program: str):
    """The pid in `pidfile` when that process is the `program` we started (its name and
    start time match `record`); None for a missing, stale or foreign pid."""
    try:
        pid = int(pidfile.read_text().split()[0])
        rec_pid, rec_name, rec_start = record.read_text().split()
    except (OSError, ValueError, IndexError):
        return None
    ident = proc_identity(pid)
    if ident is None or str(pid) != rec_pid or ident != (rec_name, int(rec_start)):
        return None
    return pid if rec_name == program else None
