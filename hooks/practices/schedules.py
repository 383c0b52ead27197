"""Learning-rate schedules as pure functions of the training step.

Every schedule is a Keras 3 `LearningRateSchedule` whose `__call__` is written with
`keras.ops`, so the same object works on a Python int and on the optimizer's step
tensor inside `tf.function`. Step counts, epochs and the global batch are passed in by
the caller; nothing here reads Horovod, flags or other globals. `__call__` is elementwise,
so a vector of steps gives the vector of learning rates (handy for plots and tests).

Building blocks: `scale_learning_rate`, `to_steps`, `LinearWarmup`, `PolynomialDecay`,
`StepDecay`, `PiecewiseConstant`, and `PhasedSchedule` of `Phase`s (warm-up + poly
decay per phase, weight decay per phase, snapshot phases for collapsed ensembles).
`preset(name, ...)` builds the published recipes of `hooks.practices.recipes` at any global batch.
`TPUStepSchedule` / `tpu_milestones` and `TPULarsSchedule` / `lars_defaults` are
tensorflow/tpu's resnet_main.py and lars_util.py schedules, formula for formula.
"""
import bisect
import dataclasses
import math
from collections.abc import Mapping, Sequence

import keras
from keras import ops

from hooks.practices import recipes
from hooks.training.steps import check_int as _check_int
from hooks.training.steps import check_number as _check_number
from hooks.training.steps import round_half_up, run_steps, to_steps

__all__ = [
    "PRESETS", "SERIALIZATION_PACKAGE", "LinearWarmup", "Phase", "PhasedSchedule",
    "PiecewiseConstant", "PolynomialDecay", "Preset", "ScaledSchedule", "StepDecay",
    "TPULarsSchedule", "TPUStepSchedule", "lars_defaults", "phases_from_epochs", "preset",
    "round_half_up", "run_steps", "scale_learning_rate", "step_decay", "to_steps",
    "tpu_milestones",
]

# Registration namespace, so from_config/deserialize find these classes by name.
SERIALIZATION_PACKAGE = "hpc_resnet"


# ---------------------------------------------------------------- scaling
def scale_learning_rate(base_lr, global_batch, base_batch=256):
    """Linear scaling rule: base_lr * global_batch / base_batch."""
    base_lr = _check_number("base_lr", base_lr, minimum=0.0)
    global_batch = _check_int("global_batch", global_batch, minimum=1)
    base_batch = _check_int("base_batch", base_batch, minimum=1)
    return base_lr * global_batch / base_batch


def _float_step(step):
    # float32 holds every integer step below 2**24 (16.7M) exactly: ample for ImageNet runs.
    return ops.cast(step, "float32")


def _as_output(value):
    return ops.convert_to_tensor(value, dtype="float32")


def _piecewise(step_f, boundaries, values):
    """values[i] where i = number of boundaries <= step (a value applies from its boundary on)."""
    result = _as_output(values[0])
    for boundary, value in zip(boundaries, values[1:]):
        result = ops.where(ops.greater_equal(step_f, float(boundary)), value, result)
    return _as_output(result)


def _check_boundaries(name, boundaries):
    boundaries = [_check_int(f"{name}[{i}]", b) for i, b in enumerate(boundaries)]
    for i in range(1, len(boundaries)):
        if boundaries[i] <= boundaries[i - 1]:
            raise ValueError(f"{name} must be strictly increasing, got {boundaries}")
    return boundaries


# ---------------------------------------------------------------- elementary schedules
@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class PolynomialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr = end + (peak - end) * (1 - min(step - start, decay_steps) / decay_steps) ** power.

    Holds `peak_lr` before `start_step` and `end_lr` from `start_step + decay_steps` on.
    `decay_steps` may be fractional: a phase that stops before reaching `end_lr` (a
    partial collapse) is this curve cut off early; see `Phase.stop_fraction`.
    """

    def __init__(self, peak_lr, decay_steps, power=1.0, end_lr=0.0, start_step=0):
        self.peak_lr = _check_number("peak_lr", peak_lr, minimum=0.0)
        self.decay_steps = _check_number("decay_steps", decay_steps, minimum=0.0, strictly=True)
        self.power = _check_number("power", power, minimum=0.0, strictly=True)
        self.end_lr = _check_number("end_lr", end_lr, minimum=0.0)
        self.start_step = _check_int("start_step", start_step)

    def __call__(self, step):
        elapsed = ops.clip(_float_step(step) - self.start_step, 0.0, self.decay_steps)
        remaining = 1.0 - elapsed / self.decay_steps
        decayed = (self.peak_lr - self.end_lr) * ops.power(remaining, self.power)
        return _as_output(self.end_lr + decayed)

    def get_config(self):
        return {"peak_lr": self.peak_lr, "decay_steps": self.decay_steps, "power": self.power,
                "end_lr": self.end_lr, "start_step": self.start_step}


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class PiecewiseConstant(keras.optimizers.schedules.LearningRateSchedule):
    """values[i] on [boundaries[i-1], boundaries[i]): a value applies from its boundary on.

    Used for weight decay per phase (a keras-ops function of the step, so an optimizer can
    evaluate it on its own step counter without a callback).
    """

    def __init__(self, boundaries, values):
        self.boundaries = _check_boundaries("boundaries", boundaries)
        self.values = [_check_number(f"values[{i}]", v) for i, v in enumerate(values)]
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError("values must have one entry more than boundaries, got "
                             f"{len(self.values)} values for {len(self.boundaries)} boundaries")

    def __call__(self, step):
        return _piecewise(_float_step(step), self.boundaries, self.values)

    def value_at(self, step):
        """The value at a Python int step, as a Python float (no tensors)."""
        return self.values[bisect.bisect_right(self.boundaries, step)]

    def get_config(self):
        return {"boundaries": list(self.boundaries), "values": list(self.values)}


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """peak_lr * factors[i], where i = number of `boundaries_steps` <= step.

    Factors are absolute multipliers of the peak, not cumulative: the TPU ResNet schedule
    is `factors=[1, 0.1, 0.01, 0.001]` at the steps of epochs 30, 60, 80.
    """

    def __init__(self, peak_lr, boundaries_steps, factors):
        self.peak_lr = _check_number("peak_lr", peak_lr, minimum=0.0)
        self.boundaries_steps = _check_boundaries("boundaries_steps", boundaries_steps)
        self.factors = [_check_number(f"factors[{i}]", f, minimum=0.0)
                        for i, f in enumerate(factors)]
        if len(self.factors) != len(self.boundaries_steps) + 1:
            raise ValueError("factors must have one entry more than boundaries_steps, got "
                             f"{len(self.factors)} factors for "
                             f"{len(self.boundaries_steps)} boundaries")

    def __call__(self, step):
        values = [self.peak_lr * f for f in self.factors]
        return _piecewise(_float_step(step), self.boundaries_steps, values)

    def get_config(self):
        return {"peak_lr": self.peak_lr, "boundaries_steps": list(self.boundaries_steps),
                "factors": list(self.factors)}


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up in front of another schedule.

    lr rises linearly from `start_lr` at step 0 to `after(warmup_steps)` at step
    `warmup_steps`, then equals `after(step)`. `after` is evaluated at absolute steps
    (it is not shifted), so e.g. step-decay boundaries keep their meaning. `after` may be
    a schedule or a constant float. `warmup_steps=0` means no warm-up.
    """

    def __init__(self, after, warmup_steps, start_lr=0.0):
        if isinstance(after, Mapping):  # from get_config()
            after = keras.saving.deserialize_keras_object(after)
        if isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
            self.after = after
        else:
            self.after = _check_number("after", after, minimum=0.0)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps)
        self.start_lr = _check_number("start_lr", start_lr, minimum=0.0)

    def _after(self, step):
        if isinstance(self.after, float):
            return _as_output(self.after)
        return _as_output(self.after(step))

    def __call__(self, step):
        if self.warmup_steps == 0:
            return self._after(step)
        step_f = _float_step(step)
        target = self._after(self.warmup_steps)
        fraction = ops.clip(step_f / self.warmup_steps, 0.0, 1.0)
        warm = self.start_lr + (target - self.start_lr) * fraction
        return _as_output(ops.where(step_f < self.warmup_steps, warm, self._after(step)))

    def get_config(self):
        after = (self.after if isinstance(self.after, float)
                 else keras.saving.serialize_keras_object(self.after))
        return {"after": after, "warmup_steps": self.warmup_steps, "start_lr": self.start_lr}


# ---------------------------------------------------------------- the TPU reference's own
# tensorflow/tpu models/official/resnet: resnet_main.py (learning_rate_schedule,
# get_lr_schedule) and lars_util.py (poly_rate_schedule). Both count in fractional epochs,
# epoch = step / (num_train_images / train_batch_size), as the reference does.
def _epoch(step, steps_per_epoch):
    return _float_step(step) / steps_per_epoch


def _check_milestones(milestones):
    out = []
    for i, pair in enumerate(milestones):
        if len(pair) != 2:
            raise ValueError(f"milestones[{i}] must be (multiplier, start_epoch), got {pair!r}")
        out.append((_check_number(f"milestones[{i}] multiplier", pair[0], minimum=0.0),
                    _check_number(f"milestones[{i}] start_epoch", pair[1], minimum=0.0)))
    if not out:
        raise ValueError("milestones must not be empty, got []")
    return out


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class TPUStepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """resnet_main.py's `learning_rate_schedule`: `milestones` are (multiplier, start epoch)
    pairs; the first one ends the warm-up.

    lr = peak * m0 * epoch / e0 while epoch < e0 (linear from 0), then peak * m_i from
    epoch e_i on, applied in order (a later pair with the same start wins, as the
    reference's chain of tf.where does). e0 = 0 means no warm-up.
    """

    def __init__(self, peak_lr, steps_per_epoch, milestones):
        self.peak_lr = _check_number("peak_lr", peak_lr, minimum=0.0)
        self.steps_per_epoch = _check_number("steps_per_epoch", steps_per_epoch, minimum=0.0,
                                             strictly=True)
        self.milestones = _check_milestones(milestones)

    def __call__(self, step):
        epoch = _epoch(step, self.steps_per_epoch)
        first_mult, warmup = self.milestones[0]
        result = self.peak_lr * first_mult * epoch / (warmup or 1.0)
        for mult, start in self.milestones:
            result = ops.where(ops.less(epoch, start), result, self.peak_lr * mult)
        return _as_output(result)

    def get_config(self):
        return {"peak_lr": self.peak_lr, "steps_per_epoch": self.steps_per_epoch,
                "milestones": [list(m) for m in self.milestones]}


def tpu_milestones(train_steps, num_train_images, global_batch):
    """resnet_main.py's `get_lr_schedule`: warm-up end and x0.1 / x0.01 / x0.001 at epochs
    5, 30, 60, 80 of a 90-epoch run, stretched to this run's length and floored to whole
    epochs (a 45-epoch run: 2, 15, 30, 40). The run's epochs count whole steps per epoch:
    train_steps / floor(num_train_images / global_batch)."""
    train_steps = _check_int("train_steps", train_steps, minimum=1)
    num_train_images = _check_int("num_train_images", num_train_images, minimum=1)
    global_batch = _check_int("global_batch", global_batch, minimum=1)
    train_epochs = train_steps / max(1, num_train_images // global_batch)
    return [(mult, float(math.floor(epoch / 90 * train_epochs)))
            for mult, epoch in ((1.0, 5), (0.1, 30), (0.01, 60), (0.001, 80))]


# lars_util.py: (global batch below which it applies, peak lr, warm-up epochs); above the
# last bound: 35.6 and 40.
_LARS_BY_BATCH = ((16384, 10.0, 5), (32768, 25.0, 5), (65536, 32.0, 14))
LARS_END_LR = 1e-4  # tf.compat.v1.train.polynomial_decay's default end_learning_rate


def lars_defaults(global_batch):
    """(peak learning rate, warm-up epochs) that lars_util.py picks for a global batch."""
    global_batch = _check_int("global_batch", global_batch, minimum=1)
    for bound, peak, warmup in _LARS_BY_BATCH:
        if global_batch < bound:
            return peak, warmup
    return 35.6, 40


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class TPULarsSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lars_util.py's `poly_rate_schedule`, the learning rate of `--enable_lars`.

    While epoch <= warmup_epochs: peak * epoch / warmup_epochs (linear from 0). After:
    power-2 polynomial decay of tf.compat.v1.train.polynomial_decay from `peak_lr` to
    `end_lr` over D = total_steps - warmup_steps + 1 steps, at decay step
    max(1, step - warmup_steps); warmup_steps = floor(warmup_epochs * images / batch).
    warmup_epochs = 0: no warm-up.
    """

    def __init__(self, peak_lr, steps_per_epoch, warmup_epochs, warmup_steps, total_steps,
                 power=2.0, end_lr=LARS_END_LR):
        self.peak_lr = _check_number("peak_lr", peak_lr, minimum=0.0)
        self.steps_per_epoch = _check_number("steps_per_epoch", steps_per_epoch, minimum=0.0,
                                             strictly=True)
        self.warmup_epochs = _check_number("warmup_epochs", warmup_epochs, minimum=0.0)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps)
        self.total_steps = _check_int("total_steps", total_steps, minimum=1)
        self.power = _check_number("power", power, minimum=0.0, strictly=True)
        self.end_lr = _check_number("end_lr", end_lr, minimum=0.0)

    def __call__(self, step):
        step_f = _float_step(step)
        decay_span = float(max(1, self.total_steps - self.warmup_steps + 1))
        decay_step = ops.minimum(ops.maximum(1.0, step_f - self.warmup_steps), decay_span)
        poly = ((self.peak_lr - self.end_lr) * ops.power(1.0 - decay_step / decay_span,
                                                         self.power) + self.end_lr)
        if not self.warmup_epochs:
            return _as_output(poly)
        epoch = _epoch(step, self.steps_per_epoch)
        warm = self.peak_lr * epoch / self.warmup_epochs
        return _as_output(ops.where(ops.less_equal(epoch, self.warmup_epochs), warm, poly))

    def get_config(self):
        return {"peak_lr": self.peak_lr, "steps_per_epoch": self.steps_per_epoch,
                "warmup_epochs": self.warmup_epochs, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "power": self.power, "end_lr": self.end_lr}


# ---------------------------------------------------------------- phased schedules
@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a `PhasedSchedule`; lengths are in optimizer steps.

    Within the phase: linear warm-up over `warmup` steps from `warmup_start_lr` to
    `peak_lr`, then polynomial decay with `power` from `peak_lr` towards `end_lr`. The
    decay curve spans `(length - warmup) / stop_fraction` steps and the phase ends after
    `stop_fraction` of it: `stop_fraction < 1` is a partial collapse that stops above
    `end_lr`. `weight_decay` (None: leave the optimizer's value) applies for the whole
    phase; `snapshot` marks the phase end as a collapsed-ensemble snapshot.
    """

    length: int
    peak_lr: float
    power: float = 1.0
    warmup: int = 0
    warmup_start_lr: float = 0.0
    end_lr: float = 0.0
    weight_decay: float | None = None
    name: str = ""
    stop_fraction: float = 1.0
    snapshot: bool = False

    def __post_init__(self):
        label = f"phase {self.name!r}" if self.name else "phase"
        fix = lambda field, value: object.__setattr__(self, field, value)  # frozen dataclass
        fix("length", _check_int(f"{label}: length", self.length, minimum=1))
        fix("peak_lr", _check_number(f"{label}: peak_lr", self.peak_lr, minimum=0.0))
        fix("power", _check_number(f"{label}: power", self.power, minimum=0.0, strictly=True))
        fix("warmup", _check_int(f"{label}: warmup", self.warmup))
        if self.warmup >= self.length:
            raise ValueError(f"{label}: warmup must be shorter than the phase length "
                             f"{self.length}, got {self.warmup}")
        fix("warmup_start_lr",
            _check_number(f"{label}: warmup_start_lr", self.warmup_start_lr, minimum=0.0))
        fix("end_lr", _check_number(f"{label}: end_lr", self.end_lr, minimum=0.0))
        if self.weight_decay is not None:
            fix("weight_decay",
                _check_number(f"{label}: weight_decay", self.weight_decay, minimum=0.0))
        fix("stop_fraction", _check_number(f"{label}: stop_fraction", self.stop_fraction,
                                           minimum=0.0, strictly=True, maximum=1.0))
        fix("name", str(self.name))
        fix("snapshot", bool(self.snapshot))

    @property
    def final_lr(self):
        """The lr the phase ends at (reached at its end step, i.e. the next phase's start)."""
        return self.end_lr + (self.peak_lr - self.end_lr) * (1.0 - self.stop_fraction) ** self.power

    def curve(self):
        """This phase as a schedule of the step counted from the phase start."""
        decay = PolynomialDecay(self.peak_lr, (self.length - self.warmup) / self.stop_fraction,
                                power=self.power, end_lr=self.end_lr, start_step=self.warmup)
        return LinearWarmup(decay, self.warmup, self.warmup_start_lr)


def phases_from_epochs(specs, steps_per_epoch):
    """Builds `Phase`s from dicts with `epochs` (and optional `warmup_epochs`) in epochs.

    Other keys are `Phase` fields. Phase ends are rounded cumulatively (`round_half_up` of
    the running epoch total times steps_per_epoch), so the lengths sum to the rounded total
    and rounding errors do not pile up; warm-ups are rounded on their own.
    """
    steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    phases, total_epochs, previous_end = [], 0.0, 0
    for i, spec in enumerate(specs):
        spec = dict(spec)
        label = f"phase {spec.get('name') or i!r}"
        total_epochs += _check_number(f"{label}: epochs", spec.pop("epochs", None),
                                      minimum=0.0, strictly=True)
        warmup_epochs = _check_number(f"{label}: warmup_epochs",
                                      spec.pop("warmup_epochs", 0.0), minimum=0.0)
        end = round_half_up(total_epochs * steps_per_epoch)
        phases.append(Phase(length=end - previous_end,
                            warmup=round_half_up(warmup_epochs * steps_per_epoch), **spec))
        previous_end = end
    return tuple(phases)


@keras.saving.register_keras_serializable(package=SERIALIZATION_PACKAGE)
class PhasedSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Consecutive `Phase`s; after the last one, the last phase's final value.

    `total_steps`, when given, must equal the summed phase lengths (the phases must cover
    exactly the requested run). `phase_index`, `weight_decay_at`, `phase_boundaries` and
    `snapshot_steps` are plain-Python views for callbacks and the training loop;
    `weight_decay_schedule()` is the keras-ops view for optimizers.
    """

    def __init__(self, phases, total_steps=None):
        if isinstance(phases, (Phase, Mapping)) or not isinstance(phases, Sequence):
            raise ValueError(f"phases must be a sequence of Phase, got {phases!r}")
        if not phases:
            raise ValueError("phases must not be empty, got []")
        self.phases = tuple(p if isinstance(p, Phase) else Phase(**p) for p in phases)
        ends = []
        for phase in self.phases:
            ends.append((ends[-1] if ends else 0) + phase.length)
        self._ends = ends
        if total_steps is not None:
            total_steps = _check_int("total_steps", total_steps, minimum=1)
            if total_steps != ends[-1]:
                raise ValueError(f"phases cover {ends[-1]} steps but total_steps is "
                                 f"{total_steps}; they must cover the run exactly")
        self.total_steps = ends[-1]
        self._curves = [p.curve() for p in self.phases]

    def __call__(self, step):
        step_f = _float_step(step)
        # Evaluate every phase (a handful) and select: keeps the graph branch-free and
        # works the same on Python ints and symbolic steps.
        result = _as_output(self.phases[-1].final_lr)
        for start, end, curve in reversed(list(zip([0] + self._ends[:-1], self._ends,
                                                   self._curves))):
            result = ops.where(step_f < float(end), curve(step_f - float(start)), result)
        return _as_output(result)

    def phase_boundaries(self):
        """End step (exclusive) of every phase; the last one is `total_steps`."""
        return list(self._ends)

    def phase_index(self, step):
        """Index of the phase that `step` (a Python int >= 0) belongs to; the last past the end."""
        step = _check_int("step", step)
        return min(bisect.bisect_right(self._ends, step), len(self.phases) - 1)

    def weight_decay_at(self, step):
        """The weight decay of the phase at `step` (Python float, or None: not set)."""
        return self.phases[self.phase_index(step)].weight_decay

    def snapshot_steps(self):
        """End steps of the phases marked `snapshot` (collapsed-ensemble checkpoints)."""
        return [end for phase, end in zip(self.phases, self._ends) if phase.snapshot]

    def weight_decay_schedule(self, default=None):
        """Weight decay per phase as a `PiecewiseConstant`; `default` fills phases with None."""
        values = [default if p.weight_decay is None else p.weight_decay for p in self.phases]
        if any(v is None for v in values):
            raise ValueError("a phase has weight_decay=None; pass default=<float>, got "
                             "default=None")
        return PiecewiseConstant(self._ends[:-1], values)

    def get_config(self):
        return {"phases": [dataclasses.asdict(p) for p in self.phases],
                "total_steps": self.total_steps}


class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`base(step) * factor`, where `factor` is a variable that a callback changes during
    training (`hooks.training.callbacks.ReduceOnPlateau`); never below `min(min_lr, base(step))`,
    so the warm-up still starts low. Not serializable (the factor lives in checkpoints'
    state.json, not in the optimizer config)."""

    def __init__(self, base, min_lr=0.0):
        self.base = base
        self.min_lr = _check_number("min_lr", min_lr, minimum=0.0)
        self.factor = keras.Variable(1.0, trainable=False, dtype="float32", name="lr_factor")

    def __call__(self, step):
        value = self.base(step)
        return ops.maximum(value * self.factor, ops.minimum(self.min_lr, value))

    def get_config(self):
        return {"base": keras.saving.serialize_keras_object(self.base),
                "min_lr": self.min_lr}


# ---------------------------------------------------------------- presets
@dataclasses.dataclass(frozen=True)
class Preset:
    """A ready schedule: lr, weight decay per step, run length, snapshots, optimizer kind."""

    name: str
    learning_rate: keras.optimizers.schedules.LearningRateSchedule
    weight_decay: PiecewiseConstant
    total_steps: int
    snapshot_steps: tuple
    optimizer: str  # "sgd" (momentum) or "lars"
    reference_batch: int
    epochs: float

    def weight_decay_at(self, step):
        """Weight decay at a Python int step, as a Python float."""
        return self.weight_decay.value_at(_check_int("step", step))


def step_decay(peak, steps_per_epoch, *, warmup_epochs=5.0, warmup_start_lr=0.0,
               epoch_scale=1.0):
    """The TPU reference schedule: linear warm-up over `warmup_epochs`, then `peak` x1,
    x0.1, x0.01, x0.001 from epochs 30, 60, 80 (times `epoch_scale`)."""
    to = lambda epochs: to_steps(epochs=epochs * epoch_scale, steps_per_epoch=steps_per_epoch)
    decay = StepDecay(peak, [to(30), to(60), to(80)], [1.0, 0.1, 0.01, 0.001])
    warmup = to_steps(epochs=warmup_epochs, steps_per_epoch=steps_per_epoch)
    return LinearWarmup(decay, warmup, warmup_start_lr)


def _step_decay_preset(recipe, lr_scale, epoch_scale, spe):
    schedule = step_decay(0.1 * lr_scale, spe, warmup_epochs=5 * epoch_scale,
                          warmup_start_lr=recipe.warmup_start_lr, epoch_scale=epoch_scale)
    total = to_steps(epochs=recipe.reference_epochs * epoch_scale, steps_per_epoch=spe)
    return schedule, PiecewiseConstant([], [1e-4]), total, ()


def _phased_preset(recipe, lr_scale, epoch_scale, spe):
    lr_keys = ("peak_lr", "warmup_start_lr", "end_lr")
    scaled = []
    for spec in recipe.phases:
        spec = dict(spec)
        spec["epochs"] *= epoch_scale
        spec["warmup_epochs"] = spec.get("warmup_epochs", 0.0) * epoch_scale
        spec.update({k: spec[k] * lr_scale for k in lr_keys if k in spec})
        scaled.append(spec)
    schedule = PhasedSchedule(phases_from_epochs(scaled, spe))
    return (schedule, schedule.weight_decay_schedule(), schedule.total_steps,
            tuple(schedule.snapshot_steps()))


_BUILDERS = {"step_decay": _step_decay_preset, "phased": _phased_preset}
PRESETS = recipes.NAMES


def preset(name, *, global_batch, steps_per_epoch, epochs=None):
    """The named reference schedule rescaled to `global_batch` (and `epochs`).

    LR values scale linearly with global_batch / reference batch. With `epochs`, every
    length (phases, warm-ups, step-decay epochs) scales by epochs / reference epochs;
    without, the reference epoch count is used.
    """
    recipe = recipes.recipe(name)
    global_batch = _check_int("global_batch", global_batch, minimum=1)
    steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    if epochs is None:
        epochs = float(recipe.reference_epochs)
    epochs = _check_number("epochs", epochs, minimum=0.0, strictly=True)
    schedule, weight_decay, total_steps, snapshots = _BUILDERS[recipe.kind](
        recipe, global_batch / recipe.reference_batch, epochs / recipe.reference_epochs,
        steps_per_epoch)
    return Preset(name=name, learning_rate=schedule, weight_decay=weight_decay,
                  total_steps=total_steps, snapshot_steps=snapshots,
                  optimizer=recipe.optimizer, reference_batch=recipe.reference_batch,
                  epochs=epochs)
