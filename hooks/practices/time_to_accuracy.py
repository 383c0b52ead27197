"""Time to accuracy: when a metric first reaches a target (wall time, epoch, step);
optionally stops training there."""
import math
import time

import keras

from hooks.training.steps import check_number, global_step

__all__ = ["TimeToAccuracy"]


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
        self.monitor, self.target, self.mode = monitor, check_number("target", target), mode
        self.stop = bool(stop)
        if steps_per_epoch is not None:
            steps_per_epoch = check_number("steps_per_epoch", steps_per_epoch)
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
                step = global_step(self.model)
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
