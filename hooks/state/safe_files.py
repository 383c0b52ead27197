"""File handling inside folders that others may share (--model_dir, report folders): never
follow a link we did not create.

Someone with write access to a shared model_dir can plant a symlink named like a file we
write (DAMAGED.txt, .stall/rank-1) or like a folder we clean up (ckpt-*, .ckpt-*); following
it would make the job overwrite or delete a file outside the folder. These helpers look at
the entry itself (lstat) and open with O_NOFOLLOW, so a planted link is left alone or
refused with an OSError naming it.

Modes follow the user's umask: tempfile makes private files (0600) and folders (0700), which
`follow_umask` turns into what a plain open/mkdir would have made, so a colleague can read
a shared checkpoint folder or report when the umask allows it.
"""
import os
import stat


def is_real_dir(path: str) -> bool:
    """A folder that is not a symlink (os.path.isdir follows links)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def open_for_write(path: str, exclusive: bool = False, append: bool = False) -> int:
    """A file descriptor to write `path`, created with the umask's mode; OSError (ELOOP)
    when `path` is a symlink, FileExistsError with `exclusive` when anything is there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    if exclusive:
        flags |= os.O_EXCL
    elif append:
        flags |= os.O_APPEND
    else:
        flags |= os.O_TRUNC
    return os.open(path, flags, 0o666)


def write_text(path: str, text: str, exclusive: bool = False) -> None:
    """Write `text` to `path` without following a link planted there."""
    with os.fdopen(open_for_write(path, exclusive=exclusive), "w") as f:
        f.write(text)


def read_text(path: str) -> str:
    """The text of `path`; OSError (ELOOP) when it is a symlink."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as f:
        return f.read()


def umask() -> int:
    """The process umask, read without changing it (setting it, even for a moment, would
    change it for every thread: a file created meanwhile would get the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)  # no /proc: the most private value while we look
    os.umask(old)
    return old


def follow_umask(path: str) -> None:
    """Give `path`, a file or folder we made private (mkstemp, mkdtemp), the mode a plain
    open or mkdir would have given it: 0666 or 0777 less the umask. Never through a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        full = 0o777 if stat.S_ISDIR(os.fstat(fd).st_mode) else 0o666
        os.fchmod(fd, full & ~umask())
    finally:
        os.close(fd)
