"""Issue 20, item 2: the munge key is private from its creation and never written through a
planted link (slurm.cluster.write_munge_key, called in-process: no cluster is started)."""
import os
import pathlib

import pytest

from slurm.cluster import ClusterError, write_munge_key


@pytest.fixture
def no_chmod(monkeypatch):
    """The worst umask, and no way to fix a mode afterwards: the mode must come from the
    creation itself."""
    def refuse(*args, **kwargs):
        raise AssertionError("chmod after creation: the key was readable in between")
    for module, name in ((os, "chmod"), (os, "fchmod"), (pathlib.Path, "chmod")):
        monkeypatch.setattr(module, name, refuse)
    old = os.umask(0)
    yield
    os.umask(old)


def test_new_key_is_0400_at_creation(tmp_path, no_chmod):
    key = tmp_path / "munge.key"
    write_munge_key(key)
    info = os.lstat(key)
    assert oct(info.st_mode & 0o777) == oct(0o400) and info.st_size == 1024
    first = key.read_bytes()
    write_munge_key(key)  # a restart reuses our own private key
    assert key.read_bytes() == first


@pytest.mark.parametrize("target_exists", [True, False])
def test_planted_symlink_key_is_refused_and_not_followed(tmp_path, target_exists):
    outside = tmp_path / "outside"
    if target_exists:
        outside.write_text("not a key\n")
        outside.chmod(0o400)  # private and ours: only the link itself gives it away
    key = tmp_path / "munge.key"
    os.symlink(outside, key)
    with pytest.raises(ClusterError, match="munge.key exists and is not our private munge key"):
        write_munge_key(key)
    if target_exists:
        assert outside.read_text() == "not a key\n"
    else:
        assert not outside.exists()


def test_key_readable_by_others_is_refused(tmp_path):
    key = tmp_path / "munge.key"
    key.write_bytes(b"k" * 1024)
    key.chmod(0o644)
    with pytest.raises(ClusterError, match="readable by others"):
        write_munge_key(key)
