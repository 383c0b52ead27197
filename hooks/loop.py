"""The one training loop, shared by imagenet and chexnet: Keras fit on a DistributedTrainer
with our callbacks, resuming from the newest checkpoint in model_dir that loads.

Faults (docs/robustness.md): a non-finite loss or weights stop every rank at the same step
(or roll back to the last good state, `--on_nonfinite=rollback`); SIGTERM/SIGUSR1 stop every
rank at an agreed step with a checkpoint (`faults.Preempted`); each step and evaluation
batch beats the stall watchdog."""
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import keras

from hooks import callbacks as cb
from hooks import checkpoints, faults, horovod_glue, watchdog
from hooks.evaluation import Evaluation

ON_NONFINITE = ("stop", "rollback")


@dataclasses.dataclass(frozen=True)
class FaultPolicy:
    """What the loop does on a non-finite loss: "stop" (exit naming the step) or
    "rollback" (back to the last good state, skipping the batches since, at most
    `max_rollbacks` times)."""
    on_nonfinite: str = "stop"
    max_rollbacks: int = 3


@dataclasses.dataclass
class LoopResult:
    """What a training run gives back to its caller."""
    history: dict[str, list]
    first_step: int
    final_step: int
    wall_seconds: float
    images_per_sec: float
    last_eval: Evaluation | None  # the newest evaluation (always one when asked for)
    practices: dict  # what the extra callbacks report (their `summary()`), merged


def restore_and_sync(model_dir: str | None, trainer: horovod_glue.DistributedTrainer,
                     optimizer: keras.optimizers.Optimizer, context: horovod_glue.Context,
                     log=print) -> checkpoints.Checkpoint | None:
    """Rank 0 removes stale temporary folders and loads the newest checkpoint that loads
    (damaged ones are moved aside with a warning); then every rank gets rank 0's weights,
    optimizer slots and step. Returns the checkpoint used, on every rank. A failure on
    rank 0 (no usable checkpoint) ends every rank."""
    def load():
        if not context.is_chief:
            return None
        for path in checkpoints.remove_stale_temps(model_dir):
            log(f"removed {path} (left by a killed checkpoint write)")
        return checkpoints.restore_latest(model_dir, trainer.network, optimizer, warn=log)
    found = horovod_glue.all_ranks_ok(load, context)
    horovod_glue.build_and_broadcast(trainer, optimizer, context)
    return horovod_glue.broadcast_object(found, context)


class _Heartbeat(keras.callbacks.Callback):
    """Beats the stall watchdog at every step and counts this fit call's batches."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_begin(self, logs=None):
        self.batches = 0
        watchdog.beat(phase="the first training step (graph tracing)", slow=True)

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        watchdog.beat(int(self.model.optimizer.iterations.numpy()), "gradient all-reduce")


def _fit(trainer, dataset, callbacks, guard, heartbeat, preemption, total_steps,
         steps_per_loop, policy: FaultPolicy, chief_log):
    """Keras fit to `total_steps`, again after each rollback; (history, rollbacks)."""
    history, consumed, rollbacks = {}, 0, 0
    while int(trainer.optimizer.iterations.numpy()) < total_steps:
        step = int(trainer.optimizer.iterations.numpy())
        first_loop = step // steps_per_loop
        loops = first_loop + max(1, math.ceil((total_steps - step) / steps_per_loop))
        try:
            # After a rollback the stream goes on past the batches already consumed, so
            # the ones that diverged are not seen again.
            history = trainer.fit(dataset.skip(consumed) if consumed else dataset,
                                  initial_epoch=first_loop, epochs=loops,
                                  steps_per_epoch=steps_per_loop, callbacks=callbacks,
                                  shuffle=False, verbose=0).history
        except faults.Diverged as err:
            consumed += heartbeat.batches
            if policy.on_nonfinite != "rollback" or rollbacks >= policy.max_rollbacks:
                raise
            rollbacks += 1
            back_to = guard.rollback()
            chief_log(f"rollback {rollbacks}/{policy.max_rollbacks}: {err}; back to the last "
                      f"good state (step {back_to}), skipping the {err.step - back_to} "
                      "batches since")
            continue
        if preemption.stopped_at is not None:
            raise faults.Preempted(preemption.stopped_at, preemption.signal_name)
        break
    return history, rollbacks


def train(trainer: horovod_glue.DistributedTrainer, dataset, *,
          context: horovod_glue.Context, total_steps: int, steps_per_loop: int,
          global_batch: int, steps_per_epoch: float,
          evaluate: Callable[[], Evaluation] | None = None,
          eval_every_steps: int | None = None, model_dir: str | None = None,
          checkpoint_state: Callable[[], dict] = dict, keep_checkpoints: int = 5,
          best_metric: str | None = None, best_mode: str = "max",
          log_every_n_steps: int = 100, json_progress: bool = False,
          extra_callbacks: Sequence[keras.callbacks.Callback] = (),
          faults_policy: FaultPolicy = FaultPolicy(), log=print) -> LoopResult:
    """Train from the optimizer's current step to `total_steps`.

    Every `steps_per_loop` steps a loop ends: evaluation when due, then a checkpoint. With
    `evaluate`, the result always holds an evaluation of the final weights (run here when
    there was nothing left to train). Extra callbacks with a `summary()` method report
    into `LoopResult.practices`. Raises `faults.Diverged` (non-finite loss or weights, no
    checkpoint of them) or `faults.Preempted` (a signal; a checkpoint was written).
    """
    if faults_policy.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got "
                         f"{faults_policy.on_nonfinite!r}")
    start = int(trainer.optimizer.iterations.numpy())
    meter = cb.ThroughputMeter(global_batch)
    evaluation = (cb.PeriodicEvaluation(evaluate, eval_every_steps or total_steps, total_steps)
                  if evaluate is not None else None)
    guard, heartbeat = faults.FiniteGuard(), _Heartbeat()
    preemption = faults.Preemption(trainer.stop_request)
    callbacks = [heartbeat, cb.StopAtStep(total_steps), meter, cb.LearningRateLogger(),
                 guard, preemption,
                 cb.ProgressLogger(global_batch, context, log_every_n_steps, total_steps,
                                   json_lines=json_progress)]
    if evaluation is not None:
        callbacks.append(evaluation)
    callbacks += list(extra_callbacks)
    if model_dir:
        callbacks += horovod_glue.chief_only(
            [keras.callbacks.TensorBoard(f"{model_dir}/tensorboard", update_freq="epoch",
                                         write_graph=False)], context)
        # Saver last: it records the evaluation results of the same loop; the guard (before
        # it) has checked the weights are finite.
        callbacks.append(cb.CheckpointSaver(model_dir, trainer.network, context,
                                            checkpoint_state, steps_per_epoch,
                                            keep=keep_checkpoints, best_metric=best_metric,
                                            best_mode=best_mode, evaluation=evaluation))
    chief_log = log if context.is_chief else (lambda *a, **k: None)
    t0 = time.perf_counter()
    try:
        history, rollbacks = _fit(trainer, dataset, callbacks, guard, heartbeat, preemption,
                                  total_steps, steps_per_loop, faults_policy, chief_log)
    finally:
        preemption.uninstall()
    last_eval = None
    if evaluation is not None:
        last_eval = evaluation.last if evaluation.last is not None else evaluate()
    practices = {"rollbacks": rollbacks} if rollbacks else {}
    for callback in extra_callbacks:
        if hasattr(callback, "summary"):
            practices.update(callback.summary())
    return LoopResult(history=history, first_step=start,
                      final_step=int(trainer.optimizer.iterations.numpy()),
                      wall_seconds=time.perf_counter() - t0,
                      images_per_sec=meter.images_per_sec, last_eval=last_eval,
                      practices=practices)
