"""The on-disk image cache behind ``--cache=DIR``.

Each pipeline (training, or one evaluated split, per image size, view and rank layout)
caches its decoded, resized images in a private subfolder whose name ends in a
fingerprint of what it holds: every file (absolute path, size, modification time), its
label row and weight, and the settings that shape the cached tensors. A cache is read
back only for that same data; anything else gets a new folder.

    DIR/                                          0700, this user's, no one else may write
      eval-test-224px-whole-rank0-of-1-<16 hex>/  0700
        key       0600  the full sha256 fingerprint, checked before the cache is read
        lock      0600  lockf: shared while a process uses the folder, exclusive to tidy it
        images.*  tf.data's files: images.index + images.data-* once the first pass is
                  complete; images_0.lockfile + partial files while it is written (the
                  umask's mode inside the 0700 folder; 0600 from the process's exit)
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time

import numpy as np

from hooks.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a cache holds changes (decoding, resizing, element layout)
PREFIX = "images"  # tf.data's file prefix inside a slot folder
# Slot folder -> fd of its lock file, share-locked for the rest of the process. POSIX
# locks belong to the process: another fd on the same file, closed, would drop them.
_held: dict[str, int] = {}


def check_root(root: str) -> None:
    """ConfigError unless `root` is absent or a real folder of this user that no one else
    can write (cheap: for config validation before anything starts)."""
    try:
        _check_private(root, os.lstat(root))
    except FileNotFoundError:
        pass


def _check_private(path: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"--cache: {path} is a symbolic link; give the folder itself")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"--cache: {path} is not a folder")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"--cache: {path} belongs to uid {st.st_uid}, not to you (uid "
                          f"{os.geteuid()}); cached images are only read from your own folder")
    if st.st_mode & 0o022:
        raise ConfigError(f"--cache: {path} is writable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):o}); use a private folder")


def _private_dir(path: str) -> None:
    """Make `path` a 0700 folder, or accept an existing one that passes `_check_private`
    (then tightened to 0700: nobody else could have put anything in it)."""
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    st = os.lstat(path)
    _check_private(path, st)
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def fingerprint(paths, labels, weights, **settings) -> str:
    """sha256 of what a cache of these entries holds: each file's absolute path, size and
    modification time ("" for a blank slot), the label rows, the weights, `settings`."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode())
    for path in paths:
        if path:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            h.update(b"\0\n")
    for array in (labels, weights):
        array = np.ascontiguousarray(array, np.float32)
        h.update(repr(array.shape).encode() + array.tobytes())
    return h.hexdigest()


def open_slot(root: str, name: str, key: str) -> str:
    """The tf.data cache prefix for pipeline `name` (e.g. eval-test-224px-whole-rank0-of-1)
    holding data with fingerprint `key`. Creates DIR and the slot folder private; removes
    what a killed run left half-written; refuses (DataError) a slot another running process
    is still writing; deletes this pipeline's caches of other data that nobody uses."""
    root = os.path.abspath(root)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    _private_dir(root)
    slot = os.path.join(root, f"{name}-{key[:16]}")
    _private_dir(slot)
    if slot not in _held:  # this process's own slots: tf.data deals with its iterators
        _held[slot] = _take(slot, key)
    _remove_other_data(root, name)
    return os.path.join(slot, PREFIX)


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.lockf(fd, kind | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


def _wait_shared(fd: int, slot: str, seconds: float = 120.0) -> None:
    """Shared lock on `fd`: others hold the exclusive one only to tidy or delete a slot
    (well under a second), so a long wait means a stopped process."""
    deadline = time.monotonic() + seconds
    while not _try_lock(fd, fcntl.LOCK_SH):
        if time.monotonic() > deadline:
            raise DataError(f"--cache: {slot} stayed locked by another process for "
                            f"{seconds:.0f} s; is one stopped?")
        time.sleep(0.05)


def _take(slot: str, key: str) -> int:
    """Lock `slot` shared for this process and leave it complete or empty (key written)."""
    lock = os.path.join(slot, "lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        alone = _try_lock(fd, fcntl.LOCK_EX)
        if not alone:
            _wait_shared(fd, slot)
        if not _same_file(fd, lock):
            raise DataError(f"--cache: {slot} was removed while it was opened; run again")
        if not _complete(slot, key):
            if not alone:
                raise DataError(f"--cache: {slot} is not complete and another running "
                                "process holds it (writing it); wait for that process or "
                                "give another --cache folder")
            # Nobody else uses the folder: an incomplete cache was left by a killed run
            # (tf.data's own lockfile would stop every later run), a foreign key is stale.
            if _clear(slot):
                log.warning("--cache: removed an incomplete or foreign cache in %s; "
                            "rebuilding it", slot)
            _write_key(slot, key)
        fcntl.lockf(fd, fcntl.LOCK_SH)  # from exclusive: POSIX converts atomically
        _tighten(slot)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


def _complete(slot: str, key: str) -> bool:
    try:
        fd = os.open(os.path.join(slot, "key"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    with os.fdopen(fd) as f:
        written = f.read()
    return written == key and os.path.isfile(os.path.join(slot, PREFIX + ".index"))


def _clear(slot: str) -> bool:
    """Delete everything in `slot` but its lock; whether there was anything but a key."""
    found = False
    for entry in os.listdir(slot):
        path = os.path.join(slot, entry)
        if entry == "lock":
            continue
        found |= entry != "key"
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return found


def _write_key(slot: str, key: str) -> None:
    fd = os.open(os.path.join(slot, "key"),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)


def _tighten(slot: str) -> None:
    """tf.data writes its files with the umask's mode (inside the 0700 folder, so private
    already); make them 0600 too, in case the folder is ever copied or opened up. Done when
    a process opens the folder and when it exits."""
    for entry in os.listdir(slot):
        path = os.path.join(slot, entry)
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
            os.chmod(path, 0o600)


@atexit.register
def _tighten_held() -> None:
    """At exit, the process's caches are complete (or deleted by tf.data): 0600 them."""
    for slot in _held:
        try:
            _tighten(slot)
        except OSError:  # a file tf.data deleted meanwhile
            pass


def _remove_other_data(root: str, name: str) -> None:
    """Delete slot folders of pipeline `name` made from other data (so stale caches do
    not pile up), except those a running process holds."""
    ours = re.compile(re.escape(name) + r"-[0-9a-f]{16}")
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if path in _held or not ours.fullmatch(entry) or not os.path.isdir(path) \
                or os.path.islink(path):
            continue
        try:
            fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # being created this moment
        try:
            if _try_lock(fd, fcntl.LOCK_EX):
                shutil.rmtree(path)
                log.warning("--cache: removed %s (cached from other data)", path)
        finally:
            os.close(fd)
