"""Faults in-process (fast tier): divergence (stop and rollback), preemption by a real
signal, damaged checkpoints, stale temporary folders, a full disk, the stall watchdog.
The same faults across real launchers are in tests/test_faults_launchers.py."""
import io
import json
import os
import shutil
import signal
import subprocess
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from hooks.distributed import watchdog
from hooks.distributed.horovod_glue import Context, DistributedTrainer
from hooks.errors import ConfigError
from hooks.state import checkpoints, faults
from hooks.training import loop


def _trainer(lr=0.1):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    net = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="tiny")
    trainer = DistributedTrainer(net, Context())
    trainer.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return trainer


def _stream(nan_at=None, n=64):
    """Batches of 2 forever; batch number `nan_at` (0-based, first pass only) holds NaN."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    if nan_at is not None:
        x[2 * nan_at] = np.nan
    first = tf.data.Dataset.from_tensor_slices((x, y))
    clean = tf.data.Dataset.from_tensor_slices((np.nan_to_num(x), y)).repeat()
    return first.concatenate(clean).batch(2)


def _train(trainer, data, tmp_path, total=8, **kw):
    return loop.train(trainer, loop.Input(data), loop.Plan(total, 2, 2, 4), context=Context(),
                      saving=loop.Saving(str(tmp_path)),
                      progress=loop.Progress(lambda *a, **k: None), **kw)


def _steps(model_dir):
    return [c.step for c in checkpoints.list_checkpoints(str(model_dir))]


# ---------------------------------------------------------------- divergence
def test_nan_loss_stops_at_its_step_and_writes_no_checkpoint_of_it(tmp_path):
    trainer = _trainer()
    with pytest.raises(faults.Diverged, match=r"loss is nan at step 5; no checkpoint was "
                                              r"written after step 4") as err:
        _train(trainer, _stream(nan_at=4), tmp_path)
    assert err.value.step == 5
    assert _steps(tmp_path) == [2, 4]  # nothing at or after the bad step
    net = _trainer().network
    checkpoints.restore(checkpoints.latest(str(tmp_path)), net)
    assert checkpoints.non_finite(net.get_weights()) == 0


def test_rollback_skips_the_bad_batch_and_finishes(tmp_path):
    trainer = _trainer()
    result = _train(trainer, _stream(nan_at=4), tmp_path,
                    faults_policy=loop.FaultPolicy("rollback", max_rollbacks=1))
    assert (result.final_step, result.practices) == (8, {"rollbacks": 1})
    assert _steps(tmp_path) == [2, 4, 6, 8]
    assert checkpoints.non_finite(trainer.network.get_weights()) == 0
    # A second NaN with no rollback left stops the run.
    with pytest.raises(faults.Diverged):
        _train(_trainer(), _stream(nan_at=1).map(lambda x, y: (x * np.nan, y)),
               tmp_path / "again", faults_policy=loop.FaultPolicy("rollback", 2))


def test_save_and_restore_refuse_non_finite_weights(tmp_path):
    net = _trainer().network
    checkpoints.save(str(tmp_path), 1, net, None, {"network": checkpoints.describe(net)})
    net.layers[1].kernel.assign(np.full((3, 2), np.inf, "float32"))
    with pytest.raises(checkpoints.NonFiniteError, match="not finite at step 2"):
        checkpoints.save(str(tmp_path), 2, net, None, {})
    assert _steps(tmp_path) == [1]
    guard = faults.FiniteGuard()
    guard.set_model(_trainer())
    guard.model.network.layers[1].bias.assign([np.nan, 0.0])
    guard.good = (0, [])
    with pytest.raises(faults.Diverged, match="1 weight tensors are not finite"):
        guard.on_epoch_end(0)


# ---------------------------------------------------------------- preemption
class _SignalAt(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_at_the_next_step_with_a_checkpoint_and_resumes(tmp_path):
    trainer = _trainer()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(faults.Preempted, match="SIGTERM at step 4") as err:
        _train(trainer, _stream(), tmp_path, total=20, extra_callbacks=[_SignalAt(3)])
    assert err.value.step == 4 and _steps(tmp_path) == [2, 4]
    assert signal.getsignal(signal.SIGTERM) == before  # handlers put back
    resumed = _trainer()
    found = loop.restore_and_sync(str(tmp_path), resumed, resumed.optimizer, Context())
    assert found.step == 4 and int(resumed.optimizer.iterations.numpy()) == 4


# ---------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model_dir with checkpoints at steps 2, 4, 6 (trained once, copied per test)."""
    model_dir = tmp_path_factory.mktemp("trained")
    _train(_trainer(), _stream(), model_dir, total=6)
    return model_dir


def _three_checkpoints(tmp_path, trained):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return [os.path.join(tmp_path, f"ckpt-{s:09d}") for s in (2, 4, 6)]


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncated weights", "truncated optimizer",
                                    "bad json", "missing optimizer", "non-finite"])
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_used(tmp_path, damage,
                                                                        trained):
    paths = _three_checkpoints(tmp_path, trained)
    newest = paths[-1]
    if damage == "truncated weights":
        _truncate(os.path.join(newest, checkpoints.WEIGHTS))
    elif damage == "truncated optimizer":
        _truncate(os.path.join(newest, checkpoints.OPTIMIZER))
    elif damage == "bad json":
        with open(os.path.join(newest, checkpoints.STATE), "w") as f:
            f.write("{not json")
    elif damage == "missing optimizer":
        os.remove(os.path.join(newest, checkpoints.OPTIMIZER))
    else:
        net = _trainer().network
        checkpoints.restore(checkpoints.read(newest), net)
        net.layers[1].kernel.assign(np.full((3, 2), np.nan, "float32"))
        net.save_weights(os.path.join(newest, checkpoints.WEIGHTS))
    warnings = []
    trainer = _trainer()
    found = checkpoints.restore_latest(str(tmp_path), trainer.network, trainer.optimizer,
                                       warn=warnings.append)
    assert found.step == 4 and int(trainer.optimizer.iterations.numpy()) == 4
    assert len(warnings) == 1 and newest in warnings[0] and "moved to" in warnings[0]
    aside = [n for n in os.listdir(tmp_path) if n.startswith("damaged-ckpt-000000006")]
    assert len(aside) == 1  # kept, not deleted
    assert _steps(tmp_path) == [2, 4]


def test_no_loadable_checkpoint_is_an_error_not_a_restart(tmp_path, trained):
    for path in _three_checkpoints(tmp_path, trained):
        _truncate(os.path.join(path, checkpoints.WEIGHTS))
    trainer = _trainer()
    with pytest.raises(checkpoints.CheckpointError, match="no usable checkpoint.*refusing to "
                                                          "restart from step 0"):
        checkpoints.restore_latest(str(tmp_path), trainer.network, trainer.optimizer,
                                   warn=lambda m: None)


def test_another_models_checkpoint_is_a_user_error_and_stays(tmp_path, trained):
    _three_checkpoints(tmp_path, trained)
    inputs = keras.Input((3,))
    other = keras.Model(inputs, keras.layers.Dense(5)(inputs), name="tiny")
    with pytest.raises(checkpoints.CheckpointError, match="does not fit model tiny"):
        checkpoints.restore_latest(str(tmp_path), other, None, warn=lambda m: None)
    assert _steps(tmp_path) == [2, 4, 6]  # nothing moved aside


def test_stale_temporary_folders_are_removed_at_start(tmp_path, trained):
    _three_checkpoints(tmp_path, trained)
    os.makedirs(tmp_path / ".ckpt-000000008-x1y2")  # what kill -9 mid-write leaves
    (tmp_path / ".ckpt-000000008-x1y2" / checkpoints.WEIGHTS).write_bytes(b"half")
    (tmp_path / ".tmp-summary.json-abc").write_text("{")
    logged = []
    trainer = _trainer()
    found = loop.restore_and_sync(str(tmp_path), trainer, trainer.optimizer, Context(),
                                  log=logged.append)
    assert found.step == 6
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert len(logged) == 2 and all("killed checkpoint write" in m for m in logged)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only: the CI and development machines run as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_is_a_one_line_error_and_the_previous_checkpoint_stays(tiny_tmpfs):
    model_dir = tiny_tmpfs / "run"
    trainer = _trainer()
    net, opt = trainer.network, trainer.optimizer
    opt.build(net.trainable_variables)
    checkpoints.save(str(model_dir), 1, net, opt, {})
    filler = tiny_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill what is left
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(checkpoints.CheckpointError, match=r"cannot write checkpoint .*"
                                                          r"ckpt-000000002: no space left"):
        checkpoints.save(str(model_dir), 2, net, opt, {})
    assert sorted(os.listdir(model_dir)) == ["ckpt-000000001"]  # no temp folder left
    assert checkpoints.restore_latest(str(model_dir), _trainer().network, None).step == 1


def test_model_dir_that_is_a_file_or_unwritable(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"--model_dir=.*/f is a file"):
        checkpoints.check_model_dir(str(tmp_path / "f"), writable=True)
    with pytest.raises(ConfigError, match=r"--model_dir=.*/f/run: .*/f is a file"):
        checkpoints.check_model_dir(str(tmp_path / "f" / "run"), writable=True)
    checkpoints.check_model_dir(str(tmp_path / "new" / "run"), writable=True)
    assert sorted(os.listdir(tmp_path)) == ["f"]  # checked, not created, no probe left
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], check=True)
    try:
        with pytest.raises(ConfigError, match="is not writable: Read-only file system"):
            checkpoints.check_model_dir(str(ro / "run"), writable=True)
    finally:
        subprocess.run(["umount", str(ro)], check=True)


# ---------------------------------------------------------------- stall watchdog
class _Exit:
    def __init__(self):
        self.code = None

    def __call__(self, code):
        self.code = code


def _wait_for(predicate, seconds):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def test_watchdog_fires_without_beats_and_names_the_stalled_rank(tmp_path, capsys):
    exit_ = _Exit()
    stall_dir = tmp_path / ".stall"
    dog = watchdog.Watchdog(0.5, rank=0, size=3, hosts=["node1", "node2", "node3"],
                            stall_dir=str(stall_dir), exit=exit_, poll_s=0.05, grace_s=0.3)
    dog.start()
    assert not stall_dir.exists()  # made only when a report is written
    stall_dir.mkdir()
    (stall_dir / "rank-2").write_text("7")  # rank 2's watchdog fired too: it is waiting
    dog.beat(7, "gradient all-reduce")
    assert _wait_for(lambda: exit_.code is not None, 10)
    assert exit_.code == watchdog.STALL_EXIT_CODE
    err = capsys.readouterr().err
    assert "rank 0 of 3 (node1): no progress for" in err and "at step 7" in err
    assert "in gradient all-reduce; stalled rank(s): 1 (node2)" in err


class _Clock:
    """The watchdogs' clock, moved only by the test: with `check()` called by the test (no
    thread), what they do depends on no scheduling or load."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_watchdog_beats_and_chief_writes_keep_it_quiet():
    clock, exit_ = _Clock(), _Exit()
    dog = watchdog.Watchdog(0.4, exit=exit_, clock=clock)
    for _ in range(20):  # 1 s of beats every 50 ms
        dog.beat()
        clock.now += 0.05
        assert not dog.check()
    dog.chief_writing(True)  # a write ten timeouts long
    for _ in range(40):
        clock.now += 0.1
        assert not dog.check()
    dog.chief_writing(False)  # the write's end is progress: a full timeout from here
    clock.now += 0.39
    assert not dog.check() and exit_.code is None
    clock.now += 0.02
    assert dog.check() and exit_.code == watchdog.STALL_EXIT_CODE


def test_waiting_ranks_wait_while_the_chief_writes_and_fire_when_it_stops(tmp_path):
    clock, exit_, report = _Clock(), _Exit(), io.StringIO()
    timeout, step = 0.4, 0.04
    chief = watchdog.Watchdog(timeout, rank=0, size=2, stall_dir=str(tmp_path), exit=_Exit(),
                              grace_s=0, clock=clock)
    other = watchdog.Watchdog(timeout, rank=1, size=2, stall_dir=str(tmp_path), exit=exit_,
                              grace_s=0, clock=clock, stream=report)
    chief.chief_writing(True)
    other.waiting_for_chief(True)
    for _ in range(30):  # three timeouts: the chief's look refreshes chief-alive
        clock.now += step
        assert not chief.check() and not other.check()
    stopped = clock.now  # the chief is stopped mid-write (as by SIGSTOP): it looks no more
    while not other.check():
        clock.now += step
        assert clock.now - stopped < 10 * timeout, "the waiting rank never fired"
    # A timeout after the chief's last touch (it touches every timeout/4, on a look).
    assert timeout - timeout / 4 - step - 1e-9 <= clock.now - stopped <= timeout + step + 1e-9
    assert exit_.code == watchdog.STALL_EXIT_CODE
    assert "rank 1 of 2" in report.getvalue() and "stalled rank(s): 0 (" in report.getvalue()


def test_loop_checkpoints_record_the_network_fingerprint(trained):
    state = json.loads((trained / "ckpt-000000006" / "state.json").read_text())
    assert state["network"] == {"name": "tiny", "params": 8, "tensors": 2}
