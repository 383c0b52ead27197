"""Model builders: ResNet v1.5 (depths 18-200), DenseNet-121 and VGG16, as Keras 3 models.

VGG16 (`vgg16`) is keras.applications' VGG16 with its top, the network of the 2018 runs:
conv blocks, flatten, fc1 and fc2 (4096 each, ReLU), then the classifier (138,357,544
parameters at 1000 classes and 224 px). `vgg16_pooled` is the lighter variant with global
average pooling over the conv blocks and the classifier only (no fc1/fc2); it is not the
published VGG16, so nothing measured with it compares with the 2018 VGG16 runs.

ResNet follows the TPU reference (tensorflow/tpu models/official/resnet/resnet_model.py):
stride on the 3x3 conv of the bottleneck (v1.5), explicit padding for strided convs,
batch norm with decay 0.9 and epsilon 1e-5, the last BN of each block initialised to
zero, L2 weight decay on every non-BN weight (reference: wd * sum(w**2) / 2).
Every builder splits into `build_backbone` (pooled features) + a head, so chexnet can put
its own head on the same backbone.
"""

import functools

import keras
from keras import layers

from hooks.distributed.sync_batchnorm import SyncBatchNormalization
from hooks.errors import ConfigError
from imagenet.config import ARCHITECTURES, check_vgg16_input

RESNET_LAYERS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _l2(weight_decay):
    # Keras L2(l) adds l * sum(w**2); the reference adds wd * sum(w**2) / 2.
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def _conv(x, filters, kernel, strides, weight_decay, name):
    if strides > 1:
        # Padding independent of the input size, as the reference does.
        pad = kernel - 1
        x = layers.ZeroPadding2D(((pad // 2, pad - pad // 2),) * 2, name=name + "_pad")(x)
    return layers.Conv2D(filters, kernel, strides=strides,
                         padding="same" if strides == 1 else "valid", use_bias=False,
                         kernel_initializer=keras.initializers.VarianceScaling(
                             1.0, "fan_in", "truncated_normal"),
                         kernel_regularizer=_l2(weight_decay), name=name)(x)


@keras.saving.register_keras_serializable(package="hpc_resnet")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras BatchNormalization computed by TensorFlow's fused kernel (oneDNN on CPU).

    Same variables, update rule and results as the Keras layer, but one op instead of a
    dozen, and bfloat16 activations stay bfloat16 (Keras casts them to float32 and back
    around every BN). Falls back to the Keras code for masks, renorm or non-4D inputs.
    """

    def call(self, inputs, training=None, mask=None):
        if (mask is not None or self.renorm or len(inputs.shape) != 4
                or self.axis not in (3, -1) or not (self.center and self.scale)):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # this layer is TensorFlow-backend only

        x = tf.cast(inputs, self.compute_dtype)
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma.value, self.beta.value, epsilon=self.epsilon,
                is_training=True)
            # The kernel returns the unbiased batch variance; Keras averages the biased one.
            n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
            variance = variance * (n - 1.0) / tf.maximum(n, 2.0)
            self.moving_mean.assign(self.moving_mean * self.momentum
                                    + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum
                                        + variance * (1.0 - self.momentum))
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma.value, self.beta.value, mean=self.moving_mean.value,
                variance=self.moving_variance.value, epsilon=self.epsilon,
                is_training=False)
        return y


@keras.saving.register_keras_serializable(package="hpc_resnet")
class SyncFusedBatchNormalization(SyncBatchNormalization, FusedBatchNormalization):
    """SyncBatchNormalization (batch statistics over all ranks in training) that is
    FusedBatchNormalization in inference mode and at world size 1."""


def bn_class(fused: bool = True, sync: bool = False) -> type:
    """The batch-norm layer class for --fused_bn and --sync_bn (all four share variables)."""
    if sync:
        return SyncFusedBatchNormalization if fused else SyncBatchNormalization
    return FusedBatchNormalization if fused else layers.BatchNormalization


def _bn(x, name, relu=True, zero_init=False, fused=True, sync=False):
    kind = bn_class(fused, sync)
    x = kind(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
             gamma_initializer="zeros" if zero_init else "ones", name=name)(x)
    return layers.ReLU(name=name + "_relu")(x) if relu else x


def _block(x, filters, strides, kind, project, weight_decay, name, fused=True, sync=False):
    out_filters = filters * 4 if kind == "bottleneck" else filters
    bn = functools.partial(_bn, fused=fused, sync=sync)
    shortcut = x
    if project:
        shortcut = _conv(x, out_filters, 1, strides, weight_decay, name + "_proj")
        shortcut = bn(shortcut, name + "_proj_bn", relu=False)
    if kind == "bottleneck":
        x = bn(_conv(x, filters, 1, 1, weight_decay, name + "_conv1"), name + "_bn1")
        x = bn(_conv(x, filters, 3, strides, weight_decay, name + "_conv2"), name + "_bn2")
        x = _conv(x, out_filters, 1, 1, weight_decay, name + "_conv3")
        x = bn(x, name + "_bn3", relu=False, zero_init=True)
    else:
        x = bn(_conv(x, filters, 3, strides, weight_decay, name + "_conv1"), name + "_bn1")
        x = _conv(x, filters, 3, 1, weight_decay, name + "_conv2")
        x = bn(x, name + "_bn2", relu=False, zero_init=True)
    return layers.ReLU(name=name + "_out")(layers.Add(name=name + "_add")([x, shortcut]))


def resnet_backbone(inputs, depth: int, weight_decay: float, fused_bn: bool = True,
                    sync_bn: bool = False):
    if depth not in RESNET_LAYERS:
        raise ValueError(f"resnet depth {depth} is not one of {sorted(RESNET_LAYERS)}")
    kind, blocks = RESNET_LAYERS[depth]
    x = _bn(_conv(inputs, 64, 7, 2, weight_decay, "conv1"), "bn1", fused=fused_bn,
            sync=sync_bn)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    for group, (filters, count) in enumerate(zip((64, 128, 256, 512), blocks)):
        for i in range(count):
            strides = 2 if (i == 0 and group > 0) else 1
            x = _block(x, filters, strides, kind, project=(i == 0), weight_decay=weight_decay,
                       name=f"g{group + 1}b{i + 1}", fused=fused_bn, sync=sync_bn)
    return layers.GlobalAveragePooling2D(name="avg_pool")(x)


def fuse_batch_norms(model: keras.Model, kind: type = FusedBatchNormalization) -> keras.Model:
    """A copy of a functional `model` with every Keras BatchNormalization replaced by a
    `kind` (FusedBatchNormalization, or another `bn_class`) of the same configuration, and
    the same weights (same layer names and variable paths, so weights files and
    checkpoints load into either)."""
    def clone(layer):
        if type(layer) is layers.BatchNormalization:
            return kind.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    fused = keras.models.clone_model(model, clone_function=clone)
    fused.set_weights(model.get_weights())
    return fused


def vgg16_fc_head(inputs, image_size: int, weights_file: str | None) -> keras.Model:
    """keras.applications.VGG16 with its top, cut after fc2 (4096 features).

    Its weights: None, "imagenet" (224 px only: fc1 takes 7 x 7 x 512 inputs) or a file of
    Keras VGG16 weights with top (1000 classes) at this image size. Needs 32 px or more.
    """
    try:
        base = keras.applications.VGG16(include_top=True, weights=weights_file,
                                        input_tensor=inputs, classes=1000)
    except ValueError as err:
        if not weights_file or weights_file == "imagenet":
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--weights_file={weights_file} does not fit vgg16 with its 2x4096 "
                          f"fc head at {image_size} px ({first}); vgg16 takes Keras's VGG16 "
                          "weights with top saved at that size; a *_notop.h5 file goes with "
                          "vgg16_pooled") from None
    return keras.Model(base.inputs[0], base.get_layer("fc2").output)


def build_backbone(architecture: str, image_size: int, depth: int = 50,
                   weight_decay: float = 0.0, weights_file: str | None = None,
                   channels: int = 3, fused_bn: bool = True,
                   sync_bn: bool = False) -> keras.Model:
    """Input image -> feature vector (pooled; VGG16: its fc2 output). `weights_file` loads
    Keras application weights (e.g. a downloaded `*_notop.h5`; for vgg16 a file with top)
    into DenseNet/VGG backbones. `fused_bn` (default): every batch norm is a
    FusedBatchNormalization (DenseNet's are swapped after the weights are loaded); False
    keeps Keras's BatchNormalization, for comparison. `sync_bn`: either kind synchronizes
    its batch statistics over the Horovod ranks (`hooks.distributed.sync_batchnorm`).
    VGG16 has none.
    Checkpoints load into every kind (`hooks.state.bn_weights`)."""
    inputs = keras.Input((image_size, image_size, channels), name="image")
    if architecture == "resnet":
        features = resnet_backbone(inputs, depth, weight_decay, fused_bn, sync_bn)
        if weights_file:
            raise ValueError("--weights_file applies to densenet121/vgg16; a ResNet starts "
                             "from a resnet_main checkpoint")
        return keras.Model(inputs, features, name=f"resnet{depth}_backbone")
    apps = {"densenet121": keras.applications.DenseNet121,
            "vgg16_pooled": keras.applications.VGG16}
    check_vgg16_input(architecture, image_size, weights_file)
    if architecture == "vgg16":
        base = vgg16_fc_head(inputs, image_size, weights_file)
    elif architecture in apps:
        base = apps[architecture](include_top=False, weights=weights_file,
                                  input_tensor=inputs, pooling="avg")
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of "
                         f"{', '.join(ARCHITECTURES)}")
    if fused_bn or sync_bn:
        base = fuse_batch_norms(base, bn_class(fused_bn, sync_bn))
    if weight_decay:
        for layer in base.layers:
            if isinstance(layer, (layers.Conv2D, layers.Dense)):
                # Keras 3 collects regularisation losses from the variables themselves.
                layer.kernel.regularizer = _l2(weight_decay)
    return keras.Model(base.inputs[0], base.output, name=f"{architecture}_backbone")


def build_classifier(architecture: str, num_classes: int, image_size: int, depth: int = 50,
                     weight_decay: float = 0.0, weights_file: str | None = None,
                     fused_bn: bool = True, sync_bn: bool = False) -> keras.Model:
    """Backbone + dense logits (float32 under mixed precision)."""
    backbone = build_backbone(architecture, image_size, depth, weight_decay, weights_file,
                              fused_bn=fused_bn, sync_bn=sync_bn)
    logits = layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(
        stddev=0.01), kernel_regularizer=_l2(weight_decay), bias_regularizer=_l2(weight_decay),
        dtype="float32", name="logits")(backbone.output)
    name = f"resnet{depth}" if architecture == "resnet" else architecture
    return keras.Model(backbone.input, logits, name=name)
