"""The one training loop, shared by imagenet and chexnet: Keras fit on a DistributedTrainer
with our callbacks, resuming from the newest checkpoint in model_dir."""
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import keras

from hooks import callbacks as cb
from hooks import checkpoints, horovod_glue
from hooks.evaluation import Evaluation


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
                     optimizer: keras.optimizers.Optimizer,
                     context: horovod_glue.Context) -> checkpoints.Checkpoint | None:
    """Rank 0 loads the newest complete checkpoint (if any); then every rank gets rank 0's
    weights, optimizer slots and step. Returns the checkpoint used, on every rank."""
    found = checkpoints.latest(model_dir) if context.is_chief else None
    if found is not None:
        checkpoints.restore(found, trainer.network, optimizer)
    horovod_glue.build_and_broadcast(trainer, optimizer, context)
    return horovod_glue.broadcast_object(found, context)


def train(trainer: horovod_glue.DistributedTrainer, dataset, *,
          context: horovod_glue.Context, total_steps: int, steps_per_loop: int,
          global_batch: int, steps_per_epoch: float,
          evaluate: Callable[[], Evaluation] | None = None,
          eval_every_steps: int | None = None, model_dir: str | None = None,
          checkpoint_state: Callable[[], dict] = dict, keep_checkpoints: int = 5,
          best_metric: str | None = None, best_mode: str = "max",
          log_every_n_steps: int = 100, json_progress: bool = False,
          extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> LoopResult:
    """Train from the optimizer's current step to `total_steps`.

    Every `steps_per_loop` steps a loop ends: evaluation when due, then a checkpoint. With
    `evaluate`, the result always holds an evaluation of the final weights (run here when
    there was nothing left to train). Extra callbacks with a `summary()` method report
    into `LoopResult.practices`.
    """
    start = int(trainer.optimizer.iterations.numpy())
    first_loop = start // steps_per_loop
    loops = first_loop + max(1, math.ceil((total_steps - start) / steps_per_loop))
    meter = cb.ThroughputMeter(global_batch)
    evaluation = (cb.PeriodicEvaluation(evaluate, eval_every_steps or total_steps, total_steps)
                  if evaluate is not None else None)
    callbacks = [cb.StopAtStep(total_steps), meter, cb.LearningRateLogger(),
                 keras.callbacks.TerminateOnNaN(),
                 cb.ProgressLogger(global_batch, context, log_every_n_steps, total_steps,
                                   json_lines=json_progress)]
    if evaluation is not None:
        callbacks.append(evaluation)
    callbacks += list(extra_callbacks)
    if model_dir:
        callbacks += horovod_glue.chief_only(
            [keras.callbacks.TensorBoard(f"{model_dir}/tensorboard", update_freq="epoch",
                                         write_graph=False)], context)
        # Saver last: it records the evaluation results of the same loop.
        callbacks.append(cb.CheckpointSaver(model_dir, trainer.network, context,
                                            checkpoint_state, steps_per_epoch,
                                            keep=keep_checkpoints, best_metric=best_metric,
                                            best_mode=best_mode, evaluation=evaluation))
    t0 = time.perf_counter()
    history = {}
    if start < total_steps:
        history = trainer.fit(dataset, initial_epoch=first_loop, epochs=loops,
                              steps_per_epoch=steps_per_loop, callbacks=callbacks, shuffle=False,
                              verbose=0).history
    last_eval = None
    if evaluation is not None:
        last_eval = evaluation.last if evaluation.last is not None else evaluate()
    practices = {}
    for callback in extra_callbacks:
        if hasattr(callback, "summary"):
            practices.update(callback.summary())
    return LoopResult(history=history, first_step=start,
                      final_step=int(trainer.optimizer.iterations.numpy()),
                      wall_seconds=time.perf_counter() - t0,
                      images_per_sec=meter.images_per_sec, last_eval=last_eval,
                      practices=practices)
