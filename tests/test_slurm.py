"""The project's batch scripts on a real single-node SLURM, and the same script under mpirun.

`pytest -m slurm` brings up munged + slurmctld + slurmd on this machine (slurm/cluster.py,
Debian packages: `make cluster-deps`), then:
  * `sbatch --wait slurm/imagenet_resnet50.sbatch` on a tiny synthetic config with 2 tasks:
    the job is COMPLETED and its log shows 2 ranks and the final SUMMARY;
  * a second job gets the time-limit notice (USR1 to the batch shell) once it has written
    checkpoints: its ranks stop at one step with a checkpoint, it requeues itself and the
    restarted run resumes at exactly that step and finishes with the weights and optimizer
    state of the same job run uninterrupted.
`pytest -m distributed -k outside_slurm` runs the same script with LAUNCHER=mpirun NP=2.
Every wait is bounded; the daemons are stopped by their pid files at the end.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slurm.cluster import ClusterError, SlurmCluster
from tests.checkpoint_values import RESUME_ATOL, assert_same_state, newest_state
from tests.conftest import ROOT, child_env
from tests.slurm_jobs import JOB_TIMEOUT, TINY, job_env, read, sbatch, summary

SCRIPT = ROOT / "slurm" / "imagenet_resnet50.sbatch"


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("the slurm tests start munged/slurmctld/slurmd as root; run them as root "
                    "or deselect them with -m 'not slurm'")
    # A short path: slurmd's and PMIx's unix sockets live under it (108-byte limit). Not
    # pytest's 0700 basetemp: munged wants every folder above its socket searchable.
    root = Path(tempfile.mkdtemp(prefix="hr-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start(timeout=60)
    except ClusterError as exc:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not bring up the test SLURM cluster: {exc}", pytrace=False)
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slurm
def test_sbatch_wait_runs_two_ranks_to_completion(cluster, tmp_path):
    steps = 4
    env = job_env(cluster, TRAIN_STEPS=steps, MODEL_DIR=tmp_path / "model")
    job_id, proc = sbatch(cluster, tmp_path, "hr-tiny", env, wait=True)
    log = read(tmp_path / f"hr-tiny-{job_id}.out")
    info = cluster.job_info(job_id)
    assert proc.returncode == 0 and info.get("JobState") == "COMPLETED", (
        f"job {job_id}: sbatch --wait rc {proc.returncode}, JobState {info.get('JobState')}, "
        f"ExitCode {info.get('ExitCode')}\n{proc.stderr}\n--- job log\n{log[-5000:]}")
    assert info.get("ExitCode") == "0:0"
    assert "[hpc-resnet] launcher srun nodes 1 ranks 2 " in log
    assert "2 rank(s)" in log and "starting from step 0" in log
    result = summary(log)
    assert result["ranks"] == 2
    assert result["final_step"] == steps and result["start_step"] == 0
    assert sorted(p.name for p in (tmp_path / "model").glob("ckpt-*"))[-1] == f"ckpt-{steps:09d}"


@pytest.mark.slurm
def test_time_limit_notice_checkpoints_requeues_and_resumes_at_that_step(cluster, tmp_path):
    steps = 24
    model_dir = tmp_path / "model"
    seeded = dict(TINY, EXTRA_FLAGS=TINY["EXTRA_FLAGS"] + " --seed=5")
    env = job_env(cluster, seeded, TRAIN_STEPS=steps, MODEL_DIR=model_dir)
    job_id, proc = sbatch(cluster, tmp_path, "hr-requeue", env, wait=False)
    assert proc.returncode == 0, proc.stderr
    log_path = tmp_path / f"hr-requeue-{job_id}.out"

    # Requeue once two checkpoints exist (so the older one is surely complete), mid-run.
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        ckpts = sorted(model_dir.glob("ckpt-*"))
        if len(ckpts) >= 2:
            break
        state = cluster.job_info(job_id).get("JobState")
        if state not in ("PENDING", "CONFIGURING", "RUNNING"):
            pytest.fail(f"job {job_id} ended ({state}) before writing 2 checkpoints\n"
                        f"{read(log_path)[-5000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id}: no 2 checkpoints in {model_dir} after {JOB_TIMEOUT}s"
                        f" (state {state})\n{read(log_path)[-5000:]}")
        time.sleep(0.5)
    assert "SUMMARY" not in read(log_path), "the job finished before it could be requeued"
    # The time-limit notice (#SBATCH --signal=B:USR1@300), sent now: the script forwards it,
    # the ranks checkpoint at one step and exit 75, and the script requeues the job.
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    try:
        info = cluster.wait_job(job_id, timeout=JOB_TIMEOUT)
    except ClusterError as exc:
        pytest.fail(f"{exc}\n--- job log\n{read(log_path)[-5000:]}")
    log = read(log_path)
    assert info["JobState"] == "COMPLETED", f"{info}\n--- job log\n{log[-5000:]}"
    assert info.get("Restarts") == "1"
    # Both attempts append to the one per-job log (--open-mode=append).
    first, sep, second = log.partition("restart_count 1")
    assert sep, f"no restarted attempt in the log:\n{log[-5000:]}"
    assert "starting from step 0" in first and "requeueing job" in first
    stopped = {int(s) for s in re.findall(r"preempted: stopped by SIGUSR1 at step (\d+)", first)}
    assert len(stopped) == 1, f"ranks did not agree on one step:\n{first[-5000:]}"
    match = re.search(r"2 rank\(s\).*resuming from (\S+) at step (\d+)", second)
    assert match, f"the requeued attempt did not resume:\n{second[-5000:]}"
    resumed_at = int(match.group(2))
    assert {resumed_at} == stopped and 0 < resumed_at < steps  # no step lost
    assert os.path.basename(match.group(1)) == f"ckpt-{resumed_at:09d}"
    result = summary(second)
    assert result["ranks"] == 2
    assert result["start_step"] == resumed_at and result["final_step"] == steps
    # It ends with the weights and optimizer state of the same job run uninterrupted.
    reference = tmp_path / "reference"
    ref_env = job_env(cluster, seeded, TRAIN_STEPS=steps, MODEL_DIR=reference / "model")
    reference.mkdir()
    job_id, proc = sbatch(cluster, reference, "hr-reference", ref_env, wait=True)
    assert proc.returncode == 0, read(reference / f"hr-reference-{job_id}.out")[-5000:]
    assert_same_state(newest_state(model_dir), newest_state(reference / "model"),
                      atol=RESUME_ATOL)


@pytest.mark.distributed
def test_batch_script_runs_outside_slurm_with_mpirun(tmp_path):
    steps = 4
    env = child_env(**{k: v for k, v in TINY.items() if v}, LAUNCHER="mpirun", NP=2,
                    TRAIN_STEPS=steps, MODEL_DIR=tmp_path / "model")
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        del env[key]  # as on a machine without SLURM, even when pytest runs inside a job
    try:
        proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bash {SCRIPT} did not finish in {JOB_TIMEOUT}s\n{exc.stdout}{exc.stderr}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "[hpc-resnet] launcher mpirun nodes 1 ranks 2 " in out
    assert "--map-by socket --bind-to socket" in out
    result = summary(proc.stdout)
    assert result["ranks"] == 2 and result["final_step"] == steps


@pytest.mark.slurm
def test_submit_helper_sizes_tasks_from_the_partition(cluster):
    proc = subprocess.run([sys.executable, "-m", "slurm.submit", "--nodes", "1", "--dry-run",
                           "imagenet_resnet50", "--set", "BATCH=16"], cwd=ROOT,
                          env=cluster.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cpus_per_task = max(1, cluster.cpus // 2)
    assert proc.stdout.strip() == (
        f"BATCH=16 sbatch --nodes=1 --ntasks-per-node=2 --cpus-per-task={cpus_per_task} "
        f"{SCRIPT}")
