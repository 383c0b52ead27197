"""Elastic training (hooks/distributed/elastic.py, docs/elastic.md).

In-process (fast): a reset after a simulated worker failure or host change goes back to the
last commit and ends with exactly the weights of an uninterrupted run; what the state holds;
the launch check. Under `horovodrun --gloo --min-np 1 --max-np 2 --host-discovery-script`
(slow): two workers as two host names of this machine (`localhost`, `127.0.0.1`); kill -9 of
one and the run finishes on the survivor; a host added mid-run joins with identical weights;
the same for `chexnet train` (losing rank 0). The change is made while every rank waits at
a gate after a chosen step (tests/workers/elastic_gate.py), so it cannot race the run's end."""
import json
import os
import signal
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from hooks.distributed import elastic, elastic_launch, horovod_glue
from hooks.distributed.horovod_glue import Context, DistributedTrainer
from hooks.errors import ConfigError
from hooks.state import checkpoints
from hooks.training import callbacks as cb
from hooks.training import loop
from tests import checkpoint_values
from tests.conftest import (
    BIN,
    horovodrun_cmd,
    kill_group,
    python_cmd,
    rank_pids,
    run_cmd,
    start_group,
    wait_until,
)
from tests.test_loop import _xray_sample

TOTAL, COMMIT = 12, 2


def _trainer():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    net = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="tiny")
    trainer = DistributedTrainer(net, Context())
    trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return trainer


def _batches(context, step):
    """Global step s always reads the same batch: the position is the step."""
    def batch(s):
        x = tf.random.stateless_normal([2, 3], seed=tf.stack([s, tf.constant(7, tf.int64)]))
        return x, tf.cast(x[:, 0] > 0, tf.int32)
    return tf.data.Dataset.range(step, 10**6).map(batch)


class _Once(keras.callbacks.Callback):
    """Calls `action()` once, after global step `at`."""

    def __init__(self, at, action):
        super().__init__()
        self.at, self.action, self.done = at, action, False

    def on_train_batch_end(self, batch, logs=None):
        if not self.done and int(self.model.optimizer.iterations.numpy()) == self.at:
            self.done = True
            self.action()


def _train(trainer, extra=(), commit=COMMIT, **kwargs):
    lines = []
    result = loop.train(trainer, loop.Input(make=_batches), loop.Plan(TOTAL, 4, 2, 4),
                        context=Context(), elastic=loop.Elastic(commit),
                        extra_callbacks=list(extra), progress=loop.Progress(lines.append),
                        **kwargs)
    return result, lines


@pytest.fixture(autouse=True)
def _no_horovod_restart(monkeypatch):
    """In-process, a reset re-forms the same 1-rank world without restarting Horovod (an
    MPI-enabled Horovod cannot initialise again after its shutdown in one process; the
    real restart runs under horovodrun below)."""
    monkeypatch.setattr(horovod_glue, "reinit", Context)


def _fail():
    raise tf.errors.UnknownError(None, None, "HorovodGroupedAllreduce: Gloo read error: "
                                             "Connection reset by peer")


@pytest.fixture(scope="module")
def uninterrupted():
    trainer = _trainer()
    result, lines = _train(trainer)
    assert result.final_step == TOTAL and result.practices["world_size_changes"] == []
    assert any("identical on 1 rank(s)" in line for line in lines)
    return [v.numpy() for v in trainer.network.trainable_variables]


def test_a_failure_goes_back_to_the_last_commit_and_redoes_the_steps(uninterrupted):
    trainer = _trainer()
    result, lines = _train(trainer, [_Once(5, _fail)])
    (change,) = result.practices["world_size_changes"]
    # Committed at step 4, failed after step 5: step 5 is done again, from the same batch.
    assert {k: change[k] for k in ("step", "old_size", "new_size", "steps_redone", "reason")} \
        == {"step": 4, "old_size": 1, "new_size": 1, "steps_redone": 1,
            "reason": "a worker failed"}
    assert change["seconds_lost"] > 0
    assert result.practices["elastic_seconds_lost"] == change["seconds_lost"]
    assert result.final_step == TOTAL
    assert any(line.startswith("elastic: world size 1 -> 1 at step 4 (a worker failed; 1 "
                               "steps redone)") for line in lines)
    for got, want in zip(trainer.network.trainable_variables, uninterrupted):
        np.testing.assert_array_equal(got.numpy(), want)


def test_a_host_change_resets_at_the_next_commit_and_loses_nothing(uninterrupted):
    from horovod.common.elastic import notification_manager
    from horovod.runner.elastic.worker import HostUpdateResult

    trainer = _trainer()
    # What the driver's message does in a real job: every rank raises at the next commit.
    notify = _Once(5, lambda: notification_manager.handle_hosts_updated(
        int(time.time()), HostUpdateResult.added))
    result, _ = _train(trainer, [notify])
    (change,) = result.practices["world_size_changes"]
    assert (change["step"], change["steps_redone"], change["reason"]) == (
        6, 0, "hosts added or changed")
    for got, want in zip(trainer.network.trainable_variables, uninterrupted):
        np.testing.assert_array_equal(got.numpy(), want)


def test_other_errors_are_not_taken_for_a_lost_worker():
    def bug():
        raise tf.errors.InvalidArgumentError(None, None, "a shape mismatch")
    with pytest.raises(tf.errors.InvalidArgumentError, match="shape mismatch"):
        _train(_trainer(), [_Once(3, bug)])
    with pytest.raises(ValueError, match="boom"):
        _train(_trainer(), [_Once(3, lambda: (_ for _ in ()).throw(ValueError("boom")))])


def test_state_restores_variables_and_callback_state():
    trainer = _trainer()
    factor = keras.Variable(1.0)
    plateau = cb.ReduceOnPlateau(type("S", (), {"factor": factor})(), patience=1, factor=0.5)
    state = elastic.TrainingState(trainer, [factor], {"plateau": plateau})
    kernel = trainer.network.trainable_variables[0]
    before = kernel.numpy().copy()
    kernel.assign(before + 1)
    factor.assign(0.25)
    trainer.optimizer.iterations.assign(9)
    plateau.best, plateau.wait = 0.5, 3
    state.restore()  # back to the state at construction (its first save)
    np.testing.assert_array_equal(kernel.numpy(), before)
    assert (float(factor.numpy()), int(trainer.optimizer.iterations.numpy())) == (1.0, 0)
    assert (plateau.best, plateau.wait) == (float("inf"), 0)
    plateau.best = 0.5
    state.commit()
    plateau.best = 0.1
    state.restore()
    assert plateau.best == 0.5 and state.committed_step == 0


def test_elastic_launch_needs_the_flag():
    elastic_launch.check_launch(True, None, {"HOROVOD_ELASTIC": "1"})
    elastic_launch.check_launch(False, None, {})
    with pytest.raises(ConfigError, match="pass --elastic"):
        elastic_launch.check_launch(False, None, {"HOROVOD_ELASTIC": "1"})


def test_our_horovod_keeps_a_fixed_cycle_time_in_elastic_jobs():
    # The installed Horovod is the one scripts/build_horovod.sh built: with patch 0002, so
    # an elastic job takes a fixed cycle time (tests/test_horovod_patches.py checks it).
    assert elastic_launch.reinit_keeps_cycle_time()
    elastic_launch.check_launch(True, 10.0, {"HOROVOD_ELASTIC": "1"})
    elastic_launch.check_launch(True, None, {"HOROVOD_ELASTIC": "1", "HOROVOD_CYCLE_TIME": "5"})


def test_elastic_launch_refuses_a_fixed_cycle_time_on_an_unpatched_horovod(monkeypatch):
    # Unpatched Horovod 0.28.1 re-initialised with a fixed cycle time fuses with a 1 MB
    # threshold (a new worker with 128 MB): Gloo aborted right after a worker joined.
    with pytest.raises(ConfigError, match=r"^--cycle_time_ms=10 cannot be used in an "
                                          r"elastic job with this Horovod: it lacks our "
                                          r"patch 0002-parameter-manager-reinit.patch"):
        elastic_launch.check_launch(True, 10.0, {"HOROVOD_ELASTIC": "1"}, reinit_safe=False)
    with pytest.raises(ConfigError, match=r"^HOROVOD_CYCLE_TIME=5 cannot be used"):
        elastic_launch.check_launch(True, None, {"HOROVOD_ELASTIC": "1",
                                                 "HOROVOD_CYCLE_TIME": "5"}, reinit_safe=False)
    elastic_launch.check_launch(False, 10.0, {"HOROVOD_CYCLE_TIME": "5"},
                                reinit_safe=False)  # not elastic
    # There the project's 10 ms default is for non-elastic jobs only.
    hvd = horovod_glue._hvd()
    monkeypatch.setattr(hvd, "init", lambda: None)
    monkeypatch.setattr(hvd, "is_initialized", lambda: False)
    monkeypatch.setattr(horovod_glue, "_current_context", Context)
    monkeypatch.setattr(elastic_launch, "reinit_keeps_cycle_time", lambda: False)
    monkeypatch.delenv("HOROVOD_CYCLE_TIME", raising=False)
    monkeypatch.setenv("HOROVOD_ELASTIC", "1")
    horovod_glue.init()
    assert "HOROVOD_CYCLE_TIME" not in os.environ
    monkeypatch.setattr(elastic_launch, "reinit_keeps_cycle_time", lambda: True)
    horovod_glue.init()  # our build: the default applies in elastic jobs too
    assert os.environ["HOROVOD_CYCLE_TIME"] == str(horovod_glue.DEFAULT_CYCLE_TIME_MS)
    monkeypatch.delenv("HOROVOD_CYCLE_TIME")
    monkeypatch.delenv("HOROVOD_ELASTIC")
    monkeypatch.setattr(elastic_launch, "reinit_keeps_cycle_time", lambda: False)
    monkeypatch.setattr(horovod_glue, "placement", lambda context: [(0, "h", 0, 1)])
    horovod_glue.init()
    assert os.environ["HOROVOD_CYCLE_TIME"] == str(horovod_glue.DEFAULT_CYCLE_TIME_MS)


def test_any_world_size_takes_shares_of_the_same_global_batch():
    shares = [horovod_glue.rank_batch(7, Context(r, 3)) for r in range(3)]
    assert shares == [3, 2, 2]
    assert [horovod_glue.rank_batch(8, Context(r, 2)) for r in range(2)] == [4, 4]
    with pytest.raises(ConfigError, match=r"elastic: the world now has 3 ranks: the global "
                                          r"batch 2 is smaller than the 3 ranks"):
        loop._dataset_for(_batches, Context(0, 3), 0, global_batch=2)


def test_gradient_weight_scales_the_update():
    """A rank's gradient times n_r * size / B: with SGD (no momentum) the step scales."""
    steps = []
    for weight in (1.0, 0.5):
        trainer = _trainer()
        trainer.compile(optimizer=keras.optimizers.SGD(0.1),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        trainer.gradient_weight = weight
        kernel = trainer.network.trainable_variables[0]
        before = kernel.numpy().copy()
        trainer.fit(_batches(Context(), 0).take(1), shuffle=False, verbose=0)
        steps.append(kernel.numpy() - before)
    np.testing.assert_allclose(steps[1], steps[0] * 0.5, rtol=1e-5)
    assert np.abs(steps[0]).max() > 0


def test_non_chief_restores_the_newest_usable_checkpoint_without_moving_any(tmp_path):
    trainer = _trainer()
    trainer.optimizer.build(trainer.network.trainable_variables)
    for step in (2, 4):
        trainer.optimizer.iterations.assign(step)
        checkpoints.save(str(tmp_path), step, trainer.network, trainer.optimizer,
                         {"network": checkpoints.describe(trainer.network)})
    (tmp_path / "ckpt-000000004" / checkpoints.OPTIMIZER).write_bytes(b"damaged")
    other = _trainer()
    found = loop.restore_and_sync(str(tmp_path), other, other.optimizer, Context(1, 2),
                                  elastic=True)
    assert found.step == 2 and int(other.optimizer.iterations.numpy()) == 2
    assert (tmp_path / "ckpt-000000004").is_dir()  # left for rank 0 to move aside


def test_elastic_with_collapsed_ensemble_is_refused():
    from imagenet.config import RunConfig, validate
    with pytest.raises(ConfigError, match="--collapsed_ensemble"):
        validate(RunConfig(use_synthetic_data=True, elastic=True, collapsed_ensemble=True))


# ---------------------------------------------------------------- under horovodrun
# A schedule at fixed epochs and a seed: the reference runs (`_reference`) stop and resume
# where the elastic job changed worlds and must see the same learning rates and batches.
PLAIN = ["resnet_main.py", "--use_synthetic_data", "--mode=train", "--resnet_depth=18",
         "--image_size=32", "--train_batch_size=4", "--num_label_classes=5",
         "--num_train_images=400", "--log_every_n_steps=1", "--warmup_epochs=0",
         "--lr_schedule=tpu_2018", "--seed=17"]
TINY = [*PLAIN, "--iterations_per_loop=4", "--elastic", "--elastic_commit_steps=2",
        "--stall_timeout_s=120"]
# The elastic run and its reference: the same ops, seeds, batches and allreduce (a sum of
# 2 values is exact in either order), so bit for bit.
ELASTIC_ATOL = 0.0
HOSTS = ("localhost", "127.0.0.1")  # two names of this machine: two "hosts" for Horovod
GATE_STEP = 5  # between commits (every 2 steps) and after the first checkpoint (step 4)


def _elastic_cmd(discovery, gate, np_, *args):
    """horovodrun's elastic command; the ranks wait at the gate when the world has
    `gate[1]` ranks (tests/workers/elastic_gate.py)."""
    import sys
    gate_dir, size = gate
    return [BIN / "horovodrun", "--gloo", "-np", np_, "--min-np", "1", "--max-np", "2",
            "--network-interface", "lo", "--host-discovery-script", discovery,
            sys.executable, "-m", "tests.workers.elastic_gate", gate_dir, size, GATE_STEP,
            *args]


def _gate(tmp_path, size):
    (tmp_path / "gate").mkdir()
    return tmp_path / "gate", size


def _wait_at_gate(proc, gate, ranks):
    gate_dir, _ = gate
    wait_until(proc, lambda: all((gate_dir / f"waiting-{r}").exists() for r in ranks),
               f"ranks {list(ranks)} at the gate after step {GATE_STEP}")


def _set_hosts(listing, hosts):
    """Replace the host list in one step: the discovery script never reads half a file."""
    (listing.parent / "hosts.tmp").write_text("".join(f"{h}:1\n" for h in hosts))
    os.replace(listing.parent / "hosts.tmp", listing)


def _discovery(tmp_path, hosts):
    """A discovery script printing `host:1` for each line of a file the test edits; it logs
    each answer (then `--`) to discovered.log."""
    listing, log = tmp_path / "hosts.txt", tmp_path / "discovered.log"
    _set_hosts(listing, hosts)
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\nhosts=$(cat {listing})\nprintf '%s\\n' \"$hosts\"\n"
                      f"printf '%s\\n--\\n' \"$hosts\" >> {log}\n")
    script.chmod(0o755)
    return script, listing


def _driver_notified(tmp_path, hosts):
    """Whether Horovod's driver has read `hosts` from the discovery script and asked it
    again: its discovery thread tells rank 0 of a change (and waits for the answer)
    before it asks again (horovod/runner/elastic/driver.py, _discover_hosts)."""
    log = tmp_path / "discovered.log"
    answers = log.read_text().split("--\n")[:-1] if log.exists() else []
    wanted = "".join(f"{h}:1\n" for h in hosts)
    return wanted in answers and answers.index(wanted) < len(answers) - 1


def _run(cmd, log_path, during, timeout=600):
    """Start the job, call `during(proc)`, wait for it to end; (rc, output)."""
    with open(log_path, "w") as output:
        proc = start_group(cmd, output)
        try:
            during(proc)
            proc.wait(timeout=timeout)
        finally:
            kill_group(proc)
    return proc.returncode, log_path.read_text()


def _summary(out):
    line = next(l for l in out.splitlines() if "SUMMARY {" in l)
    return json.loads(line.split("SUMMARY ", 1)[1])


def _parts(change):
    """The seconds lost of a world change and its three parts, for the test's output."""
    return (f"{change['seconds_lost']:.1f} s lost ({change['seconds_since_commit']:.1f} since "
            f"the commit, {change['seconds_to_reform']:.1f} re-forming, "
            f"{change['seconds_to_first_step']:.1f} restart and first step)")


def _reference(tmp_path, change: dict, steps: int,
               plain=(*PLAIN, "--iterations_per_loop=2")) -> dict:
    """The final checkpoint of the same training without elastic Horovod (`plain` flags):
    `old_size` ranks from step 0 to the step the elastic job went on from (its last
    commit), then `new_size` ranks from that checkpoint to `steps`, each a run of its own
    (a loop must end at the commit step, so that its checkpoint is there)."""
    model_dir = tmp_path / "reference"
    for size, end in ((change["old_size"], change["step"]), (change["new_size"], steps)):
        args = [*plain, f"--train_steps={end}", f"--model_dir={model_dir}"]
        run_cmd(horovodrun_cmd(size, *args) if size > 1 else python_cmd(*args))
    return checkpoint_values.newest_state(model_dir)


def _kill_one(program, model_dir, gate, rank):
    def during(proc):
        _wait_at_gate(proc, gate, (0, 1))
        pids = rank_pids(program, model_dir)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[rank], signal.SIGKILL)
        (gate[0] / "go").touch()
    return during


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("horovod_flags", [
    (),
    # Both fixed: unpatched Horovod crashed re-initialising the survivor (patch 0002).
    ("--cycle_time_ms=10", "--fusion_threshold_mb=64"),
], ids=["defaults", "fixed_cycle_and_fusion"])
def test_resnet_main_survives_a_killed_worker(tmp_path, horovod_flags):
    model_dir = tmp_path / "run"
    discovery, _ = _discovery(tmp_path, HOSTS)
    gate = _gate(tmp_path, 2)
    steps = 12
    rc, out = _run(_elastic_cmd(discovery, gate, 2, *TINY, *horovod_flags,
                                f"--train_steps={steps}",
                                f"--model_dir={model_dir}"), tmp_path / "log.txt",
                   _kill_one("resnet_main.py", model_dir, gate, rank=1))
    assert rc == 0, out[-5000:]
    summary = _summary(out)
    (change,) = summary["world_size_changes"]
    print(f"\nkill -9 of rank 1: {_parts(change)}, "
          f"{change['steps_redone']} steps redone, reset at step {change['step']}")
    assert (summary["final_step"], summary["ranks"]) == (steps, 1)
    assert (change["old_size"], change["new_size"], change["reason"]) == (
        2, 1, "a worker failed")
    assert 0 < change["step"] < steps and change["seconds_lost"] > 0
    assert f"elastic: world size 2 -> 1 at step {change['step']}" in out
    # The survivor ends where 2 ranks to the commit, then 1 rank to the end, end.
    checkpoint_values.assert_same_state(checkpoint_values.newest_state(model_dir),
                                        _reference(tmp_path, change, steps),
                                        atol=ELASTIC_ATOL)


@pytest.mark.slow
@pytest.mark.distributed
def test_resnet_main_grows_when_a_host_is_added(tmp_path):
    model_dir = tmp_path / "run"
    discovery, listing = _discovery(tmp_path, HOSTS[:1])
    gate = _gate(tmp_path, 1)
    steps = 12

    def add_host(proc):
        # At the gate the worker has registered with the driver, which ignores hosts added
        # before that (Horovod 0.28); it goes on once the driver has told it of the host.
        _wait_at_gate(proc, gate, (0,))
        _set_hosts(listing, HOSTS)
        wait_until(proc, lambda: _driver_notified(tmp_path, HOSTS),
                   "the driver's notice of the added host")
        (gate[0] / "go").touch()
    rc, out = _run(_elastic_cmd(discovery, gate, 1, *TINY, f"--train_steps={steps}",
                                f"--model_dir={model_dir}"), tmp_path / "log.txt", add_host)
    assert rc == 0, out[-5000:]
    summary = _summary(out)
    (change,) = summary["world_size_changes"]
    print(f"\nhost added: {_parts(change)}, "
          f"joined at step {change['step']}")
    assert (change["old_size"], change["new_size"], change["steps_redone"]) == (1, 2, 0)
    assert change["step"] == GATE_STEP + 1  # the first commit after the driver's notice
    assert (summary["final_step"], summary["ranks"]) == (steps, 2)
    # 1 rank to the join, then 2 ranks: a joiner with other weights or optimizer state
    # would send other gradients, and rank 0's weights would differ from these.
    checkpoint_values.assert_same_state(checkpoint_values.newest_state(model_dir),
                                        _reference(tmp_path, change, steps),
                                        atol=ELASTIC_ATOL)


@pytest.mark.slow
@pytest.mark.distributed
def test_chexnet_train_survives_losing_rank_0(tmp_path):
    csv_path = _xray_sample(tmp_path / "x")
    model_dir = tmp_path / "run"
    discovery, _ = _discovery(tmp_path, HOSTS)
    gate = _gate(tmp_path, 2)
    steps = 16
    plain = ["-m", "chexnet", "train", f"--csv={csv_path}", f"--image_dir={tmp_path / 'x'}",
             "--backbone=resnet18", "--image_size=32", "--split_fractions=0.5,0.5,0.0",
             "--train_batch_size=2", "--eval_batch_size=2", "--steps_per_loop=4",
             "--log_every_n_steps=1", "--seed=0", "--allow_random_init"]
    args = [*plain, f"--train_steps={steps}", "--elastic", "--elastic_commit_steps=2",
            f"--model_dir={model_dir}", "--stall_timeout_s=120"]
    rc, out = _run(_elastic_cmd(discovery, gate, 2, *args), tmp_path / "log.txt",
                   _kill_one("chexnet", model_dir, gate, rank=0))
    assert rc == 0, out[-5000:]
    summary = _summary(out)
    (change,) = summary["world_size_changes"]
    print(f"\nchexnet, kill -9 of rank 0: {_parts(change)}")
    assert (summary["final_step"], summary["ranks"], summary["val_images"]) == (steps, 1, 6)
    assert (change["old_size"], change["new_size"]) == (2, 1)
    # The survivor became rank 0: it wrote the last checkpoint and the report.
    assert checkpoints.latest(str(model_dir)).step == steps
    assert (model_dir / "report" / "auroc.csv").is_file()
    # The reset went back to the commit at the loop's end (step 4: evaluation, batch-norm
    # statistics and plateau counters as in a plain run stopped there).
    assert change["step"] % 4 == 0, change
    checkpoint_values.assert_same_state(checkpoint_values.newest_state(model_dir),
                                        _reference(tmp_path, change, steps, plain),
                                        atol=ELASTIC_ATOL)


@pytest.mark.slow
def test_slurm_discovery_lists_the_usable_nodes_of_the_allocation(tmp_path):
    import subprocess

    from tests.conftest import ROOT, child_env

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\nprintf "node1\\nnode2\\nnode3\\nnode4\\n"\n')
    states = tmp_path / "states"
    (fake / "sinfo").write_text(f"#!/bin/sh\ncat {states}\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    exclude = tmp_path / "exclude"
    exclude.write_text("node4\n")  # left out by hand

    def discover(cache_s):
        env = child_env(PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1-4]",
                        SLURM_JOB_ID="77", ELASTIC_SLOTS=2, ELASTIC_EXCLUDE=exclude,
                        ELASTIC_CACHE=tmp_path / "cache", ELASTIC_CACHE_S=cache_s)
        return subprocess.run(["bash", ROOT / "slurm" / "elastic_discover.sh"], env=env,
                              capture_output=True, text=True, timeout=30, check=True).stdout

    # node2 stopped responding (the * suffix), node3 is drained.
    states.write_text("node1 alloc\nnode2 alloc*\nnode3 drain\nnode4 mix\n")
    assert discover(60) == "node1:2\n"
    states.write_text("node1 alloc\nnode2 alloc\nnode3 mix\nnode4 mix\n")
    assert discover(60) == "node1:2\n"  # the cached answer (Horovod asks every second)
    assert discover(0) == "node1:2\nnode2:2\nnode3:2\n"  # node2 and node3 are back
