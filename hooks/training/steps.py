"""Run lengths in steps, the only unit the training loop knows (as big_vision's
`utils.steps`): epochs or examples become steps in one place. Pure Python, cheap to import
(the config modules use it before TensorFlow starts).
"""
import math
import numbers

from hooks.errors import ConfigError


def check_number(name, value, *, minimum=None, strictly=False, maximum=None):
    """Returns `value` as float; ValueError naming the argument if it is out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None:
        if strictly and value <= minimum:
            raise ValueError(f"{name} must be > {minimum}, got {value}")
        if not strictly and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_int(name, value, *, minimum=0):
    """Returns `value` as int; rejects floats so fractional step counts are not truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def global_step(model) -> int:
    """The global step of a compiled model: its optimizer's iteration count."""
    return int(model.optimizer.iterations.numpy())


def round_half_up(x):
    """Nearest int, halves rounded up (Python's round() would round 2.5 to 2)."""
    return int(math.floor(x + 0.5))


def to_steps(*, steps=None, epochs=None, examples=None, steps_per_epoch=None,
             global_batch=None):
    """Turns exactly one of steps / epochs / examples into a number of optimizer steps.

    epochs need `steps_per_epoch`, examples need `global_batch`. Fractional results are
    rounded to the nearest int with halves rounded up (`round_half_up`), so
    `epochs=0.5, steps_per_epoch=3` gives 2 steps.
    """
    given = [n for n, v in (("steps", steps), ("epochs", epochs), ("examples", examples))
             if v is not None]
    if len(given) != 1:
        raise ValueError("exactly one of steps, epochs, examples must be given, got "
                         f"{given or 'none'}")
    if steps is not None:
        return check_int("steps", steps)
    if epochs is not None:
        epochs = check_number("epochs", epochs, minimum=0.0)
        if steps_per_epoch is None:
            raise ValueError("epochs need steps_per_epoch, got steps_per_epoch=None")
        # Fractional: ImageNet's 1,281,167 images make 156.4 steps per epoch at 8192.
        steps_per_epoch = check_number("steps_per_epoch", steps_per_epoch, minimum=0.0,
                                        strictly=True)
        return round_half_up(epochs * steps_per_epoch)
    examples = check_number("examples", examples, minimum=0.0)
    if global_batch is None:
        raise ValueError("examples need global_batch, got global_batch=None")
    global_batch = check_int("global_batch", global_batch, minimum=1)
    return round_half_up(examples / global_batch)


def run_steps(train_steps, train_epochs, steps_per_epoch, default_epochs=None):
    """The run length in global steps from --train_steps or --train_epochs (never both);
    with neither, `default_epochs` (None: one of them is required). One rule for every
    entry point."""
    if train_steps is not None and train_epochs is not None:
        raise ConfigError(f"give --train_steps ({train_steps}) or --train_epochs "
                          f"({train_epochs}), not both")
    if train_steps is not None:
        return check_int("train_steps", train_steps, minimum=1)
    epochs = train_epochs if train_epochs is not None else default_epochs
    if epochs is None:
        raise ConfigError("give --train_steps or --train_epochs")
    return max(1, to_steps(epochs=epochs, steps_per_epoch=steps_per_epoch))
