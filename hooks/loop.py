"""The one training loop, shared by imagenet and chexnet: Keras fit on a DistributedTrainer
with our callbacks, resuming from the newest checkpoint in model_dir that loads.

Faults (docs/robustness.md): a non-finite loss or weights stop every rank at the same step
(or roll back to the last good state, `--on_nonfinite=rollback`); SIGTERM/SIGUSR1 stop every
rank at an agreed step with a checkpoint (`faults.Preempted`); each step and evaluation
batch beats the stall watchdog. Elastic runs (`elastic_commit_steps`, `hooks.elastic`) go on
when workers leave or join."""
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import keras

from hooks import callbacks as cb
from hooks import checkpoints, faults, horovod_glue, watchdog
from hooks.errors import ConfigError
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
    context: horovod_glue.Context | None = None  # the world at the end (elastic: may differ)


def restore_and_sync(model_dir: str | None, trainer: horovod_glue.DistributedTrainer,
                     optimizer: keras.optimizers.Optimizer, context: horovod_glue.Context,
                     log=print, elastic: bool = False) -> checkpoints.Checkpoint | None:
    """Rank 0 removes stale temporary folders and loads the newest checkpoint that loads
    (damaged ones are moved aside with a warning); then every rank gets rank 0's weights,
    optimizer slots and step. Returns the checkpoint used, on every rank. A failure on
    rank 0 (no usable checkpoint) ends every rank.

    `elastic`: no collective here (a worker that joins runs this while the others wait in
    the elastic sync, which then broadcasts rank 0's state). Every rank loads the newest
    usable checkpoint itself from model_dir (shared, as a cluster's checkpoints are), so
    whichever rank survives as rank 0 holds it and a bad checkpoint fails every rank alike;
    rank 0 alone cleans model_dir."""
    def load():
        if not context.is_chief:
            return None
        for path in checkpoints.remove_stale_temps(model_dir):
            log(f"removed {path} (left by a killed checkpoint write)")
        return checkpoints.restore_latest(model_dir, trainer.network, optimizer, warn=log)
    if elastic:
        found = load() if context.is_chief else checkpoints.restore_latest(
            model_dir, trainer.network, optimizer, warn=lambda *a: None, move_damaged=False)
        if not optimizer.built:
            optimizer.build(trainer.network.trainable_variables)
        return found
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


def train(trainer: horovod_glue.DistributedTrainer, dataset=None, *,
          context: horovod_glue.Context, total_steps: int, steps_per_loop: int,
          global_batch: int, steps_per_epoch: float,
          evaluate: Callable[[], Evaluation] | None = None,
          eval_every_steps: int | None = None, model_dir: str | None = None,
          checkpoint_state: Callable[[], dict] = dict, keep_checkpoints: int = 5,
          best_metric: str | None = None, best_mode: str = "max",
          log_every_n_steps: int = 100, json_progress: bool = False,
          extra_callbacks: Sequence[keras.callbacks.Callback] = (),
          faults_policy: FaultPolicy = FaultPolicy(),
          make_dataset: Callable[[horovod_glue.Context, int], object] | None = None,
          elastic_commit_steps: int | None = None, state_variables: Sequence = (),
          log=print) -> LoopResult:
    """Train from the optimizer's current step to `total_steps`.

    Every `steps_per_loop` steps a loop ends: evaluation when due, then a checkpoint. With
    `evaluate`, the result always holds an evaluation of the final weights (run here when
    there was nothing left to train). Extra callbacks with a `summary()` method report
    into `LoopResult.practices`. Raises `faults.Diverged` (non-finite loss or weights, no
    checkpoint of them) or `faults.Preempted` (a signal; a checkpoint was written).

    The input is `dataset`, or `make_dataset(context, step)`: this rank's batches from
    global step `step` on. With `elastic_commit_steps` the run is elastic (`hooks.elastic`):
    it needs `make_dataset` (the input is rebuilt for each world), commits its state every
    that many steps and at each checkpoint, and `state_variables` (e.g. a schedule factor)
    travel with the network and optimizer. `evaluate` and the extra callbacks must read the
    world from `trainer.context` / their `context` attribute, which a reset replaces.
    """
    if faults_policy.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got "
                         f"{faults_policy.on_nonfinite!r}")
    if (dataset is None) == (make_dataset is None):
        raise ValueError("give dataset or make_dataset, not both")
    if elastic_commit_steps is not None and make_dataset is None:
        raise ValueError("elastic training needs make_dataset (the input of each world)")
    start = int(trainer.optimizer.iterations.numpy())
    meter = cb.ThroughputMeter(global_batch)
    evaluation = (cb.PeriodicEvaluation(evaluate, eval_every_steps or total_steps, total_steps)
                  if evaluate is not None else None)
    guard, heartbeat = faults.FiniteGuard(), _Heartbeat()
    preemption = faults.Preemption(trainer.stop_request)
    # Callbacks that do not depend on the world; the others are made for each context.
    steady = [heartbeat, cb.StopAtStep(total_steps), meter, cb.LearningRateLogger(),
              guard, preemption]
    chief_log = horovod_glue.chief_logger(log, lambda: trainer.context)

    def callbacks_for(ctx: horovod_glue.Context) -> list:
        callbacks = steady + [cb.ProgressLogger(global_batch, ctx, log_every_n_steps,
                                                total_steps, json_lines=json_progress)]
        if evaluation is not None:
            callbacks.append(evaluation)
        callbacks += list(extra_callbacks)
        if model_dir:
            callbacks += horovod_glue.chief_only(
                [keras.callbacks.TensorBoard(f"{model_dir}/tensorboard", update_freq="epoch",
                                             write_graph=False)], ctx)
            # Saver last: it records the evaluation results of the same loop; the guard
            # (before it) has checked the weights are finite.
            callbacks.append(cb.CheckpointSaver(model_dir, trainer.network, ctx,
                                                checkpoint_state, steps_per_epoch,
                                                keep=keep_checkpoints, best_metric=best_metric,
                                                best_mode=best_mode, evaluation=evaluation))
        return callbacks

    def fit(ctx, data, more=()):
        return _fit(trainer, data, callbacks_for(ctx) + list(more), guard, heartbeat,
                    preemption, total_steps, steps_per_loop, faults_policy, chief_log)

    t0 = time.perf_counter()
    practices, elastic = {}, None
    try:
        if elastic_commit_steps is None:
            history, rollbacks = fit(context, dataset if dataset is not None
                                     else make_dataset(context, start))
        else:
            from hooks import elastic as elastic_lib

            stateful = {f"callback_{i}": c for i, c in enumerate(steady + [evaluation]
                                                                 + list(extra_callbacks))
                        if hasattr(c, "state_dict") and hasattr(c, "load_state_dict")}
            elastic = elastic_lib.ElasticRun(trainer, elastic_commit_steps, state_variables,
                                             stateful, log=chief_log)

            def body(ctx):
                _new_world(trainer, ctx, guard, extra_callbacks, chief_log)
                step = int(trainer.optimizer.iterations.numpy())
                data = _dataset_for(make_dataset, ctx, step, global_batch)
                # The global batch stays the same: a rank's share may be one example more
                # than another's, and its gradient is weighted by its share.
                trainer.gradient_weight = (horovod_glue.rank_batch(global_batch, ctx)
                                           * ctx.size / global_batch)
                history, rollbacks = fit(ctx, data, [elastic.callback()])
                # Collectives that must see the final world: inside the elastic run.
                last = _last_evaluation(evaluation, evaluate)
                elastic_lib.check_identical_weights(trainer, chief_log)
                return history, rollbacks, last

            history, rollbacks, last_eval = elastic.run(body)
            context = trainer.context
            practices["world_size_changes"] = [dataclasses.asdict(c) for c in elastic.changes]
            practices["elastic_seconds_lost"] = elastic.seconds_lost
    finally:
        preemption.uninstall()
    if elastic is None:
        last_eval = _last_evaluation(evaluation, evaluate)
    if rollbacks:
        practices["rollbacks"] = rollbacks
    for callback in extra_callbacks:
        if hasattr(callback, "summary"):
            practices.update(callback.summary())
    return LoopResult(history=history, first_step=start,
                      final_step=int(trainer.optimizer.iterations.numpy()),
                      wall_seconds=time.perf_counter() - t0,
                      images_per_sec=meter.images_per_sec, last_eval=last_eval,
                      practices=practices, context=context)


def _last_evaluation(evaluation, evaluate) -> Evaluation | None:
    if evaluation is None:
        return None
    return evaluation.last if evaluation.last is not None else evaluate()


def _new_world(trainer, context, guard, extra_callbacks, log) -> None:
    """After an elastic (re)start: everything that depends on (rank, size) follows, and
    the log says where the ranks are (Horovod's init cannot in an elastic job)."""
    ranks = horovod_glue.placement(context)
    watchdog.world_changed(context.rank, context.size, [host for _, host, _, _ in ranks])
    trainer.context = context
    log(horovod_glue.describe_placement(ranks))  # rank 0 of the new world
    trainer.train_function = None  # re-trace: the grouped allreduce is built for a world
    guard.good = None  # the synced state is the last good one
    for callback in extra_callbacks:
        if isinstance(getattr(callback, "context", None), horovod_glue.Context):
            callback.context = context


def _dataset_for(make_dataset, context, step, global_batch):
    """This rank's input for `context` from `step` on; bad input on any rank (or a global
    batch smaller than the new world) stops every rank with one line."""
    try:
        horovod_glue.rank_batch(global_batch, context)
        return horovod_glue.all_ranks_ok(lambda: make_dataset(context, step), context)
    except ConfigError as err:
        raise ConfigError(f"elastic: the world now has {context.size} ranks: {err}"
                          ) from None
