"""A SLURM cluster of N real nodes on this machine, for trying and testing multi-node runs.

    python -m slurm.virtual_cluster up --nodes 3 --run_dir /var/lib/hrvc
    python -m slurm.virtual_cluster exec node1 --run_dir /var/lib/hrvc -- sinfo
    python -m slurm.virtual_cluster kill node2 --run_dir /var/lib/hrvc     # a node failure
    python -m slurm.virtual_cluster down --run_dir /var/lib/hrvc

Each node is a network namespace plus a UTS namespace (hostname node1, node2, ...) and a
mount namespace that gives it a private /tmp and /dev/shm (as on separate machines; SLURM's
PMIx plugin needs that) and an /etc/hosts naming every node. Each node has an address on a
private link: a veth pair into a bridge that lives in a "switch" namespace. Nothing is added
to the host's own network namespace, so no traffic leaves the namespaces. The rest of the
host's filesystem is shared by all nodes, as NFS is on a real cluster, so RUN_DIR and run
folders must not be under /tmp. Each node runs its own slurmd; slurmctld runs on node1;
munged (a unix socket in RUN_DIR) is shared. Every node also runs sshd, and root on any node
can `ssh nodeN` (a key in RUN_DIR/ssh; each node's mount namespace puts a client config over
/etc/ssh/ssh_config, so the host's ssh files are not touched): horovodrun starts its remote
workers that way (elastic runs, docs/elastic.md). Run client commands (sbatch, squeue, ...)
on a node with `exec`: node1 doubles as the login node.

Needs root, iproute2, util-linux (nsenter, unshare), Debian's SLURM packages and
openssh-server (`make cluster-deps`; `up` installs nothing). RUN_DIR must be root's and no
folder above it writable by others, sticky /tmp-like ones included: sshd (StrictModes yes)
refuses keys below such a folder. `up` is idempotent: it creates or
starts only what is missing (a killed node comes back). `down` stops every daemon by its
pid, kills every process left in a node and deletes the namespaces (and with them the
links), also after a failed `up`."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurm.cluster import (
    BINARIES,
    ClusterError,
    Node,
    SlurmCluster,
    pid_alive,
    require_installed,
    tail,
    which,
)
from slurm.run_dir import (
    check_planted,
    check_run_dir,
    ensure_dir,
    open_append,
    record_pid,
    write_file,
)

SUBNET = "10.77.0"  # node i is SUBNET.i/24; the subnet exists only inside the namespaces
NETNS_DIR = Path("/run/netns")
STATE_FILE = "cluster.json"


def _sh(*cmd, timeout=30, check=True):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _netns_ino(name):
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except OSError:
        return None


def pids_in_netns(name):
    """Every process whose network namespace is `name` (from /proc)."""
    ino = _netns_ino(name)
    if ino is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == ino:
                    found.append(int(entry))
            except OSError:  # gone meanwhile
                pass
    return found


def kill_netns_processes(name, timeout=20):
    """SIGKILL every process in namespace `name` until none is left (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in pids_in_netns(name) if pid_alive(p)]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"processes {pids} in namespace {name} survive SIGKILL")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


class VirtualCluster(SlurmCluster):
    """N slurmd nodes in namespaces; all state (config, logs, per-node /tmp) in run_dir."""

    ports = (6817, 6818)  # each node has its own port space
    binaries = BINARIES + ("sshd", "ssh")  # horovodrun starts remote workers with ssh
    sticky_ok = False  # sshd's StrictModes refuses a sticky /var/tmp above authorized_keys

    def __init__(self, run_dir: Path, nodes: int = 3, cpus: int | None = None):
        run_dir = Path(os.path.abspath(run_dir))  # not resolve(): check_run_dir sees links
        if run_dir == Path("/tmp") or Path("/tmp") in run_dir.parents:
            raise ClusterError(f"--run_dir={run_dir} is under /tmp, which each node has its "
                               "own copy of; use e.g. /var/lib/NAME")
        if nodes < 1:
            raise ClusterError(f"--nodes={nodes} must be at least 1")
        # The real CPUs split between the nodes; at least 1 each (then oversubscribed).
        cpus = cpus or max(1, (os.cpu_count() or 1) // nodes)
        super().__init__(run_dir, cpus=cpus, nodes=[Node(f"node{i}", f"{SUBNET}.{i}")
                                                    for i in range(1, nodes + 1)])
        # Namespace names carry a tag of run_dir, so two clusters can coexist.
        tag = hashlib.sha1(str(run_dir).encode()).hexdigest()[:6]
        self.netns = {n.name: f"hrvc{tag}-{n.name}" for n in self.nodes}
        self.switch = f"hrvc{tag}-switch"
        self.pidfiles.update({f"anchor-{n.name}": self.root / "run" / f"anchor-{n.name}.pid"
                              for n in self.nodes})
        # sshd on every node (horovodrun starts remote workers with ssh).
        for n in self.nodes:
            self.pidfiles[f"sshd-{n.name}"] = self.root / "run" / f"sshd-{n.name}.pid"
            self.logs[f"sshd-{n.name}"] = self.root / "log" / f"sshd-{n.name}.log"

    @classmethod
    def load(cls, run_dir: Path) -> VirtualCluster:
        """The cluster `up` made in run_dir (its node count is in cluster.json)."""
        state = check_run_dir(run_dir, sticky_ok=cls.sticky_ok, create=False) / STATE_FILE
        try:
            check_planted(state)
            saved = json.loads(state.read_text())
        except (OSError, ValueError):
            raise ClusterError(f"--run_dir={run_dir}: no virtual cluster there (no readable "
                               f"{STATE_FILE}); run `up` first") from None
        return cls(run_dir, nodes=saved["nodes"], cpus=saved["cpus"])

    def node_dir(self, node):
        return self.root / "nodes" / node

    def anchor_pid(self, node):
        """The process that holds the node's namespaces (its 'init')."""
        return self.pid(f"anchor-{node}")

    def prefix(self, node):
        if node is None:
            return []  # munged: a unix socket in run_dir, shared by every node
        if node not in self.netns:
            raise ClusterError(f"no node {node!r} in this cluster "
                               f"(nodes: {', '.join(self.netns)})")
        if not self.alive(f"anchor-{node}"):
            raise ClusterError(f"node {node} is not running (run `up` again)")
        return [which("nsenter"), f"--target={self.anchor_pid(node)}", "--net", "--uts",
                "--mount", f"--wd={os.getcwd()}", "--"]

    # ------------------------------------------------------------------ network
    def _netns_add(self, name):
        if _netns_ino(name) is None:
            _sh("ip", "netns", "add", name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")

    def _make_network(self):
        self._netns_add(self.switch)
        if _sh("ip", "-n", self.switch, "link", "show", "br0", check=False).returncode:
            _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes, 1):
            ns, port = self.netns[node.name], f"port{i}"
            self._netns_add(ns)
            if _sh("ip", "-n", ns, "link", "show", "eth0", check=False).returncode:
                _sh("ip", "-n", self.switch, "link", "del", port, check=False)  # half a pair
                _sh("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer",
                    "name", "eth0", "netns", ns)
                _sh("ip", "-n", ns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            _sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")

    # ------------------------------------------------------------------ ssh
    def _write_ssh_files(self):
        """Keys and configs in RUN_DIR/ssh: one root key every node accepts (from the
        cluster's subnet only), sshd's config (StrictModes yes: it checks the modes of the
        keys' folders itself), and the client config each node's mount namespace puts over
        /etc/ssh/ssh_config (the host's own ssh files and ~/.ssh are never touched)."""
        folder = ensure_dir(self.root / "ssh", 0o700)
        for key in ("host_ed25519", "id_ed25519"):
            self._make_key(folder / key)
        pub = (folder / "id_ed25519.pub").read_text().strip()
        write_file(folder / "authorized_keys", f'from="{SUBNET}.0/24" {pub}\n', mode=0o600)
        write_file(folder / "sshd_config", (
            f"HostKey {folder / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {folder / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes yes\n"
            "PrintMotd no\nLogLevel ERROR\n"), mode=0o600)
        write_file(folder / "ssh_config", (
            f"Host *\n  IdentityFile {folder / 'id_ed25519'}\n  BatchMode yes\n"
            "  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  LogLevel ERROR\n"),
            mode=0o644)
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory

    @staticmethod
    def _make_key(path):
        """An ed25519 key pair at `path`(.pub), made in a fresh private folder and renamed in
        (ssh-keygen would write through a link planted at the name); kept when it exists."""
        have = [check_planted(p) for p in (path, path.with_name(path.name + ".pub"))]
        if all(have):
            return
        tmp = Path(tempfile.mkdtemp(dir=path.parent))
        try:
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hrvc-{path.name}",
                "-f", tmp / "key")
            os.replace(tmp / "key.pub", path.with_name(path.name + ".pub"))
            os.replace(tmp / "key", path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _start_sshd(self, node, timeout=20):
        name, folder = f"sshd-{node.name}", self.root / "ssh"
        self._start_daemon(name, self.prefix(node.name) + [
            which("sshd"), "-f", folder / "sshd_config", "-E", self.logs[name],
            "-o", f"ListenAddress={node.addr}", "-o", f"PidFile={self.pidfiles[name]}"],
            ready=lambda: True, timeout=timeout)

    # ------------------------------------------------------------------ nodes
    def _start_anchor(self, node, timeout=20):
        """A `sleep` in the node's namespaces; daemons and `exec` join them via nsenter."""
        if self.alive(f"anchor-{node.name}"):
            return
        ensure_dir(self.root / "nodes", 0o755)
        folder = ensure_dir(self.node_dir(node.name), 0o755)
        ensure_dir(folder / "tmp", 0o1777)  # the node's /tmp
        hosts = self.root / "etc" / "hosts"
        # Private /tmp (PMIx makes /tmp/spmix_appdir_* on each node) and /dev/shm, a shared
        # /etc/hosts naming the nodes; `ip netns exec` would remount /sys, nsenter does not.
        steps = [["mount", "--bind", folder / "tmp", "/tmp"],
                 ["mount", "-t", "tmpfs", "tmpfs", "/dev/shm"],
                 ["mount", "--bind", hosts, "/etc/hosts"]]
        if os.path.exists("/etc/ssh/ssh_config"):
            steps.append(["mount", "--bind", self.root / "ssh" / "ssh_config",
                          "/etc/ssh/ssh_config"])
        steps += [["hostname", node.name], ["exec", "sleep", "infinity"]]
        script = " && ".join(shlex.join(map(str, step)) for step in steps)
        with open_append(self.root / "log" / f"anchor-{node.name}.log") as log:
            proc = subprocess.Popen(
                [which("nsenter"), f"--net={NETNS_DIR / self.netns[node.name]}",
                 which("unshare"), "--uts", "--mount", "--propagation", "private",
                 "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        # nsenter, unshare and sh exec in turn: the pid ends as `sleep` once all is set up.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"node {node.name} failed to start (rc {proc.returncode})"
                                   f"\n{tail(self.root / 'log' / f'anchor-{node.name}.log')}")
            try:
                if Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"sleep\0"):
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            proc.kill()
            raise ClusterError(f"node {node.name} not set up after {timeout}s")
        write_file(self.pidfiles[f"anchor-{node.name}"], f"{proc.pid}\n", mode=0o600)
        record_pid(self.records(f"anchor-{node.name}"), proc.pid)

    def up(self, timeout=60):
        """Create what is missing (namespaces, links, nodes, daemons), then wait until every
        node is idle. Safe to repeat."""
        if os.geteuid() != 0:
            raise ClusterError("the virtual cluster needs root (namespaces, mounts, daemons)")
        for tool in ("ip", "nsenter", "unshare"):
            if which(tool) is None:
                raise ClusterError(f"`{tool}` not found (Debian: iproute2, util-linux)")
        require_installed(self.binaries)  # SLURM, munge, sshd: `make cluster-deps`
        check_run_dir(self.root, sticky_ok=self.sticky_ok)
        if check_planted(self.root / STATE_FILE):
            running = VirtualCluster.load(self.root)
            if running.leftovers() and len(running.nodes) != len(self.nodes):
                raise ClusterError(f"--nodes={len(self.nodes)}, but the cluster in {self.root}"
                                   f" has {len(running.nodes)}; run `down` first")
            if running.leftovers():
                self.cpus = running.cpus  # its slurm.conf stays as it is
        self.make_dirs()
        # First, so that `down` finds everything even when a later step fails.
        write_file(self.root / STATE_FILE, json.dumps(
            {"nodes": len(self.nodes), "cpus": self.cpus, "switch": self.switch,
             "netns": self.netns}, indent=1), mode=0o644)
        hosts = ["127.0.0.1 localhost"] + [f"{n.addr} {n.name}" for n in self.nodes]
        write_file(self.root / "etc" / "hosts", "\n".join(hosts) + "\n", mode=0o644)
        self._make_network()
        self._write_ssh_files()
        for node in self.nodes:
            self._start_anchor(node)
            self._start_sshd(node)
        return self.start(timeout)

    def kill_node(self, node):
        """Simulate a node failure: SIGKILL its slurmd and every process in it, then tell the
        controller it is down (as a health check would)."""
        if node not in self.netns or node == self.host:
            raise ClusterError(f"can kill {', '.join(list(self.netns)[1:]) or 'no node'}, not "
                               f"{node!r} ({self.host} runs slurmctld)")
        pid = self.pid(f"slurmd-{node}")  # only the slurmd we started
        if pid:
            os.kill(pid, signal.SIGKILL)
        kill_netns_processes(self.netns[node])
        self.run("scontrol", "update", f"nodename={node}", "state=down",
                 "reason=killed by virtual_cluster", timeout=15)

    def down(self, timeout=20):
        """Stop daemons by pid, kill what is left in each node, delete the namespaces."""
        try:
            self.stop(timeout)
        except (ClusterError, subprocess.SubprocessError, OSError):
            pass  # a half-started cluster: the kills below still clean up
        for ns in list(self.netns.values()) + [self.switch]:
            kill_netns_processes(ns, timeout)
            if _netns_ino(ns) is not None:
                _sh("ip", "netns", "del", ns)
        for node in self.nodes:
            self.pidfiles[f"anchor-{node.name}"].unlink(missing_ok=True)
            self.records(f"anchor-{node.name}").unlink(missing_ok=True)
        left = self.leftovers()
        if left:
            raise ClusterError(f"`down` left behind: {left}")

    def leftovers(self):
        """What `down` must remove: namespaces, daemons and node processes still there."""
        left = [f"netns {ns}" for ns in list(self.netns.values()) + [self.switch]
                if _netns_ino(ns) is not None]
        left += [f"{name} (pid {self.pid(name)})" for name in self.pidfiles if self.alive(name)]
        return left

    def usage(self):
        me = "python -m slurm.virtual_cluster"
        names = ", ".join(n.name for n in self.nodes)
        return (f"virtual cluster up: {names} ({self.cpus} CPU(s) each), slurmctld on "
                f"{self.host}, files in {self.root}\n"
                f"  {me} exec {self.host} --run_dir {self.root} -- srun -N{len(self.nodes)} "
                "hostname\n"
                f"  {me} exec {self.host} --run_dir {self.root} -- sbatch --nodes=2 "
                "--ntasks-per-node=1 ...   (see slurm/README.md)\n"
                f"  {me} down --run_dir {self.root}\n"
                "Keep job files out of /tmp: each node has its own.")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m slurm.virtual_cluster",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    up = sub.add_parser("up", help="create (or complete) the cluster")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--cpus", type=int, default=None, help="CPUs per node (default: the "
                    "machine's CPUs split between the nodes, at least 1)")
    up.add_argument("--timeout", type=int, default=60, help="seconds per start-up step")
    down = sub.add_parser("down", help="stop every daemon, remove namespaces and links")
    ex = sub.add_parser("exec", help="run a command on a node: exec NODE -- CMD...")
    ex.add_argument("node")
    kill = sub.add_parser("kill", help="a node failure: kill every process of NODE, mark it "
                          "down (`up` brings it back)")
    kill.add_argument("node")
    for verb in (up, down, ex, kill):
        verb.add_argument("--run_dir", required=True, type=Path,
                          help="where the cluster keeps its files: root's, no folder above "
                          "it writable by others (e.g. /var/lib/hrvc; not under /tmp)")
    # Everything after the first `--` is the command of `exec`, options included.
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.cmd = argv[cut + 1:]
    if args.verb == "exec" and not args.cmd:
        p.error("exec needs a command: exec NODE --run_dir DIR -- CMD...")
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.verb == "up":
            cluster = VirtualCluster(args.run_dir, args.nodes, args.cpus)
            cluster.up(args.timeout)
            print(cluster.usage())
        elif args.verb == "down":
            if not (args.run_dir / STATE_FILE).exists():
                print(f"nothing to stop in {args.run_dir}")
                return 0
            VirtualCluster.load(args.run_dir).down()
            print(f"virtual cluster in {args.run_dir} is down")
        elif args.verb == "kill":
            VirtualCluster.load(args.run_dir).kill_node(args.node)
            print(f"{args.node} killed and marked down")
        else:
            cluster = VirtualCluster.load(args.run_dir)
            cmd = cluster.command(*args.cmd, node=args.node)
            if shutil.which(args.cmd[0]) is None and which(args.cmd[0]) is None:
                raise ClusterError(f"command not found: {args.cmd[0]}")
            os.execvpe(cmd[0], cmd, cluster.env())
    except ClusterError as err:
        print(f"virtual_cluster: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
