"""The Horovod glue in one process with no launcher (size 1)."""
import os

import keras
import numpy as np
import pytest

from hooks.distributed import horovod_glue
from hooks.errors import UserError


def test_init_without_launcher_sets_fusion_env(monkeypatch):
    monkeypatch.delenv("HOROVOD_FUSION_THRESHOLD", raising=False)
    ctx = horovod_glue.init(fusion_threshold_mb=64, cycle_time_ms=2.5)
    assert ctx == horovod_glue.Context(0, 1, 0, 1) and ctx.is_chief
    assert os.environ["HOROVOD_FUSION_THRESHOLD"] == str(64 * 1024 * 1024)
    assert os.environ["HOROVOD_CYCLE_TIME"] == "2.5"


def test_init_cycle_time_defaults_to_10_ms_unless_given(monkeypatch):
    monkeypatch.delenv("HOROVOD_CYCLE_TIME", raising=False)
    horovod_glue.init()
    assert os.environ["HOROVOD_CYCLE_TIME"] == "10.0"
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "3")  # the user's environment wins over ours
    horovod_glue.init()
    assert os.environ["HOROVOD_CYCLE_TIME"] == "3"
    horovod_glue.init(cycle_time_ms=1.5)  # and the flag over both
    assert os.environ["HOROVOD_CYCLE_TIME"] == "1.5"


def _toy(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
                             keras.layers.Dense(2)])


def test_trainer_in_one_process_equals_plain_keras_fit():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 2, size=32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    plain = _toy(7)
    plain.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=loss)
    plain_hist = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    ctx = horovod_glue.Context()
    net = _toy(7)
    trainer = horovod_glue.DistributedTrainer(net, ctx)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    trainer.compile(optimizer=optimizer, loss=loss, jit_compile=False)
    horovod_glue.build_and_broadcast(trainer, optimizer, ctx)
    hist = trainer.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    for a, b in zip(plain.get_weights(), net.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(hist.history["loss"], plain_hist.history["loss"], atol=1e-6)
    assert int(optimizer.iterations.numpy()) == 8


def test_global_metric_results_single_process_is_the_local_result():
    acc = keras.metrics.SparseCategoricalAccuracy(name="acc")
    acc.update_state([0, 1, 1, 0], [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    assert float(horovod_glue.global_metric_results([acc], horovod_glue.Context())["acc"]) == 0.5


def test_write_atomically_only_on_chief_and_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "report.txt"
    write = lambda p: open(p, "w").write("new")  # noqa: E731
    assert not horovod_glue.write_atomically(str(target), write, horovod_glue.Context(rank=1,
                                                                                    size=2))
    assert not target.exists()
    assert horovod_glue.write_atomically(str(target), write, horovod_glue.Context())
    assert target.read_text() == "new"

    def broken(path):
        open(path, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(UserError, match=r"cannot write .*report.txt: disk full"):
        horovod_glue.write_atomically(str(target), broken, horovod_glue.Context())
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]
