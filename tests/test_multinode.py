"""The batch scripts across real SLURM nodes: a 3-node virtual cluster on this machine.

`pytest -m multinode` (root) brings up slurm/virtual_cluster.py (node1..node3: own network
namespace, hostname, /tmp and slurmd; slurmctld on node1; munged shared), then:
  * imagenet_resnet50.sbatch on 2 nodes x 1 task, launched by srun (PMIx) and by mpirun
    inside the allocation: COMPLETED, ranks on node1 and node2 with local_size 1, final
    weights equal to those of a 2-rank run on one node (node3, mpirun outside SLURM);
  * chexnet_finetune.sbatch + evaluate.sbatch on 2 nodes give the per-class AUROC of the
    same two scripts on one node;
  * node2 is killed during a 2-node job: the job is requeued, restarts on node1 + node3 from
    its newest checkpoint and completes; `up` then brings node2 back;
  * an elastic job (ELASTIC=1, horovodrun over ssh between the nodes) loses node2 and
    finishes every step on node1 in the same allocation;
  * `down` removes every namespace, link and daemon (also after a failed `up`).
Job files live in the cluster's run_dir under /var/lib/hpc-resnet-tests (each node has a
private /tmp; sshd's StrictModes refuses keys below a world-writable /var/tmp).
Every wait is bounded; the fixture's finalizer runs `down` and removes the run_dir.
"""
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hooks.distributed.horovod_glue import describe_placement
from slurm import cluster as cluster_lib
from slurm.cluster import ClusterError
from slurm.virtual_cluster import VirtualCluster
from tests.checkpoint_values import assert_same_state, newest_state, weights
from tests.conftest import (
    LAUNCH_VAR,
    SHARED_DATA,
    TOKEN_VAR,
    kill_tree,
    owned_by_session,
    shared_data,
)
from tests.slurm_jobs import JOB_TIMEOUT, SLURM_DIR, TINY, job_env, read, sbatch, summary

pytestmark = pytest.mark.multinode

# Not /tmp (each node has its own), not /var/tmp (sshd's StrictModes refuses its mode 1777).
RUN_PARENT = Path("/var/lib/hpc-resnet-tests")
CHEST = SHARED_DATA / "chestxray14"
STEPS = 2  # tiny runs: ResNet-18 at 32 px, 4 images per rank
# Same seed and data on every layout; one thread per rank everywhere (1 CPU per node).
IMAGENET = dict(TINY, TRAIN_STEPS=str(STEPS), ITERATIONS_PER_LOOP="1",
                EXTRA_FLAGS="--num_label_classes=10 --log_every_n_steps=1 --seed=7 "
                "--warmup_epochs=0")  # full learning rate at once: wrong averaging would show
CHEXNET_DATA = ["--only_present_images", "--split_fractions=0.6,0.2,0.2"]
CHEXNET = {"PYTHON": TINY["PYTHON"], "TF_CPP_MIN_LOG_LEVEL": "2", "DATA_DIR": str(CHEST),
           "CSV": str(CHEST / "Data_Entry_2017.csv.gz"), "BACKBONE": "resnet18",
           "IMAGE_SIZE": "32", "BATCH": "4", "EVAL_BATCH": "4", "TRAIN_STEPS": str(STEPS),
           "ALLOW_RANDOM_INIT": "1",
           "EXTRA_FLAGS": " ".join(CHEXNET_DATA + ["--seed=3", f"--steps_per_loop={STEPS}"])}
# horovodrun's elastic mode prefixes each line with "[slot]<stdout>:".
PLACEMENT = re.compile(r"^(?:\[\d+\]<stdout>:)?horovod: (\d+) rank\(s\) on (\d+) host\(s\): "
                       r"(.*)$", re.M)


def _host_state():
    """The host namespace's link names, addresses and routes (the cluster must not touch them)."""
    def ip(*args):
        return subprocess.run(["ip", "-o", *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.splitlines()
    return ({line.split(":")[1].strip() for line in ip("link")},
            {tuple(line.split()[1:4]) for line in ip("addr")}, set(ip("route")))


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("the multinode tests create namespaces and start SLURM daemons as root; "
                    "run them as root or deselect them with -m 'not multinode'")
    if Path("/tmp") in SLURM_DIR.resolve().parents:
        pytest.fail(f"the project is under /tmp ({SLURM_DIR.parent}), which each node of the "
                    "virtual cluster has its own copy of: clone it elsewhere (e.g. /var/tmp)")
    before = _host_state()
    run_dir = _new_run_dir()
    vc = VirtualCluster(run_dir, nodes=3)
    try:
        t0 = time.monotonic()
        vc.up(timeout=60)
        print(f"\nvirtual cluster up in {time.monotonic() - t0:.1f} s")  # bounded by up()
        vc.host_state_before = before
        (run_dir / "jobs").mkdir()
        yield vc
    except ClusterError as exc:
        pytest.fail(f"could not bring up the virtual cluster: {exc}", pytrace=False)
    finally:
        try:
            vc.down()
        finally:
            _remove_run_dir(run_dir)


def _new_run_dir():
    RUN_PARENT.mkdir(mode=0o755, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="hr-vcluster-", dir=RUN_PARENT))


def _remove_run_dir(run_dir):
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        RUN_PARENT.rmdir()  # ours, unless another cluster still uses it
    except OSError:
        pass


def _jobs(cluster, name):
    folder = cluster.root / "jobs" / name
    folder.mkdir()
    return folder


def _placement(log):
    """[(ranks, hosts, 'node1 rank 0 local_size 1; ...')] of each launch in a log."""
    return [(int(n), int(h), rest) for n, h, rest in PLACEMENT.findall(log)]


def _completed(cluster, job_id, proc, log):
    info = cluster.job_info(job_id)
    assert proc.returncode == 0 and info.get("JobState") == "COMPLETED", (
        f"job {job_id}: sbatch --wait rc {proc.returncode}, JobState {info.get('JobState')}"
        f"\n{proc.stderr}\n--- job log\n{log[-6000:]}")
    return info


class OneNode:
    """Batch scripts run one after the other outside SLURM on node3 (LAUNCHER=mpirun NP=2),
    in the background, so they overlap the 2-node SLURM jobs they are compared with."""

    def __init__(self, cluster, folder, runs):
        self.cluster, self.folder, self.runs = cluster, folder, runs  # [(script, env)]
        self.proc, self.codes, self.stopped = None, [], False
        self.token = f"{os.environ[TOKEN_VAR]}-{folder.name}"  # marks all it starts
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for script, env in self.runs:
            if self.stopped or any(self.codes):
                return
            with open(self.folder / f"{script}.out", "w") as out:
                self.proc = subprocess.Popen(
                    self.cluster.command("bash", SLURM_DIR / f"{script}.sbatch", node="node3"),
                    env=dict(env, LAUNCHER="mpirun", NP="2", **{LAUNCH_VAR: self.token}),
                    stdout=out, stderr=subprocess.STDOUT, cwd=self.folder,
                    start_new_session=True)
                self.codes.append(self.proc.wait())  # bounded: wait() kills it at its deadline

    def wait(self, timeout=JOB_TIMEOUT):
        """The logs of the runs, once all succeeded (bounded by `timeout`)."""
        self.thread.join(timeout)
        self.kill()
        codes = self.codes + [None] * (len(self.runs) - len(self.codes))
        logs = [read(self.folder / f"{script}.out") for script, _ in self.runs]
        for (script, _), log, code in zip(self.runs, logs, codes):
            assert code == 0, (f"{script} on node3: exit {code} (None: not done in "
                               f"{timeout}s)\n{log[-6000:]}")
            assert [p[:2] for p in _placement(log)] == [(2, 1)], log[-3000:]
        return logs

    def kill(self):
        """Stop what still runs (also the runs not started yet)."""
        self.stopped = True
        if self.proc is not None:  # the script, mpirun and its ranks (setsid or not)
            kill_tree(self.proc, self.token)
        self.thread.join(10)


@pytest.fixture(scope="module")
def imagenet_one_node(cluster):
    """The reference: imagenet_resnet50.sbatch with 2 ranks on node3 (started at once)."""
    folder = _jobs(cluster, "imagenet-one-node")
    run = OneNode(cluster, folder, [("imagenet_resnet50", job_env(
        cluster, IMAGENET, MODEL_DIR=folder / "model"))])
    yield run, folder / "model"
    run.kill()


def test_placement_line_flags_local_ranks_that_disagree_with_host_names():
    ok = [(0, "node1", 0, 2), (1, "node1", 1, 2), (2, "node2", 0, 2), (3, "node2", 1, 2)]
    assert describe_placement(ok) == ("horovod: 4 rank(s) on 2 host(s): node1 rank 0,1 "
                                      "local_size 2; node2 rank 2,3 local_size 2")
    # Every container named "worker" but Horovod told they are 2 hosts: per-node work
    # (one writer per node, thread split by local_size) would go wrong.
    same_name = [(0, "worker", 0, 1), (1, "worker", 0, 1)]
    first, warning = describe_placement(same_name).split("\n")
    assert first == "horovod: 2 rank(s) on 1 host(s): worker rank 0,1 local_size 1"
    assert warning.startswith("horovod: warning: local ranks do not match host names on "
                              "worker")
    many = [(r, f"n{r // 2}", r % 2, 2) for r in range(40)]
    assert describe_placement(many).endswith("n7 rank 14,15 local_size 2; ... (12 more)")


def test_cluster_is_up_on_three_named_nodes_without_touching_the_host(cluster):
    assert cluster.node_states() == {"node1": "idle", "node2": "idle", "node3": "idle"}
    proc = cluster.run("srun", "--nodes=3", "--ntasks-per-node=1", "--label", "sh", "-c",
                       "echo $(hostname) $(ip -o -4 addr show eth0 | awk '{print $4}')",
                       timeout=60)
    lines = sorted(proc.stdout.split("\n")[:-1])
    assert lines == [f"{i - 1}: node{i} 10.77.0.{i}/24" for i in (1, 2, 3)], proc.stdout
    # Idempotent: a second `up` changes nothing and starts nothing.
    pids = {name: cluster.pid(name) for name in cluster.pidfiles}
    cluster.up()
    assert {name: cluster.pid(name) for name in cluster.pidfiles} == pids
    assert _host_state() == cluster.host_state_before


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_imagenet_on_two_nodes_matches_one_node(cluster, imagenet_one_node, launcher):
    folder = _jobs(cluster, f"imagenet-{launcher}")
    env = job_env(cluster, IMAGENET, LAUNCHER=launcher, MODEL_DIR=folder / "model")
    job_id, proc = sbatch(cluster, folder, "two-nodes", env, "--nodes=2",
                          "--ntasks-per-node=1")
    log = read(folder / f"two-nodes-{job_id}.out")
    info = _completed(cluster, job_id, proc, log)
    assert info["NodeList"] == "node[1-2]"
    assert f"[hpc-resnet] launcher {launcher} nodes 2 ranks 2 tasks_per_node 1 " in log
    command = {"srun": "srun --mpi=pmix ", "mpirun": "mpirun -np 2 "}[launcher]
    assert f"[hpc-resnet] command: {command}" in log
    assert _placement(log) == [(2, 2, "node1 rank 0 local_size 1; node2 rank 1 local_size 1")]
    result = summary(log)
    assert result["ranks"] == 2 and result["final_step"] == STEPS

    ref_log, = imagenet_one_node[0].wait()
    assert "node3 rank 0,1 local_size 2" in ref_log
    assert summary(ref_log)["final_step"] == STEPS
    final = f"ckpt-{STEPS:09d}/model.weights.h5"
    two, one = weights(folder / "model" / final), weights(imagenet_one_node[1] / final)
    start = weights(folder / "model" / "ckpt-000000001" / "model.weights.h5")
    assert sorted(two) == sorted(one)
    assert max(np.abs(two[k] - start[k]).max() for k in two) > 1e-4  # it did train
    for name in two:
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-6, err_msg=name)


def _eval_lines(folder):
    """What a layout's logs say about training and evaluation (for a failure message)."""
    return [line for log in sorted(folder.glob("*.out")) for line in read(log).splitlines()
            if "chexnet:" in line or "eval at step" in line or "mean AUROC" in line]


def _per_class_auroc(report_dir):
    values = json.loads((report_dir / "summary.json").read_text())["per_class_auroc"]
    assert any(v is not None for v in values.values()), values
    return values


def test_chexnet_train_and_evaluate_on_two_nodes_match_one_node(cluster):
    shared_data(CHEST / "images")
    folders, runs = {}, {}
    for layout in ("one-node", "two-nodes"):
        folder = folders[layout] = _jobs(cluster, f"chexnet-{layout}")
        train = dict(CHEXNET, MODEL_DIR=folder / "model")
        evaluate = dict(train, TASK="chexnet", EXTRA_FLAGS=" ".join(CHEXNET_DATA + [
            "--backbone=resnet18", "--image_size=32", f"--report_dir={folder / 'test'}"]))
        runs[layout] = [("chexnet_finetune", job_env(cluster, train)),
                        ("evaluate", job_env(cluster, evaluate))]
    one_node = OneNode(cluster, folders["one-node"], runs["one-node"])
    try:
        for script, env in runs["two-nodes"]:
            job_id, proc = sbatch(cluster, folders["two-nodes"], script, env, "--nodes=2",
                                  "--ntasks-per-node=1", script=script)
            log = read(folders["two-nodes"] / f"{script}-{job_id}.out")
            _completed(cluster, job_id, proc, log)
            assert [p[:2] for p in _placement(log)] == [(2, 2)], log[-3000:]
        one_node.wait()
    finally:
        one_node.kill()

    for report in ("model/report", "test"):  # validation during training, then test split
        two = _per_class_auroc(folders["two-nodes"] / report)
        one = _per_class_auroc(folders["one-node"] / report)
        assert two.keys() == one.keys()
        for name in two:
            if two[name] is None:
                assert one[name] is None, name
            else:
                assert two[name] == pytest.approx(one[name], abs=1e-9), (
                    report, name, two, one, *(_eval_lines(folders[k]) for k in folders))


def test_node_loss_requeues_and_resumes_on_the_live_nodes(cluster):
    steps, every = 8, 2
    folder = _jobs(cluster, "node-loss")
    model_dir = folder / "model"
    settings = dict(IMAGENET, TRAIN_STEPS=str(steps), ITERATIONS_PER_LOOP=str(every),
                    EXTRA_FLAGS=IMAGENET["EXTRA_FLAGS"] + " --keep_checkpoints=20")
    env = job_env(cluster, settings, MODEL_DIR=model_dir)
    job_id, proc = sbatch(cluster, folder, "node-loss", env, "--nodes=2",
                          "--ntasks-per-node=1", wait=False)
    assert proc.returncode == 0, proc.stderr
    log_path = folder / f"node-loss-{job_id}.out"
    # The reference: the same job uninterrupted, 2 ranks on node3 outside SLURM.
    reference_dir = _jobs(cluster, "node-loss-reference")
    reference = OneNode(cluster, reference_dir, [("imagenet_resnet50", job_env(
        cluster, settings, MODEL_DIR=reference_dir / "model"))])
    try:
        # Kill node2 once two checkpoints exist (the older one is surely complete).
        deadline = time.monotonic() + JOB_TIMEOUT
        while len(list(model_dir.glob("ckpt-*"))) < 2:
            state = cluster.job_info(job_id).get("JobState")
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), (
                f"job {job_id} ended ({state}) before 2 checkpoints\n{read(log_path)[-5000:]}")
            assert time.monotonic() < deadline, f"no 2 checkpoints in {JOB_TIMEOUT}s"
            time.sleep(0.3)
        assert cluster.job_info(job_id)["NodeList"] == "node[1-2]"
        cluster.kill_node("node2")
        killed = time.monotonic()

        # The job ends and is requeued by SLURM (no one resubmits it).
        while True:
            info = cluster.job_info(job_id)
            if int(info.get("Restarts", 0)) >= 1 and info["JobState"] != "COMPLETING":
                break
            assert time.monotonic() - killed < 120, f"job still {info.get('JobState')} " \
                f"120 s after node2 was killed\n{read(log_path)[-5000:]}"
            time.sleep(0.5)
        ended_after = time.monotonic() - killed
        newest = max(int(p.name[5:]) for p in model_dir.glob("ckpt-*"))
        assert cluster.node_state("node2").startswith("down")

        info = cluster.wait_job(job_id, timeout=JOB_TIMEOUT)
        log = read(log_path)
        assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}"
        assert info["Restarts"] == "1" and info["NodeList"] == "node[1,3]"
        first, sep, second = log.partition("restart_count 1")
        assert sep and "DUE TO NODE FAILURE" in first, log[-6000:]
        reached = max(int(s) for s in re.findall(r"^step +(\d+)/", first, re.M))
        assert reached < steps, "the job finished before node2 was killed"
        assert _placement(second) == [
            (2, 2, "node1 rank 0 local_size 1; node3 rank 1 local_size 1")]
        resumed = re.search(r"resuming from \S+/ckpt-(\d+) at step (\d+)", second)
        assert resumed, second[-5000:]
        at = int(resumed.group(2))
        assert at == int(resumed.group(1)) == newest > 0
        assert reached - at <= every  # at most one checkpoint interval lost
        result = summary(second)
        assert result["start_step"] == at and result["final_step"] == steps
        print(f"node2 killed at step {reached}; job requeued after {ended_after:.1f} s; "
              f"resumed at step {at}")
        # What the resumed job ends with is what the uninterrupted one ends with (the
        # layouts' tolerance, as test_imagenet_on_two_nodes_matches_one_node).
        reference.wait()
        assert_same_state(newest_state(model_dir), newest_state(reference_dir / "model"),
                          atol=1e-6)
    finally:
        reference.kill()
        cluster.run("scancel", job_id, check=False)
        with owned_by_session():  # the module's cluster, not this test's
            cluster.up()  # brings node2 back (idempotent for the rest)
    assert cluster.node_states() == {"node1": "idle", "node2": "idle", "node3": "idle"}


def test_elastic_job_loses_a_node_and_finishes_on_the_other(cluster):
    """ELASTIC=1 on 2 nodes (sbatch --no-kill): horovodrun on node1 starts node2's rank over
    ssh (each node runs sshd); node2 is killed mid-run; the rank on node1 goes back to the
    last commit and finishes every step alone, in the same allocation (no requeue)."""
    steps = 12
    folder = _jobs(cluster, "elastic")
    model_dir = folder / "model"
    env = job_env(cluster, IMAGENET, TRAIN_STEPS=str(steps), ITERATIONS_PER_LOOP="2",
                  MODEL_DIR=model_dir, ELASTIC="1", MIN_NP="1", ELASTIC_CACHE_S="0",
                  EXTRA_FLAGS=IMAGENET["EXTRA_FLAGS"] + " --elastic_commit_steps=1 "
                  "--keep_checkpoints=20 --stall_timeout_s=300")
    job_id, proc = sbatch(cluster, folder, "elastic", env, "--nodes=2", "--ntasks-per-node=1",
                          "--no-kill", wait=False)
    assert proc.returncode == 0, proc.stderr
    log_path = folder / f"elastic-{job_id}.out"
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not list(model_dir.glob("ckpt-*")):
            state = cluster.job_info(job_id).get("JobState")
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), (
                f"job {job_id} ended ({state}) before a checkpoint\n{read(log_path)[-5000:]}")
            assert time.monotonic() < deadline, f"no checkpoint in {JOB_TIMEOUT}s"
            time.sleep(0.3)
        cluster.kill_node("node2")
        info = cluster.wait_job(job_id, timeout=JOB_TIMEOUT)
        log = read(log_path)
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (
            f"{info}\n{log[-6000:]}")
        # Horovod's driver picks which node holds rank 0; the survivor is node1's rank.
        first, last = _placement(log)
        assert first in [(2, 2, "node1 rank 0 local_size 1; node2 rank 1 local_size 1"),
                         (2, 2, "node2 rank 0 local_size 1; node1 rank 1 local_size 1")]
        assert last == (1, 1, "node1 rank 0 local_size 1"), log[-6000:]
        result = summary(log)
        assert (result["final_step"], result["ranks"]) == (steps, 1), log[-6000:]
        (change,) = result["world_size_changes"]
        assert (change["old_size"], change["new_size"]) == (2, 1)
        assert 0 < change["step"] < steps
        final = weights(model_dir / f"ckpt-{steps:09d}" / "model.weights.h5")
        assert all(np.isfinite(w).all() for w in final.values())
        print(f"elastic: node2 killed, world 2 -> 1 at step {change['step']}, "
              f"{change['seconds_lost']:.1f} s lost")
    finally:
        cluster.run("scancel", job_id, check=False)
        with owned_by_session():
            cluster.up()  # brings node2 back
    assert cluster.node_states() == {"node1": "idle", "node2": "idle", "node3": "idle"}


def _down_and_check(vc, what):
    """`down`, timed; then no daemon, namespace or link of `vc` is left."""
    t0 = time.monotonic()
    vc.down()
    print(f"{what}: {time.monotonic() - t0:.1f} s")
    assert vc.leftovers() == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=10).stdout
    assert not any(ns in listed for ns in [*vc.netns.values(), vc.switch])


def test_down_removes_everything_also_after_a_failed_up(monkeypatch):
    run_dir = _new_run_dir()
    vc = VirtualCluster(run_dir, nodes=2)
    real_which = cluster_lib.which
    monkeypatch.setattr("slurm.cluster.which",
                        lambda name: "/bin/false" if name == "slurmctld" else real_which(name))
    try:
        with pytest.raises(ClusterError, match="slurmctld failed to start"):
            vc.up(timeout=20)
        assert vc.alive("munged") and vc.anchor_pid("node2")  # half up
        assert any(ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                        text=True, timeout=10).stdout for ns in vc.netns.values())
        _down_and_check(vc, "down after a failed up")
    finally:
        vc.down()
        _remove_run_dir(run_dir)


def test_down_leaves_nothing_behind(cluster):
    run_dir = str(cluster.root)
    _down_and_check(cluster, "down")
    assert _host_state() == cluster.host_state_before
    mine = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if run_dir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                mine.append(pid)
        except OSError:
            pass
    assert mine == [], f"processes still using {run_dir}: {mine}"
