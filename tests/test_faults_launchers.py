"""Faults across real launchers (slow): a stopped rank under mpirun and horovodrun --gloo
ends the job through the stall watchdog naming it (MPI alone would wait forever); SIGTERM to
one rank stops both at an agreed step with a checkpoint and exit 75, and the rerun resumes
there and ends with the weights of an uninterrupted run; a diverging learning rate exits
non-zero naming the step with no non-finite checkpoint; on 2 ranks, a non-finite loss and a
full disk stop both ranks, each with its one line. Durations are printed, not asserted:
the bounds below are generous (a loaded 2-core machine), the assertions are on what ended
the job."""
import json
import os
import re
import signal
import subprocess
import time

import pytest

from hooks.distributed import watchdog
from hooks.state import faults
from tests import checkpoint_values
from tests.conftest import (
    horovodrun_cmd,
    kill_group,
    mpirun_cmd,
    python_cmd,
    rank_pids,
    run_cmd,
    start_group,
    wait_for_checkpoint,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TINY = ["resnet_main.py", "--use_synthetic_data", "--mode=train", "--resnet_depth=18",
        "--image_size=32", "--train_batch_size=4", "--num_label_classes=5",
        "--num_train_images=400", "--iterations_per_loop=2", "--log_every_n_steps=1",
        "--warmup_epochs=0"]


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_a_stopped_rank_ends_the_job_naming_it(launcher, tmp_path):
    model_dir = tmp_path / "run"
    timeout = 20
    args = [*TINY, "--train_steps=100000", f"--model_dir={model_dir}",
            f"--stall_timeout_s={timeout}"]
    cmd = horovodrun_cmd(2, *args) if launcher == "horovodrun" else mpirun_cmd(2, *args)
    proc = start_group(cmd)
    try:
        wait_for_checkpoint(proc, model_dir)
        pids = rank_pids("resnet_main.py", model_dir)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        out, _ = proc.communicate(timeout=10 * timeout)  # MPI alone: forever
        took = time.monotonic() - stopped
    finally:
        kill_group(proc)
    print(f"\n{launcher}: job ended {took:.1f} s after SIGSTOP (timeout {timeout} s)")
    assert proc.returncode != 0
    line = next(l for l in out.splitlines() if "stall: rank 0 of 2" in l)
    assert "stalled rank(s): 1 (" in line and f"exit {watchdog.STALL_EXIT_CODE}" in line


def test_sigterm_to_one_rank_stops_both_with_a_checkpoint_then_resumes(tmp_path):
    """...and the rerun ends with the weights and optimizer state of an uninterrupted run
    of the same steps (same seed, world and threads; a schedule at fixed epochs)."""
    model_dir = tmp_path / "run"
    seeded = [*TINY, "--lr_schedule=tpu_2018", "--seed=13", "--num_intra_threads=1",
              "--num_inter_threads=1"]
    args = [*seeded, "--train_steps=100000", f"--model_dir={model_dir}"]
    proc = start_group(horovodrun_cmd(2, *args))
    try:
        wait_for_checkpoint(proc, model_dir)
        # as SLURM signals a task
        os.kill(rank_pids("resnet_main.py", model_dir)[1], signal.SIGTERM)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=300)  # agreeing on a step takes a few steps
        took = time.monotonic() - t0
    finally:
        kill_group(proc)
    print(f"\nhorovodrun: both ranks stopped {took:.1f} s after SIGTERM")
    assert proc.returncode != 0  # horovodrun reports the ranks' exit 75 as a failure
    lines = [l for l in out.splitlines() if "preempted: stopped by" in l]
    assert len(lines) == 2, out[-3000:]  # both ranks, the same step
    steps = {int(l.split(" at step ")[1].split(";")[0]) for l in lines}
    assert len(steps) == 1 and f"exit {faults.PREEMPTED_EXIT_CODE}" in lines[0]
    (stop,) = steps
    assert (model_dir / f"ckpt-{stop:09d}").is_dir()

    rerun = run_cmd(horovodrun_cmd(2, *seeded, f"--train_steps={stop + 2}",
                                   f"--model_dir={model_dir}"))
    assert f"resuming from {model_dir / f'ckpt-{stop:09d}'} at step {stop}" in rerun.stdout
    summary = json.loads(rerun.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert (summary["start_step"], summary["final_step"]) == (stop, stop + 2)
    reference = tmp_path / "reference"
    run_cmd(horovodrun_cmd(2, *seeded, f"--train_steps={stop + 2}", f"--model_dir={reference}"))
    resumed = checkpoint_values.newest_state(model_dir)
    checkpoint_values.assert_same_state(resumed, checkpoint_values.newest_state(reference),
                                        atol=checkpoint_values.RESUME_ATOL)
    checkpoint_values.assert_trained(resumed, checkpoint_values.state(
        model_dir / f"ckpt-{stop:09d}"))


def test_single_process_sigterm_exits_75(tmp_path):
    model_dir = tmp_path / "run"
    proc = start_group(python_cmd(*TINY, "--train_steps=100000", f"--model_dir={model_dir}"))
    try:
        wait_for_checkpoint(proc, model_dir)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    assert proc.returncode == faults.PREEMPTED_EXIT_CODE, out[-2000:]


def test_divergence_exits_naming_the_step_and_keeps_checkpoints_finite(tmp_path):
    model_dir = tmp_path / "run"
    args = [*TINY, f"--model_dir={model_dir}"]
    # Two sane steps first: ckpt-2 holds good weights. The diverging run writes its next
    # checkpoint only at step 8 (--iterations_per_loop=6): a huge rate can leave finite but
    # ruined weights for a few steps before the loss overflows, and no rerun recovers from
    # a checkpoint of those.
    run_cmd(python_cmd(*args, "--train_steps=2", "--base_learning_rate=0.1"))
    proc = run_cmd(python_cmd(*args, "--train_steps=8", "--iterations_per_loop=6",
                              "--base_learning_rate=1e30"), check=False)
    assert proc.returncode == 1, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("resnet_main: error: training diverged:") and "at step" in last
    assert "no checkpoint was written after step 2" in last
    assert "Traceback" not in proc.stderr
    step = int(last.split(" at step ")[1].split(";")[0])
    saved = sorted(int(p.name.split("-")[1]) for p in model_dir.glob("ckpt-*"))
    assert saved == [2] and 2 < step <= 8
    # A saner learning rate resumes from the newest good checkpoint and finishes.
    rerun = run_cmd(python_cmd(*args, "--train_steps=8", "--base_learning_rate=0.1"))
    assert f"at step {saved[-1]}" in rerun.stdout


def _rank_lines(out, needle):
    """{rank: line} of the lines holding `needle`, from horovodrun's `[rank]<stream>:`
    prefixes."""
    found = {}
    for line in out.splitlines():
        match = re.match(r"^\[(\d+)\]<std(?:out|err)>:(.*)$", line)
        if match and needle in match.group(2):
            found[int(match.group(1))] = match.group(2)
    return found


def test_two_ranks_stop_together_on_a_non_finite_loss(tmp_path):
    model_dir = tmp_path / "run"
    proc = run_cmd(horovodrun_cmd(2, *TINY, f"--model_dir={model_dir}", "--train_steps=8",
                                  "--iterations_per_loop=8", "--base_learning_rate=1e30"),
                   check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    lines = _rank_lines(out, "error: training diverged")
    assert sorted(lines) == [0, 1], out[-3000:]  # both ranks, each with its one line
    steps = {int(line.split(" at step ")[1].split(";")[0]) for line in lines.values()}
    assert len(steps) == 1, lines  # at the same step
    assert not list(model_dir.glob("ckpt-*"))  # nothing non-finite written


def test_two_ranks_stop_together_on_a_full_disk(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        proc = run_cmd(horovodrun_cmd(2, *TINY, f"--model_dir={small / 'run'}",
                                      "--train_steps=4"), check=False)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    # Rank 0 names the disk; rank 1, which only waited for it, points at rank 0's line.
    assert sorted(_rank_lines(out, "no space left on device")) == [0], out[-3000:]
    assert sorted(_rank_lines(out, "error: rank 0 could not write a checkpoint")) == [1], (
        out[-3000:])
    # No traceback of ours: no frame names this project's files. (Not ours: h5py's report,
    # at exit, that the failed file could not be flushed, "Exception ignored in ...
    # __dealloc__", and horovodrun's own RuntimeError naming the rank that exited first;
    # which rank that is, is a race.)
    ours = [line for line in out.splitlines()
            if re.search(r'File ".*(resnet_main\.py|/hooks/|/imagenet/|/flags/)', line)]
    assert not ours, out[-3000:]
