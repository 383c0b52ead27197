"""LARS: layer-wise adaptive rate scaling for momentum SGD (You, Gitman, Ginsburg 2017).

For every variable that is not excluded:

    trust    = eta * ||w|| / (||g|| + wd * ||w|| + epsilon)   (1 if ||w|| or ||g|| is 0)
    update   = learning_rate * trust * (g + wd * w)
    velocity = momentum * velocity + update
    w        = w - velocity            (nesterov: w - (momentum * velocity + update))

Excluded variables (batch-norm scale/offset and biases by default) get neither weight
decay nor the trust ratio: plain momentum SGD with `learning_rate`.

The weight decay here is the coupled (L2) one of the paper, so Keras' own decoupled
`weight_decay` of the base optimizer is always off; `weight_decay` may be a float
(stored in a variable, changeable with `set_weight_decay` without retracing) or a
schedule of the step such as `PhasedSchedule.weight_decay_schedule()`.
"""
import copy
import math
import numbers

import keras
from keras import ops

# registers the schedules that from_config may name
from hooks.practices import schedules as _schedules

_PACKAGE = _schedules.SERIALIZATION_PACKAGE

__all__ = ["DEFAULT_EXCLUDE_PATTERNS", "LARS"]

# Case-insensitive substrings of a variable's path that mark BN and bias variables.
DEFAULT_EXCLUDE_PATTERNS = ("bn", "batch_norm", "gamma", "beta", "bias")


def _norm(x):
    return ops.sqrt(ops.sum(ops.square(x)))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LARS(keras.optimizers.Optimizer):
    """Momentum SGD with a per-variable trust ratio (see the module docstring).

    Args:
        learning_rate: float or `LearningRateSchedule` (the global lr; LARS peaks are large,
            e.g. 34 at batch 32K with eta 0.001).
        momentum: in [0, 1).
        weight_decay: float >= 0 or a schedule of the step (coupled L2 decay).
        eta: trust coefficient > 0.
        epsilon: >= 0, added to the trust-ratio denominator.
        nesterov: Nesterov momentum.
        exclude_patterns: substrings of `variable.path` (case-insensitive) that exclude a
            variable from weight decay and the trust ratio.
        exclude_rank_1: also exclude every rank <= 1 variable (biases, BN).
        **kwargs: other `keras.optimizers.Optimizer` arguments (clipnorm, name, ...).

    Override `is_excluded(variable)` for another exclusion rule.
    """

    def __init__(self, learning_rate=0.1, momentum=0.9, weight_decay=0.0, eta=0.001,
                 epsilon=1e-9, nesterov=False, exclude_patterns=DEFAULT_EXCLUDE_PATTERNS,
                 exclude_rank_1=True, **kwargs):
        super().__init__(learning_rate=learning_rate, weight_decay=None, **kwargs)
        self.momentum = _check_range("momentum", momentum, 0.0, 1.0, include_high=False)
        self.eta = _check_range("eta", eta, 0.0, None, include_low=False)
        self.epsilon = _check_range("epsilon", epsilon, 0.0, None)
        self.nesterov = bool(nesterov)
        if isinstance(exclude_patterns, str):
            raise ValueError("exclude_patterns must be a sequence of strings, got "
                             f"{exclude_patterns!r}")
        self.exclude_patterns = tuple(str(p).lower() for p in exclude_patterns)
        self.exclude_rank_1 = bool(exclude_rank_1)
        self._excluded = {}  # var key -> bool; decided once per variable at trace time
        self._init_weight_decay(weight_decay)

    def _init_weight_decay(self, weight_decay):
        if isinstance(weight_decay, dict):  # from get_config()
            weight_decay = keras.saving.deserialize_keras_object(weight_decay)
        if callable(weight_decay):
            self._wd = weight_decay
            return
        value = _check_range("weight_decay", weight_decay, 0.0, None)
        # A variable (not a Python constant) so a callback can change it mid-run without
        # retracing the train step; it also lands in checkpoints with the optimizer.
        with keras.name_scope(self.name, caller=self):
            self._wd = keras.Variable(value, name="lars_weight_decay", dtype="float32",
                                      trainable=False, aggregation="only_first_replica")
        self._track_variable(self._wd)

    # ------------------------------------------------------------ weight decay access
    @property
    def current_weight_decay(self):
        """The weight decay used at the current step (a tensor)."""
        if isinstance(self._wd, keras.Variable):
            return ops.convert_to_tensor(self._wd)
        return ops.convert_to_tensor(self._wd(self.iterations), dtype="float32")

    def set_weight_decay(self, value):
        """Sets a float weight decay (e.g. from `PhasedSchedule.weight_decay_at(step)`)."""
        if not isinstance(self._wd, keras.Variable):
            raise TypeError("this LARS was built with a weight-decay schedule; its weight "
                            "decay follows the step and cannot be set")
        self._wd.assign(_check_range("weight_decay", value, 0.0, None))

    # ------------------------------------------------------------ Keras optimizer API
    def is_excluded(self, variable):
        """True for variables that skip weight decay and the trust ratio (BN, biases)."""
        key = self._var_key(variable)
        if key not in self._excluded:
            path = str(getattr(variable, "path", None) or variable.name).lower()
            self._excluded[key] = (
                (self.exclude_rank_1 and len(variable.shape) <= 1)
                or any(p in path for p in self.exclude_patterns))
        return self._excluded[key]

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum != 0:
            self.momentums = [self.add_variable_from_reference(v, name="momentum")
                              for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        grad = ops.cast(gradient, dtype)
        if self.is_excluded(variable):
            update = ops.multiply(lr, grad)
        else:
            wd = ops.cast(self.current_weight_decay, dtype)
            w_norm, g_norm = _norm(variable), _norm(grad)
            defined = ops.logical_and(ops.greater(w_norm, 0.0), ops.greater(g_norm, 0.0))
            denominator = g_norm + wd * w_norm + ops.cast(self.epsilon, dtype)
            # Pick a safe denominator where the ratio is unused, so 0/0 never appears.
            denominator = ops.where(defined, denominator, ops.ones_like(denominator))
            trust = ops.where(defined, ops.cast(self.eta, dtype) * w_norm / denominator,
                              ops.ones_like(w_norm))
            update = lr * trust * (grad + wd * variable)
        if self.momentum == 0:
            self.assign_sub(variable, update)
            return
        velocity = self.momentums[self._get_variable_index(variable)]
        momentum = ops.cast(self.momentum, dtype)
        self.assign(velocity, momentum * velocity + update)
        if self.nesterov:
            self.assign_sub(variable, momentum * velocity + update)
        else:
            self.assign_sub(variable, velocity)

    def get_config(self):
        config = super().get_config()
        if isinstance(self._wd, keras.Variable):
            weight_decay = float(ops.convert_to_numpy(self._wd))
        else:
            weight_decay = keras.saving.serialize_keras_object(self._wd)
        config.update({
            "weight_decay": weight_decay,
            "momentum": self.momentum,
            "eta": self.eta,
            "epsilon": self.epsilon,
            "nesterov": self.nesterov,
            "exclude_patterns": list(self.exclude_patterns),
            "exclude_rank_1": self.exclude_rank_1,
        })
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Keras' from_config replaces entries of the dict it is given: work on a copy.
        return super().from_config(copy.deepcopy(config), custom_objects=custom_objects)


def _check_range(name, value, low, high, *, include_low=True, include_high=True):
    """float(value), or ValueError naming the argument when outside [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN, got {value}")
    below = value < low if include_low else value <= low
    above = high is not None and (value > high if include_high else value >= high)
    if below or above:
        low_b = "[" if include_low else "("
        high_b = ("]" if include_high else ")") if high is not None else ")"
        raise ValueError(f"{name} must be in {low_b}{low}, {high if high is not None else 'inf'}"
                         f"{high_b}, got {value}")
    return value
