"""Exact distributed evaluation: every example counted once, whatever the number of ranks.

Each rank evaluates its own disjoint shard to the end (no `steps = n // size`), then the
metric states are summed over ranks. Ranks may hold different numbers of examples.
"""
import weakref
from typing import Dict, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from hooks import horovod_glue

# Compiled step functions per network, so periodic evaluation traces once, not every time.
_STEPS = weakref.WeakKeyDictionary()


def _cached_step(network, key, make):
    steps = _STEPS.setdefault(network, {})
    if key not in steps:
        steps[key] = tf.function(make(), reduce_retracing=True)
    return steps[key]


def evaluate(network: keras.Model, dataset: tf.data.Dataset,
             metrics: Sequence[keras.metrics.Metric],
             context: horovod_glue.Context) -> Tuple[Dict[str, float], int]:
    """Run `network` over this rank's `dataset` of (x, y) batches; return the global metric
    results and the global number of examples seen."""
    for metric in metrics:
        metric.reset_state()

    def make():
        def update(x, y):
            y_pred = network(x, training=False)
            for metric in metrics:
                metric.update_state(y, y_pred)
        return update
    step = _cached_step(network, ("evaluate",) + tuple(id(m) for m in metrics), make)

    seen = 0
    for x, y in dataset:
        step(x, y)
        seen += int(tf.shape(y)[0])
    total = int(horovod_glue.allreduce_sum([np.int64(seen)], context)[0])
    results = horovod_glue.global_metric_results(metrics, context)
    return {k: float(keras.ops.convert_to_numpy(v)) for k, v in results.items()}, total


def predict(network: keras.Model, dataset: tf.data.Dataset,
            context: horovod_glue.Context, activation=None) -> Tuple[np.ndarray, np.ndarray]:
    """Predictions and labels of every rank's shard, gathered on every rank (rank order)."""
    def make():
        def forward(x):
            out = network(x, training=False)
            return activation(out) if activation is not None else out
        return forward
    step = _cached_step(network, ("predict", activation), make)

    preds, labels = [], []
    for x, y in dataset:
        preds.append(np.asarray(step(x), dtype=np.float32))
        labels.append(np.asarray(y))
    local_p = np.concatenate(preds) if preds else np.zeros((0,) + tuple(
        network.output.shape[1:]), np.float32)
    local_y = np.concatenate(labels) if labels else np.zeros((0,) + local_p.shape[1:],
                                                            np.float32)
    return (horovod_glue.allgather(local_p, context),
            horovod_glue.allgather(local_y, context))
