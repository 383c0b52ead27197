"""The large-batch practices beyond the learning rate, as Keras callbacks, one concern each.

- `ScheduledL2` + `attach_scheduled_l2`: an L2 penalty whose factor lives in a
  `keras.Variable`, so it can change mid-run inside the traced train step.
- `WeightDecayScheduler`: at phase boundaries sets the weight decay of a LARS optimizer
  (`set_weight_decay`) or of a `ScheduledL2` factor variable; logs `weight_decay`.
- `SnapshotSaver`: rank 0 writes the network weights at given global steps (the ends of
  the collapse phases) as `snapshot-<step>.weights.h5`, atomically.
- `CollapsedEnsembleEvaluator`: top-1 of each snapshot and of the average of their
  softmax outputs, exact over all ranks (`hooks.evaluation.predict`).
- `TimeToAccuracy`: wall time, epoch and step at which a metric first reaches a target;
  optionally stops training.

Learning-rate logging and throughput already live in `hooks.callbacks`. Steps are global
optimizer steps (`optimizer.iterations`): a value that a schedule gives for step `s`
applies to the update that moves the counter from `s` to `s + 1`, as for the lr.
Callbacks that write files act on rank 0 only; the evaluator is a collective (all ranks).
"""
import math
import numbers
import os
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import ops

from hooks import bn_weights, evaluation, horovod_glue
from hooks import schedules as _schedules

__all__ = ["CollapsedEnsembleEvaluator", "ScheduledL2", "SnapshotSaver", "TimeToAccuracy",
           "WeightDecayScheduler", "attach_scheduled_l2", "ensemble_top_1", "snapshot_path",
           "top_1"]


def _step(model) -> int:
    return int(ops.convert_to_numpy(model.optimizer.iterations))


def _check_int(name, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def _check_context(context):
    if not isinstance(context, horovod_glue.Context):
        raise ValueError(f"context must be a hooks.horovod_glue.Context, got {context!r}")
    return context


# ---------------------------------------------------------------- scheduled L2
@keras.saving.register_keras_serializable(package=_schedules.SERIALIZATION_PACKAGE)
class ScheduledL2(keras.regularizers.Regularizer):
    """0.5 * weight_decay * sum(w ** 2), with `weight_decay` read from a variable.

    The gradient is `weight_decay * w`: the Caffe/SGD meaning of weight decay, the same as
    `keras.regularizers.L2(weight_decay / 2)` (what `imagenet.models` builds). Because the
    factor is a variable, not a Python float baked into the traced train step, assigning
    it mid-run (see `WeightDecayScheduler`) changes the loss from the next step on.
    """

    def __init__(self, weight_decay: keras.Variable):
        if not isinstance(weight_decay, keras.Variable):
            raise ValueError("weight_decay must be a keras.Variable (create one with "
                             f"attach_scheduled_l2), got {weight_decay!r}")
        self.weight_decay = weight_decay

    def __call__(self, x):
        factor = ops.cast(self.weight_decay, x.dtype)
        return 0.5 * factor * ops.sum(ops.square(x))

    def get_config(self):
        # The variable itself cannot be serialised; a reloaded model gets a plain L2 value.
        return {"weight_decay": float(ops.convert_to_numpy(self.weight_decay))}

    @classmethod
    def from_config(cls, config):
        return keras.regularizers.L2(config["weight_decay"] / 2)


def _is_l2(regularizer) -> bool:
    return isinstance(regularizer, (keras.regularizers.L2, ScheduledL2))


def attach_scheduled_l2(network: keras.Model, weight_decay: float,
                        select: Callable[[keras.Variable], bool] | None = None
                        ) -> keras.Variable:
    """Gives the selected trainable variables of a built `network` one shared `ScheduledL2`.

    By default the selected variables are those that already carry an L2 regularizer (their
    old factor is replaced). `select(variable) -> bool` picks others, e.g. every kernel.
    Returns the factor variable (initial value `weight_decay`) to hand to
    `WeightDecayScheduler`. Call before the first `fit`/`compile`-time trace.
    """
    weight_decay = _check_float("weight_decay", weight_decay, minimum=0.0)
    if not network.built:
        raise ValueError(f"network {network.name!r} must be built before attaching the L2")
    select = select or (lambda v: _is_l2(getattr(v, "regularizer", None)))
    chosen = [v for v in network.trainable_variables if select(v)]
    if not chosen:
        raise ValueError(f"no variable of network {network.name!r} was selected (by default "
                         "those with an L2 regularizer); pass select=")
    factor = keras.Variable(weight_decay, name="scheduled_weight_decay", dtype="float32",
                            trainable=False)
    regularizer = ScheduledL2(factor)
    for variable in chosen:
        variable.regularizer = regularizer
    return factor


# ---------------------------------------------------------------- weight-decay schedule
class WeightDecayScheduler(keras.callbacks.Callback):
    """Sets the weight decay to `schedule(step)` before every step where it changes.

    Args:
        schedule: Python callable step -> weight decay (float), e.g.
            `Preset.weight_decay_at`, `PiecewiseConstant.value_at` or
            `PhasedSchedule.weight_decay_at` (phases with None keep the current value).
        target: what holds the weight decay: an optimizer with `set_weight_decay` (LARS
            built with a float weight decay) or the `keras.Variable` returned by
            `attach_scheduled_l2`. Keras' built-in optimizers keep `weight_decay` as a
            Python float fixed at trace time, so they are rejected.

    Writes `weight_decay` (the value used by the last step) into epoch logs.
    """

    def __init__(self, schedule: Callable[[int], float | None], target):
        super().__init__()
        if not callable(schedule):
            raise ValueError(f"schedule must be callable step -> weight decay, got "
                             f"{schedule!r}")
        if isinstance(target, keras.Variable):
            self._set, self._get = target.assign, lambda: target
        elif callable(getattr(target, "set_weight_decay", None)):
            self._set = target.set_weight_decay
            self._get = lambda: target.current_weight_decay
        else:
            raise ValueError("target must be a keras.Variable from attach_scheduled_l2 or an "
                             "optimizer with set_weight_decay (LARS), got "
                             f"{type(target).__name__} {target!r}")
        self.schedule, self.target = schedule, target
        self._current = None

    def current(self) -> float:
        return float(ops.convert_to_numpy(self._get()))

    def on_train_batch_begin(self, batch, logs=None):
        value = self.schedule(_step(self.model))
        if value is None or value == self._current:
            return
        value = _check_float("weight decay from schedule", value, minimum=0.0)
        self._set(value)
        self._current = value

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["weight_decay"] = self.current()


# ---------------------------------------------------------------- snapshots
def snapshot_path(directory: str, step: int) -> str:
    """Where `SnapshotSaver` writes the snapshot of global step `step`."""
    return os.path.join(directory, f"snapshot-{_check_int('step', step):09d}.weights.h5")


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
        steps = [_check_int(f"snapshot_steps[{i}]", s, minimum=1)
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
        step = _step(self.model)
        if step not in self.snapshot_steps:
            return
        path = snapshot_path(self.directory, step)
        if horovod_glue.write_atomically(path, self._network().save_weights, self.context):
            self.saved.append(path)


# ---------------------------------------------------------------- collapsed ensembles
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
        self.at_step = None if at_step is None else _check_int("at_step", at_step, minimum=0)
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
        if self.at_step is not None and not self.results and _step(self.model) >= self.at_step:
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


# ---------------------------------------------------------------- time to accuracy
class TimeToAccuracy(keras.callbacks.Callback):
    """Records when `monitor` first reaches `target` (checked at every loop end).

    Args:
        monitor: a key of the epoch logs, e.g. "val_top_1" (from PeriodicEvaluation, which
            runs before extra callbacks) or "top_1".
        target: the value to reach.
        mode: "max" (reached when value >= target) or "min" (value <= target).
        stop: stop training once reached. Metrics of DistributedTrainer and the evaluation
            are global, so every rank stops at the same step.
        steps_per_epoch: training steps per data epoch, to report the epoch as a number of
            data epochs; None reports the Keras epoch (loop) count instead.

    `reached` is None or {"seconds", "epoch", "step", "value"}; the epoch logs get
    `time_to_target_seconds`, `time_to_target_epoch` (NaN until reached).
    """

    def __init__(self, monitor: str, target: float, mode: str = "max", stop: bool = False,
                 steps_per_epoch: float | None = None):
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a non-empty log key, got {monitor!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.target, self.mode = monitor, _check_float("target", target), mode
        self.stop = bool(stop)
        if steps_per_epoch is not None:
            steps_per_epoch = _check_float("steps_per_epoch", steps_per_epoch)
            if steps_per_epoch <= 0:
                raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
        self.steps_per_epoch = steps_per_epoch
        self.reached: dict[str, float] | None = None
        self._t0 = None

    def on_train_begin(self, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        value = logs.get(self.monitor)
        if self.reached is None and value is not None and math.isfinite(float(value)):
            value = float(value)
            if (value >= self.target) if self.mode == "max" else (value <= self.target):
                step = _step(self.model)
                self.reached = {
                    "seconds": time.perf_counter() - self._t0, "step": step, "value": value,
                    "epoch": (step / self.steps_per_epoch if self.steps_per_epoch
                              else float(epoch + 1))}
                if self.stop:
                    self.model.stop_training = True
        logs["time_to_target_seconds"] = self.reached["seconds"] if self.reached else math.nan
        logs["time_to_target_epoch"] = self.reached["epoch"] if self.reached else math.nan

    def summary(self) -> dict[str, dict[str, float] | None]:
        """What the run summary reports: `time_to_target` (None when not reached)."""
        return {"time_to_target": self.reached}
