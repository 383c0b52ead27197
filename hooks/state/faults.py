"""What the training loop does when things go wrong: divergence and preemption.

- `FiniteGuard`: stops at the first non-finite *global* loss (every rank sees the same
  all-reduced value, so every rank stops at the same step) and checks the weights are
  finite before each checkpoint; it keeps an in-memory copy of the last good state (weights
  and optimizer, taken at each loop end) that `rollback()` puts back.
- `Preemption`: on SIGTERM or SIGUSR1 (SLURM preemption, time limit, scancel, `--signal`)
  the rank sets a flag that the next step's all-reduce carries to every rank; all ranks stop
  at that same step, the chief writes a checkpoint there, and the job exits with
  `PREEMPTED_EXIT_CODE` so batch scripts can requeue it.
"""
import math
import signal

import keras
import numpy as np

from hooks.state import checkpoints
from hooks.training.steps import global_step

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again": a checkpoint was written, resubmit
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint at `step`."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {step}; a checkpoint was written "
                         "there and a rerun of the same command resumes from it")
        self.step, self.signal_name = step, signal_name


class Diverged(checkpoints.NonFiniteError):
    """A non-finite loss or weights at `step` (a UserError: a one-line message)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step



class FiniteGuard(keras.callbacks.Callback):
    """Raises `Diverged` at the first non-finite global loss, and at a loop end whose
    weights are not finite (before any checkpoint of them); otherwise keeps that loop end's
    weights and optimizer state as the last good state."""

    def __init__(self):
        super().__init__()
        self.good = None  # (step, [numpy arrays]) of the network weights + optimizer vars

    def _variables(self):
        return list(self.model.network.weights) + list(self.model.optimizer.variables)

    def _keep(self):
        self.good = (global_step(self.model), [np.array(v.numpy()) for v in self._variables()])

    def on_train_begin(self, logs=None):
        if self.good is None:
            self._keep()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = global_step(self.model)
            raise Diverged(f"training diverged: the global loss is {loss} at step {step}; "
                           f"no checkpoint was written after step {self.good[0]}", step)

    def on_epoch_end(self, epoch, logs=None):
        bad = checkpoints.non_finite(v.numpy() for v in self._variables())
        if bad:
            step = global_step(self.model)
            raise Diverged(f"training diverged: {bad} weight tensors are not finite at step "
                           f"{step}; no checkpoint was written after step {self.good[0]}",
                           step)
        self._keep()

    def rollback(self) -> int:
        """Put the last good state back; returns its step."""
        step, values = self.good
        for var, value in zip(self._variables(), values):
            var.assign(value)
        return step


class Preemption(keras.callbacks.Callback):
    """Stops every rank at the same step once any rank got SIGTERM or SIGUSR1.

    The trainer sums its `stop_request` variable over ranks with each step's metrics
    (`logs["stop_request"]`), so the decision needs no extra collective."""

    def __init__(self, stop_request):
        super().__init__()
        self.stop_request = stop_request
        self.signal_name = None  # the signal this rank received, if any
        self.stopped_at = None
        self._previous = {}

    def _handle(self, signum, frame):
        # Only a flag here: the variable is set between steps, from the loop's own thread.
        self.signal_name = signal.Signals(signum).name

    def on_train_begin(self, logs=None):
        if not self._previous:  # a fit after a rollback keeps the handlers installed
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put the previous handlers back (the loop calls it however training ends)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_batch_begin(self, batch, logs=None):
        if self.signal_name is not None:
            self.stop_request.request()

    def on_train_batch_end(self, batch, logs=None):
        if float((logs or {}).get("stop_request", 0.0)) > 0:
            self.stopped_at = global_step(self.model)
            self.signal_name = self.signal_name or "a signal to another rank"
            self.model.stop_training = True
