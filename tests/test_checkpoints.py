"""Checkpoints: atomic layout, newest/best selection, pruning, restore errors."""
import json
import os

import keras
import numpy as np
import pytest

from hooks.state import checkpoints


def _net(units=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(units)], name="net")


def _save(tmp_path, step, top1, net=None, keep=10):
    net = net or _net()
    return checkpoints.save(str(tmp_path), step, net, None,
                            {"metrics": {"top_1": top1}, "best_metric": "top_1"}, keep=keep)


def test_latest_ignores_half_written_and_best_uses_the_metric(tmp_path):
    for step, top1 in ((10, 0.5), (20, 0.7), (30, 0.6)):
        _save(tmp_path, step, top1)
    # A crashed write: a temp folder and a ckpt folder without state.json.
    os.makedirs(tmp_path / ".ckpt-000000040-abc")
    os.makedirs(tmp_path / "ckpt-000000050")
    assert [c.step for c in checkpoints.list_checkpoints(str(tmp_path))] == [10, 20, 30]
    assert checkpoints.latest(str(tmp_path)).step == 30
    assert checkpoints.best(str(tmp_path), "top_1").step == 20
    assert checkpoints.best(str(tmp_path), "top_1", mode="min").step == 10
    state = json.loads(open(os.path.join(checkpoints.latest(str(tmp_path)).path,
                                         "state.json")).read())
    assert state["step"] == 30


def test_pruning_keeps_newest_and_best(tmp_path):
    for step, top1 in ((1, 0.2), (2, 0.9), (3, 0.3), (4, 0.4), (5, 0.1)):
        _save(tmp_path, step, top1, keep=2)
    assert [c.step for c in checkpoints.list_checkpoints(str(tmp_path))] == [2, 4, 5]


def test_restore_round_trips_weights_and_optimizer(tmp_path):
    net = _net(seed=1)
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    grads = [np.full(v.shape, 0.5 + i, np.float32) for i, v in enumerate(net.trainable_variables)]
    opt.apply(grads, net.trainable_variables)  # a real step: momentum slots = -lr * g
    opt.iterations.assign(7)
    checkpoints.save(str(tmp_path), 7, net, opt, {})
    other, other_opt = _net(seed=2), keras.optimizers.SGD(0.1, momentum=0.9)
    checkpoints.restore(checkpoints.latest(str(tmp_path)), other, other_opt)
    for a, b in zip(net.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(other_opt.iterations.numpy()) == 7
    slots = [other_opt.momentums[other_opt._get_variable_index(v)].numpy()
             for v in other.trainable_variables]
    for slot, g in zip(slots, grads):
        np.testing.assert_allclose(slot, -0.1 * g, rtol=1e-6)


def test_restore_into_another_architecture_is_a_clear_error(tmp_path):
    _save(tmp_path, 1, 0.1, net=_net(units=3))
    with pytest.raises(checkpoints.CheckpointError, match="does not fit model"):
        checkpoints.restore(checkpoints.latest(str(tmp_path)), _net(units=5))
