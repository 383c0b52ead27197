"""Synchronized batch norm on Keras 3: batch statistics over every rank's batch.

Horovod's own `hvd.SyncBatchNormalization` (0.28.1) passes `fused=` to Keras 3's
BatchNormalization and fails; this layer is ours, on `hvd.allreduce`. In training mode, at
a world size above 1, each rank sums its inputs, their squares and its count over the
reduction axes (in float32, also under mixed_bfloat16), ONE Sum allreduce of those
concatenated (2 * channels + 1 floats) gives the global sums, and the layer normalises
with the global mean and biased variance E[x^2] - E[x]^2. Everything else is Keras's own
BatchNormalization code: the moving averages follow the global (biased) batch statistics
exactly as Keras updates them from its local ones, so they stay equal on every rank.
Inference mode uses the moving statistics and communicates nothing; at world size 1 (no
Horovod, or one rank) the layer is exactly its base class.

Gradients. Horovod registers the gradient of a Sum allreduce as the Sum allreduce of the
upstream gradient. With per-rank losses L_r (each the mean over the rank's own batch) and
the one-process loss L = (1/R) sum_r L_r, dL_total/dS_q of a rank's local sums S_q is
sum_r dL_r/dS (S = sum_q S_q): exactly that Sum allreduce. So each rank's backward pass
yields its own examples' share of d(sum_r L_r)/dtheta, and the average over ranks that
`DistributedTrainer` applies is dL/dtheta, the one-process gradient on the concatenated
batch (an input's gradient on its rank is R times the one-process one). Unequal shares
(elastic) stay exact because the trainer weights each rank's loss, not its gradient.

Elastic: the allreduce runs in the Horovod world current when it executes; whether the
layer synchronizes (size > 1) is decided when it is traced, and our training loop re-traces
after every world change (`hooks.training.loop`: `train_function = None`).
"""

from __future__ import annotations

import sys

import keras
from keras import layers


def world_size() -> int:
    """Ranks of the current Horovod world; 1 when Horovod is not loaded or not initialised
    (the layer never loads Horovod itself)."""
    hvd = sys.modules.get("horovod.tensorflow")
    if hvd is None or not hvd.is_initialized():
        return 1
    return hvd.size()


def global_moments(inputs, axes, mask=None):
    """(mean, biased variance) per channel of `inputs` over `axes` and over every rank's
    batch: one Sum allreduce of [sum, sum of squares, count] in float32. A collective."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    x = tf.cast(inputs, tf.float32)
    if mask is None:
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
        total, squares = tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes)
    else:  # Keras's masks cover every axis but the last (the channels)
        weights = tf.cast(tf.expand_dims(mask, -1), tf.float32)
        count = tf.reduce_sum(weights)
        total = tf.reduce_sum(x * weights, axes)
        squares = tf.reduce_sum(tf.square(x) * weights, axes)
    channels = tf.shape(total)[0]
    stats = hvd.allreduce(tf.concat([total, squares, tf.reshape(count, [1])], 0),
                          op=hvd.Sum)
    count = tf.maximum(stats[2 * channels], 1.0)
    mean = stats[:channels] / count
    # E[x^2] - E[x]^2 can come out a rounding error below zero.
    variance = tf.maximum(stats[channels:2 * channels] / count - tf.square(mean), 0.0)
    return mean, variance


@keras.saving.register_keras_serializable(package="hpc_resnet")
class SyncBatchNormalization(layers.BatchNormalization):
    """Keras's BatchNormalization with batch statistics over all Horovod ranks in training
    (see the module). Same variables (gamma, beta, moving_mean, moving_variance), so
    checkpoints load into the unsynchronized layers and back (`hooks.state.bn_weights`).
    Subclasses with another base (imagenet.models.SyncFusedBatchNormalization) keep that
    base's code in inference mode and at world size 1."""

    def call(self, inputs, training=None, mask=None):
        if training and self.trainable and world_size() > 1:
            # Keras's training-mode code, which takes its statistics from _moments below.
            return layers.BatchNormalization.call(self, inputs, training=training, mask=mask)
        return super().call(inputs, training=training, mask=mask)

    def _moments(self, inputs, mask):
        if world_size() == 1:
            return super()._moments(inputs, mask)
        return global_moments(inputs, self._reduction_axes, mask)
