"""Issue 20, items 1, 3 and 7: the root-run cluster tools refuse a run folder, file or pid
file someone else could have planted, and install nothing.

Runs as root (like the other attack tests: `chown nobody` needs it), in a temporary tree.
The refusals come before any daemon starts; a guard in place of the first start-up step
fails the test (and starts nothing) if a check let the attack through. Only the stale-pid
test on `start()` brings up a real munged/slurmctld/slurmd (under a second) and stops it.
"""
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from slurm import cluster as cluster_lib
from slurm import virtual_cluster
from slurm.cluster import ClusterError, SlurmCluster
from slurm.run_dir import proc_identity, record_pid
from slurm.virtual_cluster import VirtualCluster

NOBODY = pwd.getpwnam("nobody").pw_uid
# A parent without world-writable folders above it (sshd's StrictModes, as in the multinode
# tests): the virtual cluster accepts nothing under /tmp.
VC_PARENT = Path("/var/lib/hpc-resnet-tests")


class Guard(Exception):
    """Raised in place of the first start-up step: the checks let the run folder through."""


@pytest.fixture
def tree():
    """A searchable temporary folder (munged wants every folder above its socket searchable;
    pytest's basetemp is 0700), removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="hr-attack-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def vc_tree():
    VC_PARENT.mkdir(mode=0o755, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="hr-attack-", dir=VC_PARENT))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)
    try:
        VC_PARENT.rmdir()
    except OSError:  # another test's cluster still uses it
        pass


@pytest.fixture
def guarded(monkeypatch):
    """No daemon, namespace or link is created: the first command run raises Guard."""
    def guard(*args, **kwargs):
        raise Guard(f"a command was run: {args[0] if args else kwargs}")
    monkeypatch.setattr(subprocess, "run", guard)
    monkeypatch.setattr(subprocess, "Popen", guard)


def snapshot(folder):
    """{relative path: (mode, uid, content or link target)} of everything under `folder`."""
    out = {}
    for path in sorted(folder.rglob("*")):
        info = os.lstat(path)
        body = (os.readlink(path) if path.is_symlink() else
                path.read_bytes() if path.is_file() else None)
        out[str(path.relative_to(folder))] = (info.st_mode, info.st_uid, body)
    return out


def refused(action, *words):
    """The ClusterError of `action()`: one line containing every word."""
    with pytest.raises(ClusterError) as info:
        action()
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert str(word) in message, message
    return message


def cli_refused(capsys, *argv):
    """`python -m slurm.virtual_cluster ARGV` in-process: rc 1 and one line on stderr."""
    assert virtual_cluster.main(list(map(str, argv))) == 1
    err = capsys.readouterr().err
    assert err.startswith("virtual_cluster: error: ") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------ the run folder (item 1)
def test_a_good_run_dir_is_accepted_and_made_private(tree, vc_tree, guarded):
    """The positive control: the guard is reached, the folder was created 0711 (searchable
    for munged's socket, writable and listable by root alone)."""
    with pytest.raises(Guard):
        SlurmCluster(tree / "new").start()
    assert stat.S_IMODE(os.lstat(tree / "new").st_mode) == 0o711
    with pytest.raises(Guard):
        VirtualCluster(vc_tree / "vc", nodes=1).up()
    assert stat.S_IMODE(os.lstat(vc_tree / "vc").st_mode) == 0o711


@pytest.mark.parametrize("attack", ["owned by nobody", "group-writable", "a symlink",
                                    "parent group-writable", "parent owned by nobody"])
def test_run_dir_someone_else_controls_is_refused(tree, vc_tree, guarded, capsys, attack):
    for parent, start in ((tree, lambda d: SlurmCluster(d).start()),
                          (vc_tree, lambda d: VirtualCluster(d, nodes=1).up())):
        run_dir, real = parent / "run", parent / "real"
        if attack == "a symlink":
            real.mkdir()
            run_dir.symlink_to(real)
        elif attack.startswith("parent"):
            run_dir = parent / "shared" / "run"
            run_dir.parent.mkdir()
            if attack == "parent group-writable":
                run_dir.parent.chmod(0o775)
            else:
                os.chown(run_dir.parent, NOBODY, -1)
            run_dir.mkdir()
        else:
            run_dir.mkdir()
            if attack == "owned by nobody":
                os.chown(run_dir, NOBODY, -1)
            else:
                run_dir.chmod(0o775)
        before = snapshot(parent)
        why = {"owned by nobody": "owned by uid", "group-writable": "writable by others",
               "a symlink": "is a symlink", "parent group-writable": "writable by others",
               "parent owned by nobody": "owned by uid"}[attack]
        refused(lambda: start(run_dir), run_dir, why)
        assert snapshot(parent) == before  # nothing written, no mode changed
        if parent == vc_tree:
            err = cli_refused(capsys, "up", "--nodes", 1, "--run_dir", run_dir)
            assert why in err
            assert snapshot(parent) == before


def test_virtual_cluster_refuses_a_sticky_world_writable_parent(vc_tree, guarded):
    """sshd's StrictModes refuses keys below a folder like /var/tmp (1777): say so at once."""
    sticky = vc_tree / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    refused(lambda: VirtualCluster(sticky / "vc", nodes=1).up(), sticky, "writable by others")
    assert list(sticky.iterdir()) == []
    with pytest.raises(Guard):  # the single-node cluster (no sshd) accepts a sticky parent
        SlurmCluster(sticky / "c").start()


def test_run_dir_with_shell_or_config_characters_is_refused(tree, guarded):
    for name in ("a b", "x;touch pwned", "$(touch pwned)", "c#d"):
        refused(lambda: SlurmCluster(tree / name).start(), "only letters, digits")
    assert sorted(p.name for p in tree.iterdir()) == []


@pytest.mark.parametrize("planted", ["munge/munge.key", "etc/slurm.conf", "munge/munged.seed",
                                     "log/munged.log", "log/munged.stdout", "etc"])
def test_planted_symlink_in_the_run_dir_is_refused_not_followed(tree, guarded, planted):
    """A link left in our own run folder (by an earlier owner of the name, a mistake): it is
    refused before munged starts, and the file it points at stays as it was."""
    run_dir = tree / "run"
    SlurmCluster(run_dir).make_dirs()
    outside = tree / "outside"
    outside.mkdir()
    (outside / "victim").write_text("precious\n")
    (outside / "victim").chmod(0o644)
    link = run_dir / planted
    if link.is_dir():
        link.rmdir()
    link.symlink_to(outside if planted == "etc" else outside / "victim")
    before = snapshot(outside)
    refused(SlurmCluster(run_dir).start, link, "symlink")
    assert snapshot(outside) == before


# ------------------------------------------------------------------ pid files (item 3)
@pytest.fixture
def bystander():
    """An unrelated process (not started by any cluster), killed at the end."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait(timeout=30)


def plant_pid(cluster, name, pid, record=None):
    (cluster.root / "run").mkdir(parents=True, exist_ok=True)
    cluster.pidfiles[name].write_text(f"{pid}\n")
    if record:
        cluster.records(name).write_text(record)


def test_stale_pid_files_are_not_trusted_and_down_kills_nothing(vc_tree, bystander, capsys):
    run_dir = vc_tree / "vc"
    vc = VirtualCluster(run_dir, nodes=2)
    run_dir.mkdir()
    (run_dir / "cluster.json").write_text('{"nodes": 2, "cpus": 1}')
    name, start = proc_identity(bystander.pid)
    assert name == "sleep"
    for daemon in vc.pidfiles:  # every pid file names the bystander ...
        plant_pid(vc, daemon, bystander.pid)
    # ... and two records claim it: one with a forged start time, one naming another program
    # with the right start time (a forger who read /proc).
    vc.records("anchor-node1").write_text(f"{bystander.pid} sleep {start + 1}\n")
    vc.records("slurmctld").write_text(f"{bystander.pid} sleep {start}\n")
    assert [n for n in vc.pidfiles if vc.alive(n)] == []
    assert virtual_cluster.main(["down", "--run_dir", str(run_dir)]) == 0
    assert "is down" in capsys.readouterr().out
    assert bystander.poll() is None, "down killed a process it did not start"


def test_a_recorded_pid_is_trusted_and_stopped(tree):
    """The positive control: a process named munged (sleep with argv[0] "munged") whose
    start time we recorded is ours, and stop() ends it."""
    proc = subprocess.Popen(["munged", "600"], executable=shutil.which("sleep"))
    try:
        cluster = SlurmCluster(tree / "c")
        plant_pid(cluster, "munged", proc.pid)
        assert record_pid(cluster.records("munged"), proc.pid)
        assert cluster.pid("munged") == proc.pid
        cluster.stop(timeout=20)
        assert proc.wait(timeout=30) is not None
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_start_runs_a_new_daemon_beside_a_stale_pid(tree, bystander):
    """`start()` does not skip munged because a recorded pid is alive: it starts its own."""
    cluster = SlurmCluster(tree / "c")
    cluster.make_dirs()
    _, start = proc_identity(bystander.pid)
    plant_pid(cluster, "munged", bystander.pid, f"{bystander.pid} munged {start}\n")
    try:
        cluster.start(timeout=60)
        munged = cluster.pid("munged")
        assert munged and munged != bystander.pid
        assert proc_identity(munged)[0] == "munged"
    finally:
        cluster.stop()
    assert bystander.poll() is None


# ------------------------------------------------------------------ installing (item 7)
def test_missing_packages_name_the_install_command_and_install_nothing(tree, vc_tree, guarded,
                                                                       capsys, monkeypatch):
    real_which = cluster_lib.which
    monkeypatch.setattr(cluster_lib, "which",
                        lambda name: None if name in ("slurmd", "sshd") else real_which(name))
    refused(SlurmCluster(tree / "c").start, "not installed: slurmd", "make cluster-deps")
    err = cli_refused(capsys, "up", "--nodes", 1, "--run_dir", vc_tree / "vc")
    assert "slurmd, sshd" in err and "make cluster-deps" in err
    # The guard saw no command (no apt-get), and no folder was made.
    assert list(tree.iterdir()) == [] and list(vc_tree.iterdir()) == []
