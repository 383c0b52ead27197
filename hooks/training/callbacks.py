"""Keras callbacks for the shared training loop, one concern each.

A "loop" is one Keras epoch of `steps_per_loop` steps (the TPU resnet_main's
iterations_per_loop); the global step is always `optimizer.iterations`. Values go into
`logs` so History, CSVLogger and TensorBoard see them. Callbacks that run collectives
(evaluation) run on every rank; those that write files run on rank 0 only.
"""
import json
import math
import sys
import time
from collections.abc import Callable

import keras
import numpy as np

from hooks.distributed import horovod_glue, watchdog
from hooks.state import checkpoints
from hooks.training import evaluation
from hooks.training.steps import global_step


def current_learning_rate(optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds `lr` (and `weight_decay` when the optimizer has one) to each loop's logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["lr"] = current_learning_rate(self.model.optimizer)
        wd = getattr(self.model.optimizer, "weight_decay", None)
        if wd is not None:
            logs["weight_decay"] = float(keras.ops.convert_to_numpy(wd))


class StopAtStep(keras.callbacks.Callback):
    """Ends training exactly at `total_steps` global steps, whatever the loop length."""

    def __init__(self, total_steps: int):
        super().__init__()
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        self.total_steps = total_steps

    def on_train_batch_end(self, batch, logs=None):
        if global_step(self.model) >= self.total_steps:
            self.model.stop_training = True


class ProgressLogger(keras.callbacks.Callback):
    """Rank 0 prints step, loss, lr and images/s (per rank and total) every N steps.

    With `json_lines`, each line is also a JSON object (prefix "PROGRESS ") for tools;
    with `metrics` (a `run_record.MetricsLog`), each line is also a record there.
    """

    def __init__(self, global_batch: int, context: horovod_glue.Context, every_n_steps: int,
                 total_steps: int, stream=None, json_lines: bool = False, metrics=None):
        super().__init__()
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be > 0, got {every_n_steps}")
        self.global_batch, self.context = global_batch, context
        self.every, self.total = every_n_steps, total_steps
        self.stream = stream or sys.stdout
        self.json_lines, self.metrics = json_lines, metrics
        self._t0 = self._s0 = None

    def on_epoch_begin(self, epoch, logs=None):
        # Restart the clock after each loop, so evaluation time is not counted.
        self._t0, self._s0 = time.perf_counter(), global_step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        if step % self.every and step != self.total:
            return
        now = time.perf_counter()
        rate = self.global_batch * (step - self._s0) / max(now - self._t0, 1e-9)
        self._t0, self._s0 = now, step
        if not self.context.is_chief:
            return
        record = {"step": step, "total_steps": self.total, "loss": float((logs or {}).get(
            "loss", float("nan"))), "lr": current_learning_rate(self.model.optimizer),
            "images_per_sec": rate, "images_per_sec_per_rank": rate / self.context.size}
        others = {k: float(v) for k, v in (logs or {}).items()
                  if k not in ("loss", "stop_request") and np.ndim(v) == 0}
        extra = " ".join(f"{k} {v:.4f}" for k, v in others.items())
        print(f"step {step:>7}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.3e}"
              f" {extra} | {record['images_per_sec_per_rank']:.1f} img/s/rank"
              f" {rate:.1f} img/s total", file=self.stream, flush=True)
        if self.json_lines:
            print("PROGRESS " + json.dumps(record), file=self.stream, flush=True)
        if self.metrics is not None:
            self.metrics.write({"kind": "train", **record, "metrics": others}, self.context)


class ThroughputMeter(keras.callbacks.Callback):
    """Training images/s: time inside the train steps only (evaluation and checkpoints
    between loops do not count), leaving out the first `skip_steps` (graph tracing,
    pipeline warm-up)."""

    def __init__(self, global_batch: int, skip_steps: int = 1):
        super().__init__()
        self.global_batch, self.skip_steps = global_batch, skip_steps
        self.steps = 0
        self.seconds = 0.0
        self._seen = 0
        self._t = None

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._seen += 1
        if self._seen > self.skip_steps:
            self.seconds += time.perf_counter() - self._t
            self.steps += 1

    @property
    def images_per_sec(self) -> float:
        return self.global_batch * self.steps / self.seconds if self.seconds else float("nan")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.seconds:
            logs["images_per_sec"] = self.images_per_sec


class PeriodicEvaluation(keras.callbacks.Callback):
    """Runs `evaluate()` (a collective: every rank) every `every_n_steps` and at the end.

    `evaluate()` returns an `evaluation.Evaluation`; the newest is kept in `last`, and its
    metrics go into the loop's logs as `val_<name>` (Keras's convention, so History,
    TensorBoard and metric-watching callbacks see them)."""

    def __init__(self, evaluate: Callable[[], evaluation.Evaluation], every_n_steps: int,
                 total_steps: int, on_result: Callable | None = None):
        super().__init__()
        self.evaluate, self.every, self.total = evaluate, every_n_steps, total_steps
        self.on_result = on_result  # e.g. a metrics.jsonl record
        self._last_period = None
        self.last: evaluation.Evaluation | None = None

    def on_train_begin(self, logs=None):
        self._last_period = global_step(self.model) // self.every

    # What an elastic reset restores and broadcasts (hooks.distributed.elastic): every rank
    # must agree on whether the final weights still need an evaluation.
    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = state["last"]

    def on_epoch_end(self, epoch, logs=None):
        step = global_step(self.model)
        if step // self.every == self._last_period and step < self.total:
            return
        if self.model.stop_training and step < self.total:
            return  # stopping early mid-loop (preemption): checkpoint now, evaluate later
        self._last_period = step // self.every
        self.last = self.evaluate()
        if self.on_result is not None:
            self.on_result(step, self.last)
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in self.last.metrics.items()})


class ReduceOnPlateau(keras.callbacks.Callback):
    """Multiplies a `schedules.ScaledSchedule`'s factor by `factor` after `patience`
    evaluations without a `val_loss` lower by `min_delta`. Every rank sees the same exact
    global val_loss, so every rank takes the same decision without communicating."""

    def __init__(self, schedule, patience: int, factor: float, min_delta: float = 1e-4):
        super().__init__()
        if patience < 1 or not 0 < factor <= 1:
            raise ValueError(f"need patience >= 1 and 0 < factor <= 1, got {patience}, {factor}")
        self.schedule, self.patience, self.factor = schedule, patience, factor
        self.min_delta = min_delta
        self.best = math.inf
        self.wait = 0

    # Every rank must take the same decisions after an elastic reset (hooks.distributed.elastic).
    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = state["best"], state["wait"]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        loss = logs.get("val_loss")
        if loss is None or not math.isfinite(loss):
            return
        if loss < self.best - self.min_delta:
            self.best, self.wait = loss, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.schedule.factor.assign(float(self.schedule.factor.numpy()) * self.factor)
                self.wait = 0
        logs["lr_factor"] = float(self.schedule.factor.numpy())


class CheckpointSaver(keras.callbacks.Callback):
    """Rank 0 writes a checkpoint at the end of every loop (and so at the end of training).

    `state()` returns what to record beside the weights; the saver adds the step's epoch,
    learning rate, training loss and the newest evaluation's metrics (from `evaluation`).
    """

    def __init__(self, model_dir: str, network: keras.Model, context: horovod_glue.Context,
                 state: Callable[[], dict], steps_per_epoch: float, keep: int = 5,
                 best_metric: str | None = None, best_mode: str = "max",
                 evaluation: PeriodicEvaluation | None = None):
        super().__init__()
        self.model_dir, self.network, self.context = model_dir, network, context
        self.state, self.steps_per_epoch, self.keep = state, steps_per_epoch, keep
        self.best_metric, self.best_mode = best_metric, best_mode
        self.evaluation = evaluation

    def on_epoch_end(self, epoch, logs=None):
        # Every rank: the others wait in a barrier while rank 0 writes, so a long write
        # on a slow file system is not mistaken for a stall (see hooks.distributed.watchdog).
        if self.context.is_chief:
            watchdog.chief_writing(True)
            try:
                self._save(logs or {})
                failed = 0
            except checkpoints.CheckpointError as err:
                failed, error = 1, err
            finally:
                watchdog.chief_writing(False)
        else:
            watchdog.waiting_for_chief(True)
            failed = 0
        # A failed write (full disk) must end every rank, not leave them in the next step.
        failed = int(horovod_glue.allreduce_sum([np.int64(failed)], self.context)[0])
        watchdog.waiting_for_chief(False)
        if failed:
            if self.context.is_chief:
                raise error
            raise checkpoints.CheckpointError("rank 0 could not write a checkpoint (its "
                                              "error names the folder)")

    def _save(self, logs):
        step = global_step(self.model)
        last = self.evaluation.last if self.evaluation is not None else None
        state = dict(self.state(), epoch=step / self.steps_per_epoch,
                     learning_rate=current_learning_rate(self.model.optimizer),
                     metrics=dict(last.metrics) if last else {},
                     best_metric=self.best_metric, best_mode=self.best_mode,
                     train_loss=float(logs.get("loss", float("nan"))),
                     network=checkpoints.describe(self.network))
        checkpoints.save(self.model_dir, step, self.network, self.model.optimizer, state,
                         keep=self.keep)
