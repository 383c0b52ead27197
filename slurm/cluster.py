"""Bring up (and tear down) a real SLURM on this machine, for tests and demos.

    cluster = SlurmCluster(Path("/var/tmp/slurm-x")).start()   # munged, slurmctld, slurmd
    cluster.run("sbatch", "--wait", ...)
    cluster.stop()

Everything lives in one folder: a generated munge key and socket, slurm.conf, state/spool/
log/pid files. By default the one compute node is this host (its short name, the real core
count); slurm/virtual_cluster.py subclasses this with several nodes, each in its own network
namespace. The daemons run as root with proctrack/linuxproc + task/none (no cgroups, no
systemd); `start()` is idempotent (it starts only what is not running) and `stop()` ends the
daemons by their pid files.

Packages: Debian's slurmctld slurmd slurm-client munge, installed only by `make cluster-deps`
(scripts/install_slurm.sh); without them `start()` says so and installs nothing. Every
start-up step is bounded and raises ClusterError with the daemon's log tail on failure. The
folder must be ours and writable by nobody else (slurm/run_dir.py checks it and every file
written in it); a pid file is trusted only while its process is the daemon we started.

Run by hand:  python -m slurm.cluster up DIR   /   python -m slurm.cluster down DIR
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from slurm.run_dir import (
    ClusterError,
    check_planted,
    check_run_dir,
    ensure_dir,
    open_append,
    record_pid,
    trusted_pid,
    write_file,
)

ROOT = Path(__file__).resolve().parents[1]
INSTALL_COMMAND = "make cluster-deps"  # as root: scripts/install_slurm.sh
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")


class Node(NamedTuple):
    name: str
    addr: str


def missing_binaries(binaries=BINARIES):
    return [b for b in binaries if which(b) is None]


def which(name):
    # Daemons live in /usr/sbin, which a non-login PATH may lack.
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


def require_installed(binaries=BINARIES):
    """ClusterError naming the missing programs and the command that installs them; nothing
    is installed here (a system package is the administrator's choice, issue 20)."""
    missing = missing_binaries(binaries)
    if missing:
        raise ClusterError(f"not installed: {', '.join(missing)}; install SLURM, munge and "
                           f"openssh-server with `{INSTALL_COMMAND}` (as root, apt-get)")


def write_munge_key(path: Path) -> None:
    """A new random munge key at `path`, created exclusively with mode 0400 (never readable
    by others, not even between a write and a chmod) and never through a link. A key left by
    an earlier start is reused only if it is a regular file owned by us that nobody else can
    read; anything else (a planted symlink, another owner's file) is a ClusterError."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    except FileExistsError:
        info = os.lstat(path)
        if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid()
                or info.st_mode & 0o077):
            raise ClusterError(f"{path} exists and is not our private munge key (a symlink, "
                               "another owner's file, or readable by others): remove it") from None
        return
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, n=4000):
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return f"<no log at {path}>"


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid, timeout=20):
    """SIGTERM, wait up to `timeout` s, then SIGKILL; False when it was not running."""
    if not pid or not pid_alive(pid):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True


class SlurmCluster:
    """One controller (on the first node) + one slurmd per node, all files in `root`.

    Subclasses place daemons and client commands elsewhere through `prefix(node)`.
    """

    # (slurmctld, slurmd) ports; None: pick free ones, so two clusters do not collide.
    ports = None
    binaries = BINARIES  # what start() installs when missing

    def __init__(self, root: Path, cpus: int | None = None, partition: str = "debug",
                 nodes: list[Node] | None = None):
        self.root = Path(os.path.abspath(root))  # not resolve(): check_run_dir sees links
        self.nodes = nodes or [Node(socket.gethostname().split(".")[0], "127.0.0.1")]
        self.host = self.nodes[0].name  # the controller's node; clients run there too
        self.cpus = cpus or os.cpu_count() or 1  # per node
        self.partition = partition
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        names = ["munged", "slurmctld"] + [f"slurmd-{n.name}" for n in self.nodes]
        self.logs = {name: self.root / "log" / f"{name}.log" for name in names}
        self.pidfiles = {name: self.root / "run" / f"{name}.pid" for name in names}

    # A folder above the run folder may be sticky and world-writable (as /tmp).
    sticky_ok = True

    def prefix(self, node: str | None) -> list[str]:
        """Command prefix that runs a program on `node` (None: munged, on the host)."""
        return []

    # ------------------------------------------------------------------ environment
    def env(self, base=None, **extra):
        """Environment for client commands (sbatch, scontrol, ...) talking to this cluster."""
        env = dict(os.environ if base is None else base)
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            del env[key]  # an outer allocation's variables must not leak into ours
        env["SLURM_CONF"] = str(self.conf)
        # Ranks share this machine's cores (with each other and whatever else runs): an MPI
        # rank waiting in a collective should yield its core, not spin (a 2-rank job here
        # used 50 instead of 78 CPU-seconds).
        env["OMPI_MCA_mpi_yield_when_idle"] = "1"
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def command(self, *cmd, node=None):
        """`cmd` as run on `node` (default: the controller's node, where clients run)."""
        return self.prefix(node or self.host) + [str(c) for c in cmd]

    def run(self, *cmd, timeout=30, check=True, env=None, node=None):
        proc = subprocess.run(self.command(*cmd, node=node), env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: "
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc

    # ------------------------------------------------------------------ config
    def make_dirs(self):
        """The run folder (checked) and its sub-folders; munge's must be searchable by
        others (munged insists), slurmd's spool as SLURM makes it, the rest root's alone."""
        check_run_dir(self.root, sticky_ok=self.sticky_ok)
        for sub, mode in (("etc", 0o755), ("munge", 0o711), ("log", 0o700), ("run", 0o700),
                          ("state", 0o700), ("spool", 0o755)):
            ensure_dir(self.root / sub, mode)
        for node in self.nodes:
            ensure_dir(self.root / "spool" / f"slurmd-{node.name}", 0o755)

    def write_config(self):
        self.make_dirs()
        write_munge_key(self.root / "munge" / "munge.key")
        ctld_port, slurmd_port = self.ports or (_free_port(), _free_port())
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        r, ctld = self.root, self.nodes[0]
        node_lines = "".join(f"NodeName={n.name} NodeAddr={n.addr} NodeHostname={n.name} "
                             f"CPUs={self.cpus} State=UNKNOWN\n" for n in self.nodes)
        write_file(self.conf, f"""\
# Generated by slurm/cluster.py ({type(self).__name__}): a test cluster on one machine.
ClusterName=hpcresnet
SlurmctldHost={ctld.name}({ctld.addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={self.pidfiles['slurmctld']}
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={self.logs['slurmctld']}
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
# sbatch --wait polls every 2 s when MinJobAge <= 4 (with more, its poll grows to 32 s);
# records of finished jobs stay at least this long.
MinJobAge=4
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
{node_lines}\
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""", mode=0o644)
        return self.conf

    # ------------------------------------------------------------------ daemons
    def _start_daemon(self, name, cmd, ready, timeout):
        if self.alive(name):  # idempotent: a running daemon stays as it is
            return self.pid(name)
        # A dead daemon's pid file would read as "died during start-up" until the new one
        # writes its own.
        self.pidfiles[name].unlink(missing_ok=True)
        self.records(name).unlink(missing_ok=True)
        log = self.logs[name]
        check_planted(log)  # the daemon appends to it as root: no planted link
        out = open_append(self.root / "log" / f"{name}.stdout")
        try:
            proc = subprocess.run([str(c) for c in cmd], env=self.env(), stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{name} did not daemonize in {timeout}s\n{self.log_tail(name)}") \
                from exc
        finally:
            out.close()
        if proc.returncode != 0:
            raise ClusterError(f"{name} failed to start (rc {proc.returncode}): "
                               f"{' '.join(map(str, cmd))}\n{self.log_tail(name)}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.recorded_pid(name)
            if pid and not pid_alive(pid):
                raise ClusterError(f"{name} (pid {pid}) died during start-up\n"
                                   f"{self.log_tail(name)}")
            if pid and ready() and record_pid(self.records(name), pid):
                return pid
            time.sleep(0.3)
        raise ClusterError(f"{name} not ready after {timeout}s (log {log})\n{self.log_tail(name)}")

    def seed_file(self):
        seed = self.root / "munge" / "munged.seed"
        check_planted(seed)  # munged rewrites it as root
        return seed

    def log_tail(self, name, n=3000):
        stdout = self.root / "log" / f"{name}.stdout"
        return (f"--- {self.logs[name]} (tail)\n{tail(self.logs[name], n)}\n"
                f"--- {stdout} (tail)\n{tail(stdout, 1000)}")

    def recorded_pid(self, name):
        """The pid a daemon wrote, not yet checked (only while it starts)."""
        try:
            return int(self.pidfiles[name].read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def records(self, name):
        """'PID NAME START' of the process we started as `name` (slurm/run_dir.py)."""
        return self.root / "run" / f"{name}.started"

    @staticmethod
    def program(name):
        """The program a daemon `name` ('slurmd-node1', 'anchor-node1', ...) runs."""
        kind = name.split("-")[0]
        return {"anchor": "sleep"}.get(kind, kind)

    def pid(self, name):
        """The daemon's pid if its process is the one we started (name and start time as
        recorded), else None: a stale or foreign pid is neither killed nor trusted."""
        return trusted_pid(self.pidfiles[name], self.records(name), self.program(name))

    def alive(self, name):
        pid = self.pid(name)
        return bool(pid) and pid_alive(pid)

    def _ctld_up(self):
        return self.run("scontrol", "ping", timeout=15, check=False).stdout.count("UP") > 0

    def node_states(self):
        """{node name: state} as sinfo reports it (lower case, e.g. 'idle', 'down*')."""
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", timeout=15, check=False)
        return dict(line.lower().split()[:2] for line in proc.stdout.splitlines()
                    if len(line.split()) >= 2)

    def node_state(self, node=None):
        return self.node_states().get(node or self.host, "")

    def start(self, timeout=60):
        require_installed(self.binaries)
        self.make_dirs()
        if not self.alive("slurmctld"):  # a running controller keeps its config and ports
            self.write_config()
        self._start_daemon(
            "munged",
            self.prefix(None) + [
                which("munged"), f"--socket={self.munge_socket}",
                f"--key-file={self.root / 'munge' / 'munge.key'}",
                f"--pid-file={self.pidfiles['munged']}", f"--log-file={self.logs['munged']}",
                f"--seed-file={self.seed_file()}"],
            ready=self.munge_socket.exists, timeout=timeout)
        self._start_daemon("slurmctld",
                           self.prefix(self.host) + [which("slurmctld"), "-c", "-i", "-f",
                                                     self.conf],
                           ready=self._ctld_up, timeout=timeout)
        for node in self.nodes:
            self._start_daemon(f"slurmd-{node.name}",
                               self.prefix(node.name) + [which("slurmd"), "-N", node.name,
                                                         "-f", self.conf],
                               ready=lambda: True, timeout=timeout)
        self.wait_idle(timeout)
        return self

    def wait_idle(self, timeout=60):
        """Until every node is idle; nodes left down or drained (by an earlier run, a kill)
        are resumed."""
        deadline = time.monotonic() + timeout
        states = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(n.name, "").startswith("idle") for n in self.nodes):
                return
            dead = [n.name for n in self.nodes if not self.alive(f"slurmd-{n.name}")]
            if dead:
                break
            for name, state in states.items():
                if "down" in state or "drain" in state:
                    self.run("scontrol", "update", f"nodename={name}", "state=resume",
                             check=False)
            time.sleep(0.5)
        logs = "\n".join(self.log_tail(f"slurmd-{n.name}", 1500) for n in self.nodes
                         if not states.get(n.name, "").startswith("idle"))
        raise ClusterError(f"nodes not idle after {timeout}s ({states})\n{logs}\n"
                           f"{self.log_tail('slurmctld')}")

    def stop(self, timeout=20):
        """Cancel jobs, then stop each slurmd, slurmctld, munged by their pid files (bounded)."""
        if self._ctld_up_quiet():
            self.run("scancel", "--full", "--quiet", "-u", "root", timeout=15, check=False)
        for node in self.nodes:
            stop_pid(self.pid(f"slurmd-{node.name}"), timeout)
        stop_pid(self.pid("slurmctld"), timeout)
        stop_pid(self.pid("munged"), timeout)

    def _ctld_up_quiet(self):
        try:
            return self.alive("slurmctld") and self._ctld_up()
        except (subprocess.TimeoutExpired, OSError, ClusterError):
            return False

    # ------------------------------------------------------------------ jobs
    def job_info(self, job_id):
        """`scontrol show job` as a dict (empty when the job is unknown)."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, timeout=15, check=False)
        info = {}
        for token in proc.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def wait_job(self, job_id, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                       "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                                       "DEADLINE"), timeout=300):
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise ClusterError(f"job {job_id} not in {states} after {timeout}s: "
                           f"JobState={info.get('JobState')} Reason={info.get('Reason')}")


def main(argv):
    if len(argv) != 3 or argv[1] not in ("up", "down"):
        print(__doc__)
        return 2
    cluster = SlurmCluster(Path(argv[2]))
    try:
        if argv[1] == "up":
            cluster.start()
            print(f"export SLURM_CONF={cluster.conf}")
        else:
            cluster.stop()
    except ClusterError as err:
        print(f"slurm.cluster: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
