"""The one training loop, shared by imagenet and chexnet: Keras fit on a DistributedTrainer
with our callbacks, resuming from the newest checkpoint in model_dir that loads.

Faults (docs/robustness.md): a non-finite loss or weights stop every rank at the same step
(or roll back to the last good state, `--on_nonfinite=rollback`); SIGTERM/SIGUSR1 stop every
rank at an agreed step with a checkpoint (`faults.Preempted`); each step and evaluation
batch beats the stall watchdog. Elastic runs (`elastic_commit_steps`,
`hooks.distributed.elastic`) go on when workers leave or join."""
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import keras

from hooks import settings
from hooks.distributed import horovod_glue, watchdog
from hooks.errors import ConfigError
from hooks.state import checkpoints, faults, run_record
from hooks.training import callbacks as cb
from hooks.training.evaluation import Evaluation

ON_NONFINITE = settings.ON_NONFINITE


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


@dataclasses.dataclass(frozen=True)
class Plan:
    """How far and in which pieces: train to `total_steps`; a loop (evaluation when due,
    then a checkpoint) ends every `steps_per_loop` steps."""
    total_steps: int
    steps_per_loop: int
    global_batch: int
    steps_per_epoch: float


@dataclasses.dataclass(frozen=True)
class Input:
    """This rank's batches: a fixed `dataset`, or `make(context, step)` giving them from
    global step `step` on (an elastic run needs `make`: the input of each world)."""
    dataset: object = None
    make: Callable[[horovod_glue.Context, int], object] | None = None


@dataclasses.dataclass(frozen=True)
class Validation:
    """`evaluate()` every `every_steps` (None: at the end only) and of the final weights."""
    evaluate: Callable[[], Evaluation]
    every_steps: int | None = None


@dataclasses.dataclass(frozen=True)
class Saving:
    """Checkpoints in `model_dir` at each loop end, recording `state()`; keep `keep` and
    the best by `best_metric`."""
    model_dir: str
    state: Callable[[], dict] = dict
    keep: int = 5
    best_metric: str | None = None
    best_mode: str = "max"


@dataclasses.dataclass(frozen=True)
class Progress:
    """Rank 0's progress lines: every `every_n_steps` steps, as JSON with `json_lines`;
    with `metrics`, each progress line and evaluation is also a record there."""
    log: Callable = print
    every_n_steps: int = 100
    json_lines: bool = False
    metrics: run_record.MetricsLog | None = None


@dataclasses.dataclass(frozen=True)
class Elastic:
    """An elastic run (`hooks.distributed.elastic`): commit every `commit_steps` steps and at each
    checkpoint; `state_variables` (e.g. a schedule factor) travel with the weights."""
    commit_steps: int
    state_variables: Sequence = ()


def train(trainer: horovod_glue.DistributedTrainer, data: Input, plan: Plan, *,
          context: horovod_glue.Context, validation: Validation | None = None,
          saving: Saving | None = None, progress: Progress = Progress(),
          faults_policy: FaultPolicy = FaultPolicy(), elastic: Elastic | None = None,
          extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> LoopResult:
    """Train from the optimizer's current step to `plan.total_steps`.

    With `validation`, the result always holds an evaluation of the final weights (run
    here when there was nothing left to train). Extra callbacks with a `summary()` method
    report into `LoopResult.practices`. Raises `faults.Diverged` (non-finite loss or
    weights, no checkpoint of them) or `faults.Preempted` (a signal; a checkpoint was
    written). Elastic: `validation.evaluate` and the extra callbacks must read the world
    from `trainer.context` / their `context` attribute, which a reset replaces.
    """
    if faults_policy.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got "
                         f"{faults_policy.on_nonfinite!r}")
    if (data.dataset is None) == (data.make is None):
        raise ValueError("give Input(dataset) or Input(make=...), not both")
    if elastic is not None and data.make is None:
        raise ValueError("elastic training needs Input(make=...) (the input of each world)")
    start = int(trainer.optimizer.iterations.numpy())
    parts = _Parts(trainer, plan, validation, saving, progress, faults_policy,
                   list(extra_callbacks))
    t0 = time.perf_counter()
    practices = {}
    try:
        if elastic is None:
            history, rollbacks = parts.fit(context, data.dataset if data.dataset is not None
                                           else data.make(context, start))
            last_eval = _last_evaluation(parts.evaluation, validation)
        else:
            history, rollbacks, last_eval, context = _train_elastic(parts, data, elastic,
                                                                    practices)
    finally:
        parts.preemption.uninstall()
    if rollbacks:
        practices["rollbacks"] = rollbacks
    for callback in extra_callbacks:
        if hasattr(callback, "summary"):
            practices.update(callback.summary())
    return LoopResult(history=history, first_step=start,
                      final_step=int(trainer.optimizer.iterations.numpy()),
                      wall_seconds=time.perf_counter() - t0,
                      images_per_sec=parts.meter.images_per_sec, last_eval=last_eval,
                      practices=practices, context=context)


class _Parts:
    """The callbacks of one `train` call and its fit: those that do not depend on the
    world are made once; the others (progress, chief-only ones, the saver) per world."""

    def __init__(self, trainer, plan: Plan, validation, saving, progress, policy, extra):
        self.trainer, self.plan, self.saving, self.progress = trainer, plan, saving, progress
        self.validation, self.policy, self.extra = validation, policy, extra
        self.meter = cb.ThroughputMeter(plan.global_batch)
        self.evaluation = (cb.PeriodicEvaluation(validation.evaluate,
                                                 validation.every_steps or plan.total_steps,
                                                 plan.total_steps, self._record_evaluation)
                           if validation is not None else None)
        self.guard, self.heartbeat = faults.FiniteGuard(), _Heartbeat()
        self.preemption = faults.Preemption(trainer.stop_request)
        self.steady = [self.heartbeat, cb.StopAtStep(plan.total_steps), self.meter,
                       cb.LearningRateLogger(), self.guard, self.preemption]
        self.chief_log = horovod_glue.chief_logger(progress.log, lambda: trainer.context)

    def _record_evaluation(self, step: int, result: Evaluation) -> None:
        if self.progress.metrics is not None:
            self.progress.metrics.write({"kind": "eval", "step": step,
                                         "count": result.count, "metrics": result.metrics},
                                        self.trainer.context)

    def callbacks_for(self, ctx: horovod_glue.Context) -> list:
        callbacks = self.steady + [cb.ProgressLogger(
            self.plan.global_batch, ctx, self.progress.every_n_steps, self.plan.total_steps,
            json_lines=self.progress.json_lines, metrics=self.progress.metrics)]
        if self.evaluation is not None:
            callbacks.append(self.evaluation)
        callbacks += self.extra
        if self.saving is not None:
            saving = self.saving
            callbacks += horovod_glue.chief_only(
                [keras.callbacks.TensorBoard(f"{saving.model_dir}/tensorboard",
                                             update_freq="epoch", write_graph=False)], ctx)
            # Saver last: it records the evaluation results of the same loop; the guard
            # (before it) has checked the weights are finite.
            callbacks.append(cb.CheckpointSaver(
                saving.model_dir, self.trainer.network, ctx, saving.state,
                self.plan.steps_per_epoch, keep=saving.keep, best_metric=saving.best_metric,
                best_mode=saving.best_mode, evaluation=self.evaluation))
        return callbacks

    def fit(self, ctx, data, more=()):
        return _fit(self.trainer, data, self.callbacks_for(ctx) + list(more), self.guard,
                    self.heartbeat, self.preemption, self.plan.total_steps,
                    self.plan.steps_per_loop, self.policy, self.chief_log)


def _train_elastic(parts: _Parts, data: Input, elastic: Elastic, practices: dict):
    """`hooks.distributed.elastic`'s run of the loop: (history, rollbacks, last evaluation, final
    world); the world changes go into `practices`."""
    from hooks.distributed import elastic as elastic_lib

    trainer, global_batch = parts.trainer, parts.plan.global_batch
    stateful = {f"callback_{i}": c for i, c in enumerate(parts.steady + [parts.evaluation]
                                                         + parts.extra)
                if hasattr(c, "state_dict") and hasattr(c, "load_state_dict")}
    run = elastic_lib.ElasticRun(trainer, elastic.commit_steps, elastic.state_variables,
                                 stateful, log=parts.chief_log)

    def body(ctx):
        _new_world(trainer, ctx, parts.guard, parts.extra, parts.chief_log)
        step = int(trainer.optimizer.iterations.numpy())
        batches = _dataset_for(data.make, ctx, step, global_batch)
        # The global batch stays the same: a rank's share may be one example more than
        # another's, and its gradient is weighted by its share.
        trainer.gradient_weight = (horovod_glue.rank_batch(global_batch, ctx)
                                   * ctx.size / global_batch)
        history, rollbacks = parts.fit(ctx, batches, [run.callback()])
        # Collectives that must see the final world: inside the elastic run.
        last = _last_evaluation(parts.evaluation, parts.validation)
        elastic_lib.check_identical_weights(trainer, parts.chief_log)
        return history, rollbacks, last

    history, rollbacks, last_eval = run.run(body)
    practices["world_size_changes"] = [dataclasses.asdict(c) for c in run.changes]
    practices["elastic_seconds_lost"] = run.seconds_lost
    return history, rollbacks, last_eval, trainer.context


def _last_evaluation(evaluation, validation) -> Evaluation | None:
    if evaluation is None:
        return None
    return evaluation.last if evaluation.last is not None else validation.evaluate()


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
