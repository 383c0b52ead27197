"""Model builders: the fused batch norm equals Keras's, ResNet sizes match the reference."""
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from imagenet import models


def _pair():
    kwargs = dict(momentum=0.9, epsilon=1e-5)
    keras_bn = keras.layers.BatchNormalization(**kwargs)
    fused = models.FusedBatchNormalization(**kwargs)
    for layer in (keras_bn, fused):
        layer.build((None, 5, 5, 4))
    rng = np.random.default_rng(0)
    weights = [rng.uniform(0.5, 1.5, 4), rng.normal(size=4), rng.normal(size=4),
               rng.uniform(0.5, 2.0, 4)]
    keras_bn.set_weights(weights)
    fused.set_weights(weights)
    return keras_bn, fused


@pytest.mark.parametrize("training", [True, False])
def test_fused_batch_norm_matches_keras(training):
    keras_bn, fused = _pair()
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, size=(3, 5, 5, 4)),
                    tf.float32)
    for _ in range(2):  # twice: the moving statistics are updated the same way
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y_keras, y_fused = keras_bn(x, training=training), fused(x, training=training)
            weights = tf.range(4, dtype=tf.float32) + 1.0
            loss_k = tf.reduce_sum(y_keras ** 2 * weights)
            loss_f = tf.reduce_sum(y_fused ** 2 * weights)
        np.testing.assert_allclose(y_fused, y_keras, atol=1e-5)
        np.testing.assert_allclose(tape.gradient(loss_f, x), tape.gradient(loss_k, x),
                                   atol=1e-4)
        for a, b in zip(fused.trainable_weights, keras_bn.trainable_weights):
            np.testing.assert_allclose(tape.gradient(loss_f, a), tape.gradient(loss_k, b),
                                       rtol=1e-5, atol=1e-4)
    for a, b in zip(fused.get_weights(), keras_bn.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_fused_batch_norm_keeps_bfloat16():
    fused = models.FusedBatchNormalization(dtype="mixed_bfloat16")
    x = tf.cast(tf.random.normal((2, 5, 5, 4)), tf.bfloat16)
    assert fused(x, training=True).dtype == tf.bfloat16
    assert fused.moving_mean.dtype == "float32"


# torchvision's trainable counts; v1.5 moves a stride, not a weight. The TPU reference
# (which we follow) also projects the shortcut of ResNet-18's first block: a 64x64 1x1 conv
# and its BN, 4096 + 128 weights more.
@pytest.mark.parametrize("depth, params", [(18, 11_689_512 + 4096 + 128), (50, 25_557_032)])
def test_resnet_parameter_counts_match_the_reference(depth, params):
    model = models.build_classifier("resnet", 1000, 64, depth=depth)
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == params


def test_fuse_batch_norms_keeps_weights_names_and_outputs():
    inputs = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.99, epsilon=1.001e-5, name="bn")(x)
    x = keras.layers.Concatenate(name="cat")([x, x])
    x = keras.layers.BatchNormalization(name="bn2")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="pool")(x))
    rng = np.random.default_rng(0)
    model.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32")
                       for w in model.get_weights()])
    fused = models.fuse_batch_norms(model)
    assert [type(fused.get_layer(n)) for n in ("bn", "bn2")] == \
        [models.FusedBatchNormalization] * 2
    assert fused.get_layer("bn").momentum == 0.99 and fused.get_layer("bn").epsilon == 1.001e-5
    assert [w.path for w in fused.weights] == [w.path for w in model.weights]
    for a, b in zip(fused.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(fused(x, training=False), model(x, training=False), atol=1e-5)
    np.testing.assert_allclose(fused(x, training=True), model(x, training=True), atol=1e-4)


@pytest.mark.slow  # two DenseNet-121 builds: 10-40 s here
def test_fused_densenet_loads_a_keras_weights_file(tmp_path):
    # fused_bn swaps the layers after keras.applications has loaded the weights file, so
    # pretrained weights arrive unchanged (the same variables, now under fused layers).
    keras.utils.set_random_seed(5)
    notop = keras.applications.DenseNet121(weights=None, include_top=False, pooling="avg",
                                           input_shape=(32, 32, 3))
    weights_file = str(tmp_path / "densenet121_notop.weights.h5")
    notop.save_weights(weights_file)
    fused = models.build_backbone("densenet121", 32, weights_file=weights_file, fused_bn=True)
    assert sum(type(l) is models.FusedBatchNormalization for l in fused.layers) == 121
    assert not any(type(l) is keras.layers.BatchNormalization for l in fused.layers)
    assert [w.path for w in fused.weights] == [w.path for w in notop.weights]
    for loaded, saved in zip(fused.get_weights(), notop.get_weights()):
        np.testing.assert_array_equal(loaded, saved)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the backbone takes one tensor, not a list
        np.testing.assert_allclose(fused(x, training=False), notop(x, training=False),
                                   atol=1e-4)
