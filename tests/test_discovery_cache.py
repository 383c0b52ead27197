"""Issue 20, item 4: slurm/elastic_discover.sh uses its cache only when nobody else can have
written it. A planted answer would make Horovod ssh to and add the attacker's host.

The fake `sinfo` counts its calls, so whether the cache was used is seen from outside the
script; the real answer is what the fake tools say (node1, node2 usable).
Runs as root (like the other attack tests): `chown` to nobody needs it.
"""
import os
import pwd
import subprocess
import time

import pytest

from tests.conftest import ROOT, child_env

SCRIPT = ROOT / "slurm" / "elastic_discover.sh"
PLANTED = "attacker-host.example:8\n"
REAL = "node1:2\nnode2:2\n"


@pytest.fixture
def tools(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\nprintf "node1\\nnode2\\n"\n')
    (fake / "sinfo").write_text(f'#!/bin/sh\necho x >> {tmp_path}/sinfo-calls\n'
                                'printf "node1 alloc\\nnode2 mix\\n"\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    return tmp_path


def _discover(tools, **env):
    environ = child_env(PATH=f"{tools / 'bin'}:{os.environ['PATH']}", SLURM_JOB_ID="77",
                        SLURM_JOB_NODELIST="node[1-2]", ELASTIC_SLOTS=2, ELASTIC_CACHE_S=60,
                        **env)
    if "ELASTIC_CACHE" not in env:
        environ.pop("ELASTIC_CACHE", None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=environ, capture_output=True, text=True,
                          timeout=30, check=True)
    calls = tools / "sinfo-calls"
    return proc.stdout, proc.stderr, len(calls.read_text().split()) if calls.exists() else 0


def _plant(path, mtime_offset=0.0, owner=None):
    path.write_text(PLANTED)
    when = time.time() + mtime_offset
    os.utime(path, (when, when))
    if owner is not None:
        os.chown(path, owner, -1)


def test_cache_is_used_when_fresh_and_ours(tools):
    private = tools / "private"
    private.mkdir(mode=0o700)
    cache = private / "hosts"
    assert _discover(tools, ELASTIC_CACHE=cache)[::2] == (REAL, 1)
    assert _discover(tools, ELASTIC_CACHE=cache)[::2] == (REAL, 1)  # no second sinfo call
    assert cache.read_text() == REAL


@pytest.mark.parametrize("attack", ["future mtime", "owned by nobody", "a symlink"])
def test_planted_cache_file_is_ignored_and_rewritten(tools, attack):
    private = tools / "private"
    private.mkdir(mode=0o700)
    cache = private / "hosts"
    if attack == "future mtime":
        _plant(cache, mtime_offset=3600)
    elif attack == "owned by nobody":
        _plant(cache, owner=pwd.getpwnam("nobody").pw_uid)
    else:
        _plant(tools / "elsewhere")
        os.symlink(tools / "elsewhere", cache)
    out, _, calls = _discover(tools, ELASTIC_CACHE=cache)
    assert (out, calls) == (REAL, 1)
    assert not cache.is_symlink() and cache.read_text() == REAL
    assert os.stat(cache).st_uid == os.getuid() and os.stat(cache).st_mtime <= time.time()
    if attack == "a symlink":
        assert (tools / "elsewhere").read_text() == PLANTED  # not written through


def test_default_cache_folder_is_private_and_a_planted_one_is_refused(tools):
    shared = tools / "tmp"  # a shared /tmp
    shared.mkdir()
    shared.chmod(0o1777)
    folder = shared / f"hpc-resnet-discovery-{os.getuid()}-77"
    assert _discover(tools, TMPDIR=shared)[::2] == (REAL, 1)
    assert (folder / "hosts").read_text() == REAL
    assert oct(os.stat(folder).st_mode & 0o777) == oct(0o700)
    assert _discover(tools, TMPDIR=shared)[2] == 1  # cached

    # Someone else made the folder first, with a fresh answer in it.
    for path in (folder / "hosts", folder):
        os.remove(path) if path.is_file() else path.rmdir()
    nobody = pwd.getpwnam("nobody").pw_uid
    folder.mkdir(mode=0o755)
    _plant(folder / "hosts", owner=nobody)
    os.chown(folder, nobody, -1)
    out, err, calls = _discover(tools, TMPDIR=shared)
    assert (out, calls) == (REAL, 2)
    assert err.count("\n") == 1 and "not caching" in err and str(folder) in err
    assert (folder / "hosts").read_text() == PLANTED  # and nothing written into theirs


def test_group_writable_or_linked_cache_folder_is_refused(tools):
    writable = tools / "writable"
    writable.mkdir()
    writable.chmod(0o777)
    _plant(writable / "hosts")
    assert _discover(tools, ELASTIC_CACHE=writable / "hosts")[::2] == (REAL, 1)
    os.symlink(writable, tools / "link")
    writable.chmod(0o700)
    assert _discover(tools, ELASTIC_CACHE=tools / "link" / "hosts")[::2] == (REAL, 2)
    assert (writable / "hosts").read_text() == PLANTED
