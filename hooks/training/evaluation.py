"""Exact distributed evaluation: every example counted once, whatever the number of ranks.

Each rank evaluates its own disjoint shard to the end (no `steps = n // size`), then the
metric states are summed over ranks. Ranks may hold different numbers of examples.
"""
import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hooks.distributed import horovod_glue, watchdog

# Compiled step functions per network, so periodic evaluation traces once, not every time.
_STEPS = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class Evaluation:
    """One evaluation over all ranks: metric values (no `val_` prefix), the number of
    examples counted, the global step, and task-specific details (e.g. predictions)."""
    metrics: dict[str, float]
    count: int
    step: int = 0
    details: Any = None


def _cached_step(network, key, make):
    steps = _STEPS.setdefault(network, {})
    if key not in steps:
        steps[key] = tf.function(make(), reduce_retracing=True)
    return steps[key]


def evaluate(network: keras.Model, dataset: tf.data.Dataset,
             metrics: Sequence[keras.metrics.Metric],
             context: horovod_glue.Context) -> tuple[dict[str, float], int]:
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
    watchdog.beat(phase="evaluation (first batch: graph tracing)", slow=True)
    for x, y in dataset:
        step(x, y)
        seen += int(tf.shape(y)[0])
        watchdog.beat(phase="evaluation")
    total = int(horovod_glue.allreduce_sum([np.int64(seen)], context)[0])
    results = horovod_glue.global_metric_results(metrics, context)
    return {k: float(keras.ops.convert_to_numpy(v)) for k, v in results.items()}, total


def predict(network: keras.Model, dataset: tf.data.Dataset,
            context: horovod_glue.Context, activation=None) -> tuple[np.ndarray, ...]:
    """Run `network` over every rank's shard of (x, *rest) batches; returns
    (predictions, *rest) gathered on every rank in rank order (labels, weights...)."""
    def make():
        def forward(x):
            out = network(x, training=False)
            return activation(out) if activation is not None else out
        return forward
    step = _cached_step(network, ("predict", activation), make)

    columns = None
    watchdog.beat(phase="prediction (first batch: graph tracing)", slow=True)
    for batch in dataset:
        x, rest = batch[0], batch[1:]
        row = [np.asarray(step(x), dtype=np.float32)] + [np.asarray(r) for r in rest]
        columns = [[] for _ in row] if columns is None else columns
        for column, value in zip(columns, row):
            column.append(value)
        watchdog.beat(phase="prediction")
    if columns is None:  # an empty shard: zero rows of the right shapes, for allgather
        specs = dataset.element_spec
        empty = [tf.zeros((0,) + tuple(spec.shape[1:]), spec.dtype) for spec in specs]
        columns = [[np.asarray(step(empty[0]), np.float32)]] + [[e.numpy()] for e in empty[1:]]
    return tuple(horovod_glue.allgather(np.concatenate(c), context) for c in columns)
