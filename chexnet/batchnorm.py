"""Batch-norm statistics that fit the weights they normalise ("precise BN").

In training mode a BN layer normalises with the batch's own mean and variance; in
inference mode (evaluate, predict, Grad-CAM) with its moving averages, which follow the
batch statistics with momentum 0.9 (0.99 in Keras's applications). After a short
fine-tune, or one with a high learning rate, the weights have moved faster than those
averages: inference then normalises with statistics of older weights, and the outputs
can saturate or stop depending on the image even where training mode fits the data.

`recompute` replaces the moving mean and variance of every trainable BN layer by the
average, over training batches in training mode, of the batch mean and (biased) variance
that layer sees, averaged over all ranks: PreciseBN (Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm", section 3; fvcore's `update_bn_stats`). chexnet runs it before
every evaluation and checkpoint (``--bn_stats_images``), so evaluated, checkpointed and
predicted weights agree. Nothing else changes: gradients, optimizer state and the
training-mode forward pass are untouched. With --sync_bn the layers before each one
normalise with the statistics of all ranks' batches, as in training.
"""

from __future__ import annotations

import weakref

import numpy as np

_PROBES = weakref.WeakKeyDictionary()  # network -> (world size, compiled statistics function)


def bn_layers(network) -> list:
    """The network's trainable BatchNormalization layers (frozen ones keep their stats)."""
    import keras

    return [layer for layer in network.layers
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def _probe(network, layers):
    """tf.function: images -> [(mean, variance)] per layer, of each layer's input in
    training mode, reduced over every axis but the channel axis, in float32."""
    from hooks.distributed import sync_batchnorm

    # --sync_bn layers decide when traced whether they synchronize: trace again for a new
    # world size (elastic).
    world = sync_batchnorm.world_size()
    if network in _PROBES and _PROBES[network][0] == world:
        return _PROBES[network][1]
    import keras
    import tensorflow as tf

    model = keras.Model(network.input, [layer.input for layer in layers])

    @tf.function(reduce_retracing=True)
    def probe(images):
        outputs = model(images, training=True)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        stats = []
        for x in outputs:
            x = tf.cast(x, tf.float32)
            stats.append(tf.nn.moments(x, axes=list(range(len(x.shape) - 1))))
        return stats

    _PROBES[network] = (world, probe)
    return probe


def recompute(network, dataset, batches: int, context) -> int:
    """Set each trainable BN layer's moving mean/variance to the mean over the first
    `batches` batches of `dataset` ((images, ...) batches of this rank), and over all
    ranks, of its training-mode batch mean/variance. A collective: every rank calls it.
    Returns the global number of batches used (0: nothing changed)."""
    from hooks.distributed import horovod_glue

    layers = bn_layers(network)
    if not layers or batches < 1:
        return 0
    probe = _probe(network, layers)
    sums = [np.zeros(int(layer.moving_mean.shape[0]), np.float64) for layer in layers
            for _ in range(2)]
    seen = 0
    for batch in dataset.take(batches):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        for i, (mean, variance) in enumerate(probe(images)):
            sums[2 * i] += mean.numpy()
            sums[2 * i + 1] += variance.numpy()
        seen += 1
    totals = horovod_glue.allreduce_sum(sums + [np.asarray([seen], np.float64)], context)
    count = int(totals[-1][0])
    if count == 0:
        return 0
    for i, layer in enumerate(layers):
        layer.moving_mean.assign((totals[2 * i] / count).astype(np.float32))
        layer.moving_variance.assign((totals[2 * i + 1] / count).astype(np.float32))
    return count
