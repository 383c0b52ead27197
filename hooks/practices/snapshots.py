"""Snapshots and collapsed ensembles (the 2018 practice): save the weights at the end of
each collapse phase and score the average of the snapshots' predictions.

- `SnapshotSaver`: rank 0 writes the network weights at given global steps as
  `snapshot-<step>.weights.h5`, atomically.
- `CollapsedEnsembleEvaluator`: top-1 of each snapshot and of the average of their
  softmax outputs, exact over all ranks (`hooks.training.evaluation.predict`); a collective.
"""
import os
from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import ops

from hooks.distributed import horovod_glue
from hooks.state import bn_weights
from hooks.training import evaluation
from hooks.training.steps import check_int, global_step

__all__ = ["CollapsedEnsembleEvaluator", "SnapshotSaver", "ensemble_top_1", "snapshot_path",
           "top_1"]


def _check_context(context):
    if not isinstance(context, horovod_glue.Context):
        raise ValueError("context must be a hooks.distributed.horovod_glue.Context, "
                         f"got {context!r}")
    return context


def snapshot_path(directory: str, step: int) -> str:
    """Where `SnapshotSaver` writes the snapshot of global step `step`."""
    return os.path.join(directory, f"snapshot-{check_int('step', step):09d}.weights.h5")


class SnapshotSaver(keras.callbacks.Callback):
    """Rank 0 saves the network weights when the global step reaches each snapshot step.

    Args:
        snapshot_steps: global steps (ends of collapse phases, e.g.
            `Preset.snapshot_steps`), each >= 1.
        directory: folder for `snapshot-<step>.weights.h5` (see `snapshot_path`).
        context: the Horovod context; other ranks do nothing.
        network: the model to save; default `model.network` of a `DistributedTrainer`,
            else the model being fit.

    `saved` lists the paths this rank wrote; `paths()` the paths of every snapshot step.
    """

    def __init__(self, snapshot_steps: Sequence[int], directory: str,
                 context: horovod_glue.Context, network: keras.Model | None = None):
        super().__init__()
        if isinstance(snapshot_steps, (str, bytes)) or not isinstance(snapshot_steps,
                                                                      Sequence):
            raise ValueError(f"snapshot_steps must be a sequence of steps, got "
                             f"{snapshot_steps!r}")
        steps = [check_int(f"snapshot_steps[{i}]", s, minimum=1)
                 for i, s in enumerate(snapshot_steps)]
        if len(set(steps)) != len(steps):
            raise ValueError(f"snapshot_steps must not repeat a step, got {steps}")
        if not isinstance(directory, (str, os.PathLike)) or not str(directory):
            raise ValueError(f"directory must be a path, got {directory!r}")
        self.snapshot_steps = sorted(steps)
        self.directory = os.fspath(directory)
        self.context = _check_context(context)
        self.network = network
        self.saved: list[str] = []

    def paths(self) -> list[str]:
        return [snapshot_path(self.directory, s) for s in self.snapshot_steps]

    def _network(self):
        return self.network or getattr(self.model, "network", None) or self.model

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        if step not in self.snapshot_steps:
            return
        path = snapshot_path(self.directory, step)
        if horovod_glue.write_atomically(path, self._network().save_weights, self.context):
            self.saved.append(path)


def _labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    return y.argmax(-1) if y.ndim > 1 and y.shape[-1] > 1 else y.reshape(-1).astype(np.int64)


def top_1(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax is the label (labels sparse or one-hot)."""
    probabilities = np.asarray(probabilities)
    if len(probabilities) == 0:
        raise ValueError("top_1 needs at least one example, got 0")
    return float(np.mean(probabilities.argmax(-1) == _labels(labels)))


def ensemble_top_1(probabilities: Sequence[np.ndarray], labels: np.ndarray) -> float:
    """top-1 of the mean of the members' probabilities."""
    return top_1(np.mean(np.stack([np.asarray(p) for p in probabilities]), axis=0), labels)


class CollapsedEnsembleEvaluator(keras.callbacks.Callback):
    """Top-1 of each saved snapshot and of their averaged predictions (a collective).

    Args:
        snapshot_paths: weight files written by `SnapshotSaver` (read on rank 0 only and
            broadcast, so other ranks need no shared file system).
        network: a model of the same architecture, or a no-argument function that builds
            one. A given model is used as scratch space; its weights are put back after.
        dataset: this rank's disjoint shard of the evaluation data, as (x, y) batches;
            the shards of all ranks together must hold every example once.
        context: the Horovod context; every rank must call `evaluate()` together.
        activation: applied to the network output before averaging ("softmax" for
            logits, None when the network already ends in a softmax), or a callable.
        at_step: as a callback, evaluate at the first loop end with global step >= at_step
            (e.g. the last snapshot step); None: only at the end of training.

    `evaluate()` returns and `results` holds {"snapshot_<step>_top_1"... ,
    "ensemble_top_1", "ensemble_size"}; as a callback these go into the logs with a
    `val_` prefix (NaN until evaluated, so CSV columns stay fixed).
    """

    def __init__(self, snapshot_paths: Sequence[str],
                 network: keras.Model | Callable[[], keras.Model], dataset,
                 context: horovod_glue.Context, activation="softmax",
                 at_step: int | None = None):
        super().__init__()
        if isinstance(snapshot_paths, (str, bytes)) or not isinstance(snapshot_paths,
                                                                      Sequence):
            raise ValueError(f"snapshot_paths must be a sequence of paths, got "
                             f"{snapshot_paths!r}")
        if not snapshot_paths:
            raise ValueError("snapshot_paths must not be empty, got []")
        self.snapshot_paths = [os.fspath(p) for p in snapshot_paths]
        if not isinstance(network, keras.Model) and not callable(network):
            raise ValueError(f"network must be a keras.Model or a function building one, got "
                             f"{network!r}")
        self._network_or_build = network
        self.dataset = dataset
        self.context = _check_context(context)
        if activation == "softmax":
            activation = lambda out: ops.softmax(out, axis=-1)
        elif activation is not None and not callable(activation):
            raise ValueError(f"activation must be 'softmax', None or a callable, got "
                             f"{activation!r}")
        self.activation = activation
        self.at_step = None if at_step is None else check_int("at_step", at_step, minimum=0)
        self.results: dict[str, float] = {}
        self.predictions: list[np.ndarray] = []
        self.labels: np.ndarray | None = None

    def _keys(self):
        names = [f"snapshot_{_name(p)}_top_1" for p in self.snapshot_paths]
        return names + ["ensemble_top_1", "ensemble_size"]

    def evaluate(self) -> dict[str, float]:
        given = isinstance(self._network_or_build, keras.Model)
        network = self._network_or_build if given else self._network_or_build()
        original = network.get_weights() if given else None
        predictions, labels = [], None
        try:
            for path in self.snapshot_paths:
                if self.context.is_chief:
                    bn_weights.load_weights(network, path)
                horovod_glue.broadcast_variables(network.variables, self.context)
                probabilities, labels = evaluation.predict(network, self.dataset,
                                                           self.context, self.activation)
                predictions.append(probabilities)
        finally:
            if original is not None:
                network.set_weights(original)
        results = {key: top_1(p, labels) for key, p in zip(self._keys(), predictions)}
        results["ensemble_top_1"] = ensemble_top_1(predictions, labels)
        results["ensemble_size"] = float(len(predictions))
        self.results, self.predictions, self.labels = results, predictions, labels
        return results

    def _write(self, logs):
        if logs is not None:
            logs.update({f"val_{k}": self.results.get(k, float("nan")) for k in self._keys()})

    def on_epoch_end(self, epoch, logs=None):
        due = self.at_step is not None and global_step(self.model) >= self.at_step
        if due and not self.results:
            self.evaluate()
        self._write(logs)

    def on_train_end(self, logs=None):
        if not self.results:
            self.evaluate()
        self._write(logs)

    def summary(self) -> dict[str, float]:
        """What the run summary reports: each snapshot's top-1 and the ensemble's."""
        return dict(self.results)


def _name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".weights.h5", ".h5", ".keras"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base.startswith("snapshot-"):
        base = str(int(base[len("snapshot-"):])) if base[9:].isdigit() else base[9:]
    return base
