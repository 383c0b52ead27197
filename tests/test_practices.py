"""The large-batch practices with values (hooks.practices.weight_decay, hooks.practices.snapshots,
hooks.practices.time_to_accuracy): the loss after a weight-decay boundary, snapshot contents,
ensemble top-1 against numpy, time-to-accuracy; plus a 2-rank horovodrun run."""
import json
import os
import types

import keras  # noqa: E402
import numpy as np
import pytest

from hooks.distributed import horovod_glue
from hooks.practices import schedules as S
from hooks.practices import snapshots, time_to_accuracy, weight_decay
from hooks.practices.lars import LARS
from tests.conftest import horovodrun_cmd, run_cmd

CTX = horovod_glue.Context()


def _data(n=16, d=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)).astype("float32"),
            rng.integers(0, classes, size=n).astype("int64"))


def _dense(d=4, classes=3, seed=0, l2=0.01):
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(l2) if l2 else None
    return keras.Sequential([keras.Input((d,)),
                             keras.layers.Dense(classes, kernel_regularizer=reg)])


def _trainer(net, optimizer):
    trainer = horovod_glue.DistributedTrainer(net, CTX)
    trainer.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    jit_compile=False)
    return trainer


def _np_xent(logits, y):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def _np_softmax(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


# ---------------------------------------------------------------- weight decay
def test_scheduled_l2_changes_the_loss_at_the_boundary():
    x, y = _data()
    net = _dense()
    factor = weight_decay.attach_scheduled_l2(net, 0.0)
    schedule = S.PiecewiseConstant([2, 4], [0.0, 0.1, 0.3])
    trainer = _trainer(net, keras.optimizers.SGD(learning_rate=0.0))  # weights stay fixed
    history = trainer.fit(x, y, batch_size=len(x), epochs=6, shuffle=False, verbose=0,
                          callbacks=[weight_decay.WeightDecayScheduler(schedule.value_at, factor)])
    kernel, bias = net.get_weights()
    data_loss = _np_xent(x @ kernel + bias, y)
    wds = [schedule.value_at(s) for s in range(6)]  # one step per epoch
    expected = [data_loss + 0.5 * wd * float(np.sum(kernel.astype(np.float64) ** 2))
                for wd in wds]
    np.testing.assert_allclose(history.history["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(history.history["weight_decay"], wds, rtol=1e-6)
    assert expected[2] > expected[1] + 1e-3  # the boundary really changes the loss


def test_plain_l2_float_does_not_change_after_tracing():
    """The trap ScheduledL2 avoids: a Python float in a regularizer is frozen in the graph."""
    x, y = _data()
    net = _dense(l2=0.0)
    net.layers[0].kernel.regularizer = keras.regularizers.L2(0.0)
    trainer = _trainer(net, keras.optimizers.SGD(learning_rate=0.0))
    bump = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: setattr(net.layers[0].kernel.regularizer, "l2", 1.0))
    history = trainer.fit(x, y, batch_size=len(x), epochs=2, verbose=0, callbacks=[bump])
    assert history.history["loss"][1] == pytest.approx(history.history["loss"][0])


def test_weight_decay_scheduler_drives_lars():
    x, y = _data()
    net = _dense(l2=0.0)
    optimizer = LARS(learning_rate=0.1, weight_decay=1e-4)
    schedule = S.PiecewiseConstant([3], [5e-5, 2e-4])
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(
        float(keras.ops.convert_to_numpy(optimizer.current_weight_decay))))
    trainer = _trainer(net, optimizer)
    history = trainer.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
                          callbacks=[weight_decay.WeightDecayScheduler(schedule.value_at,
                                                                       optimizer), record])
    np.testing.assert_allclose(seen, [5e-5] * 3 + [2e-4] * 5, rtol=1e-6)
    np.testing.assert_allclose(history.history["weight_decay"], [2e-4, 2e-4], rtol=1e-6)


def test_attach_scheduled_l2_selects_l2_variables_and_validates():
    net = _dense()
    factor = weight_decay.attach_scheduled_l2(net, 1e-4)
    assert isinstance(net.layers[0].kernel.regularizer, weight_decay.ScheduledL2)
    assert net.layers[0].bias.regularizer is None
    assert float(keras.ops.convert_to_numpy(factor)) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="no variable of network"):
        weight_decay.attach_scheduled_l2(_dense(l2=0.0), 1e-4)
    with pytest.raises(ValueError, match="weight_decay must be >= 0.0, got -1"):
        weight_decay.attach_scheduled_l2(net, -1.0)


def test_weight_decay_scheduler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="schedule must be callable"):
        weight_decay.WeightDecayScheduler(0.1, keras.Variable(0.0))
    with pytest.raises(ValueError, match="target must be .* got SGD"):
        weight_decay.WeightDecayScheduler(lambda s: 0.1, keras.optimizers.SGD(weight_decay=1e-4))


# ---------------------------------------------------------------- snapshots
def test_snapshots_hold_the_weights_of_their_step(tmp_path):
    x, y = _data(n=24)
    net = _dense(l2=0.0)
    after_step = {}
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: after_step.
                                            __setitem__(len(after_step) + 1, net.get_weights()))
    saver = snapshots.SnapshotSaver([2, 5], tmp_path / "snaps", CTX)
    other_rank = snapshots.SnapshotSaver([2, 5], tmp_path / "rank1", horovod_glue.Context(1, 2))
    trainer = _trainer(net, keras.optimizers.SGD(learning_rate=0.5))
    trainer.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0,
                callbacks=[record, saver, other_rank])
    assert sorted(os.listdir(tmp_path / "snaps")) == [
        "snapshot-000000002.weights.h5", "snapshot-000000005.weights.h5"]
    assert saver.saved == saver.paths()
    assert other_rank.saved == [] and not (tmp_path / "rank1").exists()
    probe = _dense(l2=0.0, seed=7)
    for step, path in zip([2, 5], saver.paths()):
        probe.load_weights(path)
        for got, want in zip(probe.get_weights(), after_step[step]):
            np.testing.assert_array_equal(got, want)
    assert not np.allclose(after_step[2][0], after_step[5][0])


def test_snapshot_saver_validates():
    with pytest.raises(ValueError, match=r"snapshot_steps\[1\] must be >= 1, got 0"):
        snapshots.SnapshotSaver([3, 0], "d", CTX)
    with pytest.raises(ValueError, match="must not repeat"):
        snapshots.SnapshotSaver([3, 3], "d", CTX)
    with pytest.raises(ValueError, match="context must be"):
        snapshots.SnapshotSaver([3], "d", None)


# ---------------------------------------------------------------- collapsed ensemble
def test_ensemble_top_1_matches_numpy(tmp_path):
    x, y = _data(n=40, classes=3, seed=3)
    paths, probs = [], []
    for seed in range(3):
        net = _dense(l2=0.0, seed=seed)
        kernel, bias = net.get_weights()
        probs.append(_np_softmax(x.astype(np.float64) @ kernel + bias))
        paths.append(str(tmp_path / f"snapshot-{seed + 1:09d}.weights.h5"))
        net.save_weights(paths[-1])
    scratch = _dense(l2=0.0, seed=9)
    before = scratch.get_weights()
    import tensorflow as tf
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    evaluator = snapshots.CollapsedEnsembleEvaluator(paths, scratch, dataset, CTX)
    results = evaluator.evaluate()
    want = {f"snapshot_{i + 1}_top_1": float(np.mean(p.argmax(-1) == y))
            for i, p in enumerate(probs)}
    want["ensemble_top_1"] = float(np.mean(np.mean(probs, axis=0).argmax(-1) == y))
    want["ensemble_size"] = 3.0
    assert results == pytest.approx(want, abs=1e-9)
    for got, p in zip(evaluator.predictions, probs):
        np.testing.assert_allclose(got, p, atol=1e-5)
    for got, orig in zip(scratch.get_weights(), before):  # scratch weights put back
        np.testing.assert_array_equal(got, orig)
    # A builder function works the same way; as a callback the values reach the logs.
    built = snapshots.CollapsedEnsembleEvaluator(paths, lambda: _dense(l2=0.0), dataset, CTX,
                                         at_step=0)
    built.set_model(types.SimpleNamespace(optimizer=keras.optimizers.SGD()))
    logs = {}
    built.on_epoch_end(0, logs)
    assert logs["val_ensemble_top_1"] == pytest.approx(want["ensemble_top_1"])


def test_ensemble_helpers_and_validation():
    p = np.array([[0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    q = np.array([[0.1, 0.9], [0.4, 0.6], [0.6, 0.4]])
    y = np.array([1, 1, 0])
    assert snapshots.top_1(p, y) == pytest.approx(2 / 3)
    assert snapshots.ensemble_top_1([p, q], y) == pytest.approx(1.0)
    assert snapshots.top_1(p, np.eye(2)[y]) == pytest.approx(2 / 3)  # one-hot labels
    with pytest.raises(ValueError, match="snapshot_paths must not be empty"):
        snapshots.CollapsedEnsembleEvaluator([], lambda: None, None, CTX)
    with pytest.raises(ValueError, match="activation must be"):
        snapshots.CollapsedEnsembleEvaluator(["a"], lambda: None, None, CTX, activation="relu")


# ---------------------------------------------------------------- time to accuracy
def test_time_to_accuracy_records_the_first_epoch_reaching_target():
    step = keras.Variable(0, dtype="int64")
    model = types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=step),
                                  stop_training=False)
    tta = time_to_accuracy.TimeToAccuracy("val_top_1", 0.9, stop=True, steps_per_epoch=2.5)
    tta.set_model(model)
    tta.on_train_begin()
    logged = []
    for epoch, value in enumerate([0.5, 0.89, 0.91, 0.95]):
        step.assign((epoch + 1) * 5)
        logs = {"val_top_1": value}
        tta.on_epoch_end(epoch, logs)
        logged.append(logs)
    assert tta.reached["step"] == 15 and tta.reached["epoch"] == pytest.approx(6.0)
    assert tta.reached["value"] == pytest.approx(0.91) and tta.reached["seconds"] >= 0
    assert model.stop_training
    assert np.isnan(logged[1]["time_to_target_epoch"])
    assert [l["time_to_target_epoch"] for l in logged[2:]] == [6.0, 6.0]


def test_time_to_accuracy_min_mode_and_validation():
    step = keras.Variable(0, dtype="int64")
    model = types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=step),
                                  stop_training=False)
    tta = time_to_accuracy.TimeToAccuracy("loss", 0.2, mode="min")
    tta.set_model(model)
    tta.on_train_begin()
    for epoch, value in enumerate([0.5, 0.3, 0.2, 0.1]):
        tta.on_epoch_end(epoch, {"loss": value})
    assert tta.reached["epoch"] == 3.0 and not model.stop_training
    with pytest.raises(ValueError, match="mode must be 'max' or 'min', got 'up'"):
        time_to_accuracy.TimeToAccuracy("loss", 0.2, mode="up")
    with pytest.raises(ValueError, match="target must be finite, got nan"):
        time_to_accuracy.TimeToAccuracy("loss", float("nan"))


# ---------------------------------------------------------------- 2 ranks
@pytest.mark.distributed
def test_two_ranks_same_warmup_lr_and_rank0_snapshots(tmp_path):
    run_cmd(horovodrun_cmd(2, "-m", "tests.workers.lr_warmup", tmp_path), timeout=240)
    from tests.workers.lr_warmup import SCHEDULE, SNAPSHOT_STEPS, TOTAL_STEPS
    logs = [json.loads((tmp_path / f"lr-rank{r}.json").read_text()) for r in (0, 1)]
    steps = np.arange(TOTAL_STEPS)
    s = steps.astype(np.float64)
    warm, peak, start, total = (SCHEDULE["warmup_steps"], SCHEDULE["peak_lr"],
                                SCHEDULE["start_lr"], TOTAL_STEPS)
    decay = peak * (1 - np.clip(s - warm, 0, total - warm) / (total - warm)) ** 2
    want = np.where(s < warm, start + (peak - start) * s / warm, decay)
    for log in logs:
        assert log["size"] == 2
        assert log["steps"] == steps.tolist()
        np.testing.assert_allclose(log["lr"], want, rtol=1e-5, atol=1e-8)
    assert logs[0]["lr"] == logs[1]["lr"]  # bit-identical on both ranks
    assert logs[0]["saved"] == [str(tmp_path / "snaps" / f"snapshot-{s:09d}.weights.h5")
                                for s in SNAPSHOT_STEPS]
    assert logs[1]["saved"] == []
    assert sorted(os.listdir(tmp_path / "snaps")) == [
        f"snapshot-{s:09d}.weights.h5" for s in SNAPSHOT_STEPS]
