"""Submitting the project's batch scripts to a test SLURM (slurm.cluster or
slurm.virtual_cluster) and reading what they left: shared by test_slurm and test_multinode."""
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, child_env

SLURM_DIR = ROOT / "slurm"
JOB_TIMEOUT = 300  # s, per job: two TF start-ups of 2 ranks on 2 shared cores fit easily

# A tiny synthetic run; every knob is an environment variable of the batch script.
TINY = {"SYNTHETIC": "1", "DEPTH": "18", "IMAGE_SIZE": "32", "BATCH": "8",
        "NUM_TRAIN_IMAGES": "80", "MODE": "train", "ITERATIONS_PER_LOOP": "2",
        "EXTRA_FLAGS": "--num_label_classes=10 --log_every_n_steps=2 --keep_checkpoints=20",
        "PYTHON": sys.executable,
        "TF_CPP_MIN_LOG_LEVEL": "2"}


def summary(log_text):
    """The last `SUMMARY {json}` line of a job log, as a dict (an elastic horovodrun
    prefixes lines with "[slot]<stdout>:")."""
    lines = [line.split("SUMMARY ", 1)[1] for line in log_text.splitlines()
             if line.startswith("SUMMARY ") or re.match(r"\[\d+\]<stdout>:SUMMARY ", line)]
    assert lines, f"no SUMMARY line in the log:\n{log_text[-3000:]}"
    return json.loads(lines[-1])


def read(path):
    return path.read_text(errors="replace") if path.exists() else f"<no log at {path}>"


def job_env(cluster, base=TINY, **extra):
    """The environment sbatch exports to a job: `base` (TINY) with `extra` on top."""
    env = {k: v for k, v in base.items() if v}
    env.update(extra)
    return cluster.env(base=child_env(**env))


def sbatch(cluster, out_dir, name, env, *args, script="imagenet_resnet50", wait=True,
           timeout=JOB_TIMEOUT):
    """Submit slurm/<script>.sbatch (log: out_dir/<name>-<id>.out); returns (job id, proc)."""
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={out_dir}/%x-%j.out",
           f"--chdir={out_dir}", "--time=10", *(["--wait"] if wait else []), *args,
           str(SLURM_DIR / f"{script}.sbatch")]
    try:
        proc = subprocess.run(cluster.command(*cmd), env=env, capture_output=True, text=True,
                              timeout=timeout if wait else 30)
    except subprocess.TimeoutExpired:
        logs = "\n".join(read(p)[-3000:] for p in out_dir.glob(f"{name}-*.out"))
        pytest.fail(f"{' '.join(cmd)} did not return in {timeout}s\n{logs}")
    match = re.search(r"^(\d+)", proc.stdout.strip())
    assert match, (f"sbatch printed no job id (rc {proc.returncode}): {proc.stdout}{proc.stderr}"
                   f"\n{cluster.log_tail('slurmctld')}")
    return match.group(1), proc
