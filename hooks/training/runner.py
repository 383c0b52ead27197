"""The one runner: the skeleton every task shares, done once.

A task (`imagenet.train.ImagenetTask`, `chexnet.train.ChexnetTask`) says what is its own
(its config extends `hooks.settings.Settings`, the settings every task has):
its input, its network and optimizer, its evaluation, what a checkpoint records and what
the run reports. `run(task, context)` does the rest in this order, for both: the global
batch check, the cheap input check on every rank, precision and seed, the distributed
trainer, resume from `model_dir` (elastic or not), the start-up line, the run's records
(`hooks.state.run_record`: flags.txt, metrics.jsonl, the environment in state.json and
summary.json), `hooks.training.loop.train` with the task's plan, and the task's summary.
"""
import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from hooks import runtime
from hooks.distributed import horovod_glue
from hooks.settings import Settings
from hooks.state import run_record
from hooks.training import loop


@dataclasses.dataclass
class Model:
    """What a task builds: the network, its optimizer and loss, and what goes with them."""
    network: keras.Model
    optimizer: keras.optimizers.Optimizer
    loss: Callable | str
    metrics: Sequence = ()
    callbacks: Sequence[keras.callbacks.Callback] = ()  # the task's practices
    state_variables: Sequence = ()  # elastic: variables that travel with the weights


class Task:
    """What a task provides to `run`; the methods are called in the order they are listed."""

    config: Settings  # the task's configuration: it extends the shared settings

    def batch_sizes(self) -> dict:
        """The global batch sizes to check against the world, by flag name."""
        return {"train_batch_size": self.config.train_batch_size}

    def check_input(self, context: horovod_glue.Context, log) -> None:
        """Cheap checks of this rank's input (raise a `UserError`): before any model."""

    def build(self, context: horovod_glue.Context, log) -> Model:
        raise NotImplementedError

    def restore(self, checkpoint) -> None:
        """Take the task's own state (e.g. a schedule factor) from a resumed checkpoint."""

    def start_lines(self, trainer, context, start: int, resumed) -> list[str]:
        """What rank 0 says before training: the model, the world, where it starts."""
        raise NotImplementedError

    def plan(self) -> loop.Plan | None:
        """How far to train; None to evaluate only."""
        raise NotImplementedError

    def train_input(self, context: horovod_glue.Context, start: int) -> loop.Input:
        raise NotImplementedError

    def validation(self, trainer, log) -> loop.Validation | None:
        return None

    def saving(self) -> loop.Saving | None:
        """Checkpoints: in `config.model_dir`, recording `checkpoint_state()`."""
        if not self.config.model_dir:
            return None
        return loop.Saving(self.config.model_dir, self.checkpoint_state,
                           self.config.keep_checkpoints)

    def checkpoint_state(self) -> dict:
        return {}

    def read_error(self, err: Exception, context) -> Exception | None:
        """A clearer error for a TensorFlow error raised while reading the input, or None."""
        return None

    def finish(self, trainer, outcome: "Outcome", log) -> dict:
        """The run's summary (rank 0 also writes the reports)."""
        raise NotImplementedError


@dataclasses.dataclass
class Outcome:
    """What the runner hands to `Task.finish`."""
    result: loop.LoopResult | None  # None: nothing trained (the task's plan was None)
    context: horovod_glue.Context  # the world at the end (elastic: may differ)
    start_step: int
    started: float  # time.perf_counter() when training (or evaluation) began
    environment: dict = dataclasses.field(default_factory=dict)  # for summary.json


def run(task: Task, context: horovod_glue.Context, log=print) -> dict:
    """Train (and evaluate) `task` in `context`; returns the task's summary."""
    settings = task.config
    early_log = horovod_glue.chief_logger(log, lambda: context)
    if not settings.elastic:  # elastic: any world size (uneven shares, weighted gradients)
        horovod_glue.check_global_batches(context, **task.batch_sizes())
    # Every rank checks its own input; one bad file stops every rank (elastic: no
    # collective before the loop, so each rank stops on its own).
    if settings.elastic:
        task.check_input(context, early_log)
    else:
        horovod_glue.all_ranks_ok(lambda: task.check_input(context, early_log), context)
    runtime.set_precision(settings.precision)
    if settings.seed is not None:
        keras.utils.set_random_seed(settings.seed)
    if (warning := runtime.precision_warning(settings.precision)) is not None:
        early_log(f"WARNING: {warning}")
    # Elastic: no collective before the loop (a joining worker would wait alone).
    environment = run_record.environment(
        context, None if settings.elastic else horovod_glue.hostnames(context))
    model = task.build(context, early_log)
    trainer = horovod_glue.DistributedTrainer(model.network, context, metrics=model.metrics,
                                              fp16_allreduce=settings.fp16_allreduce)
    trainer.compile(optimizer=model.optimizer, loss=model.loss,
                    jit_compile=False)  # Horovod ops cannot be XLA-compiled
    # From here on the world is trainer.context: an elastic reset replaces it.
    chief_log = horovod_glue.chief_logger(log, lambda: trainer.context)
    resumed = loop.restore_and_sync(settings.model_dir, trainer, model.optimizer, context,
                                     log=chief_log, elastic=settings.elastic)
    if resumed is not None:
        task.restore(resumed)
    start = int(model.optimizer.iterations.numpy())
    for line in task.start_lines(trainer, context, start, resumed):
        chief_log(line)
    try:
        return _train_and_finish(task, model, trainer, context, start, chief_log,
                                 environment)
    except tf.errors.OpError as err:
        problem = task.read_error(err, context)
        if problem is None:
            raise
        raise problem from err


def _train_and_finish(task: Task, model: Model, trainer, context, start: int, log,
                      environment: dict) -> dict:
    settings, plan, result = task.config, task.plan(), None
    saving, metrics = task.saving(), None
    if plan is not None and saving is not None:
        # What reproduces this run: its flags now, its environment in every checkpoint.
        if settings.flags_text:
            run_record.write_flags(saving.model_dir, settings.flags_text, context)
        task_state = saving.state
        saving = dataclasses.replace(
            saving, state=lambda: {**task_state(), "environment": environment})
        metrics = run_record.MetricsLog(os.path.join(saving.model_dir,
                                                     run_record.METRICS_FILE))
    started = time.perf_counter()
    if plan is not None:
        result = loop.train(
            trainer, task.train_input(context, start), plan, context=context,
            validation=task.validation(trainer, log), saving=saving,
            progress=loop.Progress(log, settings.log_every_n_steps, settings.json_progress,
                                   metrics),
            faults_policy=loop.FaultPolicy(settings.on_nonfinite, settings.max_rollbacks),
            elastic=(loop.Elastic(settings.elastic_commit_steps, model.state_variables)
                     if settings.elastic else None),
            extra_callbacks=model.callbacks)
        context = result.context
    return task.finish(trainer, Outcome(result, context, start, started, environment), log)
