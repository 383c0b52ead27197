"""Weight-decay scaling (the 2018 practice): weight decay changed during training.

- `ScheduledL2` + `attach_scheduled_l2`: an L2 penalty whose factor lives in a
  `keras.Variable`, so it can change mid-run inside the traced train step.
- `WeightDecayScheduler`: at phase boundaries sets the weight decay of a LARS optimizer
  (`set_weight_decay`) or of a `ScheduledL2` factor variable; logs `weight_decay`.

Steps are global optimizer steps: a value the schedule gives for step `s` applies to the
update that moves the counter from `s` to `s + 1`, as for the learning rate.
"""
from collections.abc import Callable

import keras
from keras import ops

from hooks.practices import schedules as _schedules
from hooks.training.steps import check_number, global_step

__all__ = ["ScheduledL2", "WeightDecayScheduler", "attach_scheduled_l2"]


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
    weight_decay = check_number("weight_decay", weight_decay, minimum=0.0)
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
        value = self.schedule(global_step(self.model))
        if value is None or value == self._current:
            return
        value = check_number("weight decay from schedule", value, minimum=0.0)
        self._set(value)
        self._current = value

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["weight_decay"] = self.current()
