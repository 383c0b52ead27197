"""Paths users take, run in-process end to end and checked by value: bfloat16 against
float32, --seed reproducibility, --stop_at_target, --eval_after_training, DenseNet-121 and
VGG16 (+ --weights_file), TFDS input, a corrupt record met mid-run, chexnet with SGD.

In-process but each trains a real (tiny) model, so they are in the slow tier."""
import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from chexnet import model as chexnet_model
from chexnet import train as chexnet_train
from chexnet.config import ChexnetConfig
from hooks import runtime
from hooks.distributed.horovod_glue import Context, DistributedTrainer
from hooks.errors import ConfigError, DataError
from hooks.practices import schedules
from hooks.state import checkpoints
from imagenet import config as config_lib
from imagenet import input_pipeline as ip
from imagenet import models
from imagenet import train as imagenet_train
from imagenet.config import RunConfig
from tests.test_loop import QUIET, TINY_RESNET, _xray_sample

pytestmark = pytest.mark.slow


def _run(**kwargs):
    try:
        return imagenet_train.run(RunConfig(**kwargs), Context(), **QUIET)
    finally:
        runtime.set_precision("float32")  # the global Keras policy a bf16 run sets


def _checkpoint_weights(model_dir, step, network):
    checkpoints.restore(checkpoints.read(f"{model_dir}/ckpt-{step:09d}"), network)
    return [w.copy() for w in network.get_weights()]


def _tiny(**kwargs):
    return models.build_classifier("resnet", kwargs.get("num_label_classes", 5), 32, depth=18)


# ---------------------------------------------------------------- precision, stopping
def test_bfloat16_run_is_within_tolerance_of_float32_and_stops_at_target(tmp_path,
                                                                        monkeypatch):
    common = dict(TINY_RESNET, mode="train_and_eval", train_steps=6, num_eval_images=16,
                  target_top_1=0.0, stop_at_target=True)
    conv_dtypes, build = [], models.build_classifier

    def build_and_record(*args, **kwargs):
        network = build(*args, **kwargs)
        conv_dtypes.append({layer.compute_dtype for layer in network.layers
                            if isinstance(layer, keras.layers.Conv2D)})
        return network
    monkeypatch.setattr(models, "build_classifier", build_and_record)
    fp32 = _run(model_dir=str(tmp_path / "fp32"), **common)
    bf16 = _run(model_dir=str(tmp_path / "bf16"), precision="bfloat16", **common)
    monkeypatch.undo()
    assert conv_dtypes == [{"float32"}, {"bfloat16"}]  # the bf16 run computed in bf16
    for summary in (fp32, bf16):  # the first evaluation (step 2) reaches 0.0: stop there
        assert summary["final_step"] == 2 and summary["time_to_target"]["step"] == 2
    # Same data, same initial weights. Measured here: eval loss 1.58785 (fp32) vs 1.58777
    # (bf16), 5e-5 relative; weights after 2 steps differ by 0.6% of the largest fp32
    # update. Tolerances: 1e-3 relative loss, 3% of the largest update; and a difference
    # must exist (bf16 really ran).
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=1e-3)
    assert bf16["loss"] != fp32["loss"]
    w32 = _checkpoint_weights(tmp_path / "fp32", 2, _tiny())
    w16 = _checkpoint_weights(tmp_path / "bf16", 2, _tiny())
    start = _tiny_initial()
    moved = max(np.abs(a - s).max() for a, s in zip(w32, start))
    deviation = max(np.abs(a - b).max() for a, b in zip(w16, w32))
    assert moved > 1e-3 and 0 < deviation < 0.03 * moved


def _tiny_initial(seed=1):
    keras.utils.set_random_seed(seed)
    return [w.copy() for w in _tiny().get_weights()]


# ---------------------------------------------------------------- seed, eval_after_training
def test_seed_gives_bit_identical_runs(tiny_tfrecords, tmp_path):
    common = dict(data_dir=str(tiny_tfrecords), mode="train", eval_after_training=True,
                  resnet_depth=18, image_size=32, num_label_classes=3, train_batch_size=2,
                  eval_batch_size=4, train_steps=3, num_train_images=9, iterations_per_loop=3)
    runs = []
    for name in ("a", "b"):
        summary = _run(model_dir=str(tmp_path / name), seed=7, **common)
        runs.append((summary, _checkpoint_weights(tmp_path / name, 3, _tiny(
            num_label_classes=3))))
    (sa, wa), (sb, wb) = runs
    for a, b in zip(wa, wb):
        np.testing.assert_array_equal(a, b)
    assert sa["loss"] == sb["loss"] and sa["top_1"] == sb["top_1"]
    # Not just the initialisation: the weights moved from the seeded initial ones.
    keras.utils.set_random_seed(7)
    start = _tiny(num_label_classes=3).get_weights()
    assert max(np.abs(a - s).max() for a, s in zip(wa, start)) > 1e-3
    # --eval_after_training with --mode=train: one evaluation of all 9 validation images.
    assert sa["eval_images"] == 9


# ---------------------------------------------------------------- other architectures
def _one_step_matches_sgd(network, num_classes, lr=0.01, momentum=0.9):
    """One DistributedTrainer step (eager: tracing DenseNet-121 costs minutes on 2 cores)
    moves every trainable variable by the first Nesterov step -lr * (1 + momentum) * g,
    with g computed here by an independent GradientTape."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    y = np.array([1, num_classes - 1])
    variables = network.trainable_variables
    before = [v.numpy().copy() for v in variables]
    with tf.GradientTape() as tape:
        logits = network(x, training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    grads = [g.numpy() for g in tape.gradient(loss, variables)]
    trainer = DistributedTrainer(network, Context())
    trainer.compile(optimizer=imagenet_train.build_optimizer(
        RunConfig(momentum=momentum), lr), loss=imagenet_train.build_loss(0.0, num_classes),
        run_eagerly=True)
    trainer.train_on_batch(x, y)
    for v, w0, g in zip(variables, before, grads):
        np.testing.assert_allclose(v.numpy() - w0, -lr * (1 + momentum) * g, rtol=2e-3,
                                   atol=1e-7, err_msg=v.path)
    assert sum(np.abs(g).sum() > 0 for g in grads) == len(grads)


def test_densenet121_matches_keras_applications_and_trains():
    keras.utils.set_random_seed(3)
    network = models.build_classifier("densenet121", 4, 32)
    notop = keras.applications.DenseNet121(weights=None, include_top=False, pooling="avg",
                                           input_shape=(32, 32, 3)).count_params()
    # keras.applications.DenseNet121(classes=1000) has 8,062,504: features + 1024x1000 head.
    assert notop + 1024 * 1000 + 1000 == 8_062_504
    assert network.count_params() == notop + 1024 * 4 + 4
    _one_step_matches_sgd(network, 4)


def test_vgg16_pooled_matches_keras_applications_loads_a_weights_file_and_trains(tmp_path):
    keras.utils.set_random_seed(11)
    notop = keras.applications.VGG16(weights=None, include_top=False, pooling="avg",
                                     input_shape=(32, 32, 3))
    weights_file = str(tmp_path / "vgg16_notop.weights.h5")
    notop.save_weights(weights_file)
    config_lib.validate(RunConfig(architecture="vgg16_pooled", weights_file=weights_file,
                                  use_synthetic_data=True))
    # vgg16_pooled: global average pooling + one dense layer (no 4096-wide fc1/fc2).
    network = models.build_classifier("vgg16_pooled", 4, 32, weights_file=weights_file)
    assert network.count_params() == notop.count_params() + 512 * 4 + 4
    assert notop.count_params() == 14_714_688  # keras.applications' VGG16 without top
    for loaded, saved in zip(network.get_weights(), notop.get_weights()):  # backbone first
        np.testing.assert_array_equal(loaded, saved)
    _one_step_matches_sgd(network, 4)


def test_vgg16_loads_keras_weights_with_top_and_trains(tmp_path):
    keras.utils.set_random_seed(12)
    top = keras.applications.VGG16(weights=None, input_shape=(32, 32, 3))  # include_top
    weights_file = str(tmp_path / "vgg16.weights.h5")
    top.save_weights(weights_file)
    network = models.build_classifier("vgg16", 4, 32, weights_file=weights_file)
    # Every layer up to fc2 is the file's; the classifier is new (4 classes, not 1000).
    for loaded, saved in zip(network.get_weights()[:-2], top.get_weights()[:-2]):
        np.testing.assert_array_equal(loaded, saved)
    assert len(network.get_weights()) == len(top.get_weights())
    assert network.get_layer("logits").kernel.shape == (4096, 4)
    _one_step_matches_sgd(network, 4)
    # A file without top does not fit the fc head: one line saying which variant it fits.
    notop_file = str(tmp_path / "vgg16_notop.weights.h5")
    keras.applications.VGG16(weights=None, include_top=False,
                             input_shape=(32, 32, 3)).save_weights(notop_file)
    with pytest.raises(ConfigError, match="vgg16_notop.weights.h5 does not fit vgg16 .*"
                       "vgg16_pooled") as err:
        models.build_classifier("vgg16", 4, 32, weights_file=notop_file)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- TFDS
def test_tfds_through_the_run_counts_and_scores_every_example(tmp_path):
    config = RunConfig(tfds_data_dir=str(tmp_path / "tfds"), mode="train_and_eval",
                       train_steps=1, resnet_depth=18, image_size=32, train_batch_size=2,
                       eval_batch_size=4, num_train_images=6, iterations_per_loop=1,
                       model_dir=str(tmp_path / "run"), seed=0)
    config_lib.validate(config)
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = imagenet_train.run(config, Context(), **QUIET)
        network = models.build_classifier("resnet", 1000, 32, depth=18)
        _checkpoint_weights(tmp_path / "run", 1, network)
        logits, labels = [], []
        for x, y in ip.tfds_dataset(config.tfds_data_dir, is_training=False, per_rank_batch=4,
                                    image_size=32):
            logits.append(network(x, training=False).numpy())
            labels.append(y.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    assert summary["eval_images"] == len(labels) == 6
    assert summary["top_1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert summary["top_5"] == pytest.approx(np.mean([y in t for y, t in zip(labels, top5)]))


# ---------------------------------------------------------------- faults mid-run
def test_corrupt_record_mid_run_is_a_data_error_naming_the_shard(tiny_tfrecords, tmp_path,
                                                                 monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_tfrecords, data)
    shard = data / "train-00001-of-00002"
    shard.write_bytes(shard.read_bytes()[:2600])  # the scan's first record survives
    monkeypatch.setattr(ip, "SCAN_RECORDS", 1)
    with pytest.raises(DataError, match=f"rank 0: corrupt TFRecord shard {shard} "):
        _run(data_dir=str(data), mode="train", resnet_depth=18, image_size=32,
             num_label_classes=3, train_batch_size=2, train_steps=2, num_train_images=9)


# ---------------------------------------------------------------- chexnet with SGD
def test_chexnet_sgd_applies_the_momentum_rule(tmp_path):
    csv_path = _xray_sample(tmp_path / "x")
    config = ChexnetConfig(csv=str(csv_path), image_dir=str(tmp_path / "x"), mode="train",
                           backbone="resnet18", image_size=32, optimizer="sgd", momentum=0.8,
                           learning_rate=0.05, warmup_epochs=0.0,
                           split_fractions=(0.5, 0.5, 0.0), train_batch_size=2,
                           eval_batch_size=4, train_steps=2, steps_per_loop=1,
                           model_dir=str(tmp_path / "run"), seed=0, allow_random_init=True)
    chexnet_train.run(config, Context(), **QUIET)
    states = []
    for step in (1, 2):
        network, _ = chexnet_model.build_chexnet_model("resnet18", 32)
        # A schedule, as chexnet's: then Keras keeps no learning-rate variable.
        optimizer = keras.optimizers.SGD(schedules.LinearWarmup(0.05, 0), momentum=0.8)
        checkpoints.restore(checkpoints.read(str(tmp_path / "run" / f"ckpt-{step:09d}")),
                            network, optimizer)
        states.append(({v.path: v.numpy() for v in network.trainable_variables},
                       {v.path: optimizer.momentums[optimizer._get_variable_index(v)].numpy()
                        for v in network.trainable_variables}))
    (w1, m1), (w2, m2) = states
    # Keras SGD: m2 = 0.8 * m1 - lr * g2 and w2 = w1 + m2. (Adam would keep two other slots
    # and move the weights by a normalised step instead.)
    for path in w1:
        np.testing.assert_allclose(w2[path] - w1[path], m2[path], rtol=1e-4, atol=1e-7)
    assert max(np.abs(m).max() for m in m2.values()) > 1e-6
