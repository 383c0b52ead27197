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


# ---------------------------------------------------------------- VGG16
VGG16_CONVS = ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
               (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512))


def _vgg16_params(image_size, classes, head="fc"):
    """VGG16's parameters from its layer table (Simonyan and Zisserman, configuration D):
    13 3x3 convolutions with biases, five 2x2 poolings, then flatten + fc 4096 + fc 4096 +
    classifier ("fc") or global average pooling + classifier ("pooled")."""
    conv = sum(9 * c_in * c_out + c_out for c_in, c_out in VGG16_CONVS)
    if head == "pooled":
        return conv + 512 * classes + classes
    flat = (image_size // 32) ** 2 * 512
    return conv + flat * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * classes + classes


@pytest.mark.slow  # two 138M-parameter builds (about 1 GB, 10-30 s here)
def test_vgg16_is_keras_applications_vgg16_with_top_at_224():
    ours = models.build_classifier("vgg16", 1000, 224).count_params()
    theirs = keras.applications.VGG16(weights=None).count_params()  # include_top=True
    assert ours == theirs == _vgg16_params(224, 1000) == 138_357_544


@pytest.mark.parametrize("image_size", [32, 64])
def test_vgg16_fc_head_at_small_images(image_size):
    keras.utils.set_random_seed(0)
    network = models.build_classifier("vgg16", 5, image_size)
    reference = keras.applications.VGG16(weights=None, input_shape=(image_size, image_size, 3),
                                         classes=5)
    assert network.count_params() == reference.count_params() == _vgg16_params(image_size, 5)
    # The same layers in the same order: flatten, fc1, fc2 (4096, ReLU), then the classifier.
    ours = [(w.path.split("/")[0], tuple(w.shape)) for w in network.weights]
    keras_ = [(w.path.split("/")[0], tuple(w.shape)) for w in reference.weights]
    assert ours[:-2] == keras_[:-2] and [s for _, s in ours[-2:]] == [s for _, s in keras_[-2:]]
    assert [layer.name for layer in network.layers[-4:]] == ["flatten", "fc1", "fc2", "logits"]
    assert network.get_layer("fc1").activation is keras.activations.relu
    out = network(np.zeros((2, image_size, image_size, 3), np.float32), training=False)
    assert out.shape == (2, 5)


def test_vgg16_pooled_keeps_the_pooled_head():
    network = models.build_classifier("vgg16_pooled", 5, 32)
    assert network.name == "vgg16_pooled"
    notop = keras.applications.VGG16(weights=None, include_top=False, pooling="avg",
                                     input_shape=(32, 32, 3)).count_params()
    assert network.count_params() == notop + 512 * 5 + 5 == _vgg16_params(32, 5, "pooled")
    assert not any(layer.name in ("fc1", "fc2", "flatten") for layer in network.layers)


@pytest.mark.parametrize("architecture", ["vgg16", "vgg16_pooled"])
def test_vgg16_refuses_images_under_32_px(architecture):
    from hooks.errors import ConfigError
    with pytest.raises(ConfigError, match="--image_size=16.*32 px"):
        models.build_classifier(architecture, 5, 16)
