"""A resumed run ends where the uninterrupted run of the same steps ends: the same weights
and optimizer state, bit for bit (the ops here are deterministic: one process, fixed seeds,
the same batches in the same order). The reference is an uninterrupted run each test makes
itself; the resumed model starts from other random weights, so a resume that restored the
step but not the weights (or the momentum) fails. The same comparison across real launchers
(kill -9, SIGTERM, SLURM requeue, node loss) is in the launcher tests."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from hooks.distributed.horovod_glue import Context, DistributedTrainer
from hooks.training import loop
from tests import checkpoint_values

QUIET = dict(log=lambda *a, **k: None)


def _trainer(seed):
    """A small net whose schedule and momentum both matter: the learning rate changes at
    step 3 and 6, SGD keeps a momentum slot."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    net = keras.Model(inputs, keras.layers.Dense(2)(hidden), name="tiny")
    trainer = DistributedTrainer(net, Context())
    lr = keras.optimizers.schedules.PiecewiseConstantDecay([3, 6], [0.2, 0.05, 0.01])
    trainer.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return trainer


def _stream(first_batch=0):
    """Batches of 2 of a fixed stream, from batch `first_batch` on."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(2).skip(first_batch)


def _train(trainer, data, total, model_dir=None):
    return loop.train(trainer, loop.Input(data), loop.Plan(total, 2, 2, 4), context=Context(),
                      saving=loop.Saving(str(model_dir)) if model_dir else None,
                      progress=loop.Progress(QUIET["log"]))


def state_of(trainer) -> list[np.ndarray]:
    """Every weight and optimizer variable (step, momentum slots) as numpy arrays."""
    return ([np.asarray(w) for w in trainer.network.get_weights()]
            + [np.asarray(v.numpy()) for v in trainer.optimizer.variables])


def assert_same_state(got: list, want: list) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and np.array_equal(g, w), f"variable {i} differs"


def test_resume_ends_with_the_weights_and_optimizer_of_the_uninterrupted_run(tmp_path):
    reference = _trainer(seed=0)
    _train(reference, _stream(), total=8)

    first = _trainer(seed=0)
    _train(first, _stream(), total=4, model_dir=tmp_path)  # checkpoints at steps 2 and 4
    resumed = _trainer(seed=7)  # other initial weights: they must all be replaced
    assert not np.array_equal(resumed.network.get_weights()[0],
                              first.network.get_weights()[0])
    found = loop.restore_and_sync(str(tmp_path), resumed, resumed.optimizer, Context(), **QUIET)
    assert found.step == 4
    assert_same_state(state_of(resumed), state_of(first))
    _train(resumed, _stream(first_batch=4), total=8, model_dir=tmp_path)
    assert_same_state(state_of(resumed), state_of(reference))


def test_rollback_ends_as_a_run_that_never_saw_the_diverging_batch():
    """--on_nonfinite=rollback: a NaN in batch 4 (step 5) sends the run back to the state
    of step 4 and on past that batch; the reference trains on the stream without it."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    poisoned = x.copy()
    poisoned[8] = np.nan  # batch 4
    rolled = _trainer(seed=0)
    result = loop.train(rolled, loop.Input(tf.data.Dataset.from_tensor_slices((poisoned, y))
                                           .batch(2)),
                        loop.Plan(8, 2, 2, 4), context=Context(),
                        faults_policy=loop.FaultPolicy("rollback", 1),
                        progress=loop.Progress(QUIET["log"]))
    assert result.practices["rollbacks"] == 1
    keep = np.r_[0:8, 10:40]  # every example but those of batch 4
    reference = _trainer(seed=0)
    _train(reference, tf.data.Dataset.from_tensor_slices((x[keep], y[keep])).batch(2), total=8)
    assert_same_state(state_of(rolled), state_of(reference))


def test_the_reference_comparison_tells_a_lost_momentum_apart(tmp_path):
    """The check above is sharp: resuming with the weights but a zeroed momentum ends
    elsewhere."""
    reference = _trainer(seed=0)
    _train(reference, _stream(), total=8)
    first = _trainer(seed=0)
    _train(first, _stream(), total=4, model_dir=tmp_path)
    resumed = _trainer(seed=0)
    loop.restore_and_sync(str(tmp_path), resumed, resumed.optimizer, Context(), **QUIET)
    for var in resumed.optimizer.variables:
        if "momentum" in var.path:
            var.assign(np.zeros(var.shape, var.dtype))
    _train(resumed, _stream(first_batch=4), total=8, model_dir=tmp_path)
    with pytest.raises(AssertionError, match="differs"):
        assert_same_state(state_of(resumed), state_of(reference))


# ---------------------------------------------------------------- the tasks, from their data
@pytest.mark.slow  # in-process: three short ResNet-18 runs on TFRecords
def test_imagenet_resumed_in_a_later_epoch_reads_and_ends_as_uninterrupted(
        tiny_tfrecords, tmp_path):
    """9 training records, 3 per step: epochs of 3 steps; the run stops at step 4 (in the
    second epoch, whose order differs from the first) and goes on to step 8."""
    from hooks.distributed.horovod_glue import Context as Ctx
    from imagenet import train as imagenet_train
    from imagenet.config import RunConfig

    common = dict(data_dir=str(tiny_tfrecords), mode="train", num_label_classes=3,
                  resnet_depth=18, image_size=32, train_batch_size=3, num_train_images=9,
                  iterations_per_loop=2, lr_schedule="tpu_2018", warmup_epochs=1.0, seed=5,
                  num_parallel_calls=1)
    imagenet_train.run(RunConfig(model_dir=str(tmp_path / "ref"), train_steps=8, **common),
                       Ctx(), **QUIET)
    imagenet_train.run(RunConfig(model_dir=str(tmp_path / "run"), train_steps=4, **common),
                       Ctx(), **QUIET)
    imagenet_train.run(RunConfig(model_dir=str(tmp_path / "run"), train_steps=8, **common),
                       Ctx(), **QUIET)
    checkpoint_values.assert_same_state(checkpoint_values.newest_state(tmp_path / "run"),
                                        checkpoint_values.newest_state(tmp_path / "ref"))


@pytest.mark.slow  # in-process: three short fine-tunes (statistics pass, evaluations)
def test_chexnet_resumed_in_a_later_epoch_ends_as_uninterrupted(tmp_path):
    """7 training images, 2 per step: the run stops at step 4 (second epoch) and goes on
    to step 7; the learning-rate plateau state travels in the checkpoint."""
    from chexnet import train as chexnet_train
    from chexnet.config import ChexnetConfig
    from tests.test_loop import _xray_sample

    csv_path = _xray_sample(tmp_path / "x", n=12)
    common = dict(csv=str(csv_path), image_dir=str(tmp_path / "x"), backbone="resnet18",
                  image_size=32, allow_random_init=True, split_fractions=(0.6, 0.4, 0.0),
                  eval_batch_size=4, seed=2, mode="train", train_batch_size=2,
                  steps_per_loop=2, bn_stats_images=4, plateau_patience=1)
    for folder, steps in (("ref", 7), ("run", 4), ("run", 7)):
        chexnet_train.run(ChexnetConfig(model_dir=str(tmp_path / folder), train_steps=steps,
                                        **common), Context(), **QUIET)
    checkpoint_values.assert_same_state(checkpoint_values.newest_state(tmp_path / "run"),
                                        checkpoint_values.newest_state(tmp_path / "ref"))


# ---------------------------------------------------------------- the input, from a step
def _batches(ds, n):
    return [[np.asarray(t) for t in batch] for batch in ds.take(n)]


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        for a, b in zip(g, w):
            assert np.array_equal(a, b), f"batch {i} differs"


@pytest.mark.parametrize("cache", [False, True])
def test_imagenet_pipeline_from_a_step_reads_what_the_whole_stream_read(tiny_tfrecords,
                                                                        cache):
    """Epochs of 9 records in batches of 2: step 5 starts inside the second epoch; the
    stream from there equals the uninterrupted stream's batches 5.. (also the crops)."""
    from imagenet import input_pipeline as ip

    def stream(first_step):
        return ip.tfrecord_dataset(str(tiny_tfrecords), is_training=True, per_rank_batch=2,
                                   image_size=16, seed=3, cache=cache, num_parallel_calls=1,
                                   first_position=2 * first_step, epoch_size=9)
    whole = _batches(stream(0), 12)
    _assert_same_batches(_batches(stream(5), 7), whole[5:])
    # and the epochs differ in order (else the check above would be weak)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(whole[:4], whole[4:8]))


@pytest.mark.parametrize("cache", [None, "memory"])
def test_chexnet_pipeline_from_a_step_reads_what_the_whole_stream_read(tmp_path, cache):
    from chexnet import input_pipeline as cip
    from tests.test_loop import _xray_sample

    csv_path = _xray_sample(tmp_path / "x", n=7)
    paths = sorted(str(p) for p in (tmp_path / "x").glob("*.png"))
    labels = np.eye(14, dtype=np.float32)[np.arange(7) % 14]
    options = cip.InputOptions(24, "torch", cache, "fail", view="crop")
    assert csv_path.is_file()

    def stream(first_step):
        return cip.train_dataset(paths, labels, options, batch_size=2, seed=4,
                                 first_step=first_step)[0]
    whole = _batches(stream(0), 12)
    _assert_same_batches(_batches(stream(5), 7), whole[5:])
