"""Elastic training on Keras 3: the job goes on when workers leave or join.

Under `horovodrun --gloo --min-np N --max-np M --host-discovery-script S ... --elastic`,
Horovod re-forms the job when a worker dies or the discovery script lists other hosts.
`horovod.tensorflow.keras.elastic` is written for Keras 2 (and misbehaves on scale-up), so
this module drives `horovod.common.elastic.run_fn` around the project's own loop
(`hooks.training.loop.train` calls `ElasticRun.run`):

- `TrainingState` is what a reset goes back to: every network and optimizer variable (the
  global step is the optimizer's `iterations`; epoch, data position and learning-rate
  schedule position follow from it), extra variables the caller names (a schedule factor),
  and the Python state of stateful callbacks (last evaluation, plateau counters, the
  world-size history). `commit()` copies it to host memory (every `commit_steps` steps and
  at each checkpoint) and checks for host changes.
- On a reset the survivors restore the last commit, re-initialise Horovod, and the new
  rank 0 broadcasts the state (variables with `hvd.broadcast_variables` ourselves: in TF2
  eager `TensorFlowState.sync()` broadcasts nothing); a joining worker gets it the same way.
  The loop then rebuilds what depends on (rank, size): the per-rank input, the traced train
  step (its grouped allreduce), the callbacks' `context`, and tells the stall watchdog.
- Each world-size change is recorded as a `WorldChange` (step, old and new size, steps
  redone, seconds lost) and logged by rank 0.

Nothing here may run a collective before the first sync: a joining worker executes the
start-up code while the others wait in the sync broadcast.
"""
import copy
import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from hooks.distributed import horovod_glue, watchdog


@dataclasses.dataclass
class WorldChange:
    """One reset: training went on from `step` with `new_size` ranks instead of
    `old_size`; `steps_redone` steps since the last commit were lost (a failure), and
    `seconds_lost` is the wall time from the last commit to the end of the first step
    after the reset (detection, re-initialisation, state broadcast, re-tracing, redone
    steps), as measured by the rank that became rank 0."""
    step: int
    old_size: int
    new_size: int
    reason: str  # "a worker failed", "hosts removed", "hosts added or changed"
    steps_redone: int = 0
    seconds_lost: float | None = None
    # seconds_lost in three parts: work since the last commit (to redo), re-forming the
    # world (detection, Horovod re-init, waiting for a joiner's start-up, state broadcast),
    # and the restart (input pipeline, re-tracing the train step, the first step).
    seconds_since_commit: float = 0.0
    seconds_to_reform: float = 0.0
    seconds_to_first_step: float = 0.0

    def describe(self) -> str:
        redone = f"; {self.steps_redone} steps redone" if self.steps_redone else ""
        line = (f"elastic: world size {self.old_size} -> {self.new_size} at step {self.step} "
                f"({self.reason}{redone})")
        if self.seconds_lost is None:
            return line
        return (f"{line}, {self.seconds_lost:.1f} s lost (work since the last commit "
                f"{self.seconds_since_commit:.1f} s, re-forming the world "
                f"{self.seconds_to_reform:.1f} s, restart and first step "
                f"{self.seconds_to_first_step:.1f} s)")


def _reason(error: BaseException) -> str:
    from horovod.common.exceptions import HostsUpdatedInterrupt

    if not isinstance(error, HostsUpdatedInterrupt):
        return "a worker failed"
    return "hosts removed" if error.skip_sync else "hosts added or changed"


def _is_horovod_failure(error: BaseException) -> bool:
    """A collective that failed because a peer went away (Gloo closed, Horovod shut down).
    Horovod's own `hvd.elastic.run` only recognises some op names (not grouped allreduce)
    and silently returns None for other TensorFlow errors: we re-raise those."""
    text = str(error)
    return isinstance(error, tf.errors.OpError) and any(
        key in text for key in ("Horovod", "horovod", "Gloo", "gloo"))


def weights_digest(variables: Sequence) -> str:
    """sha256 of the variables' values (a bit-exact fingerprint that ranks compare)."""
    digest = hashlib.sha256()
    for var in variables:
        digest.update(np.ascontiguousarray(var.numpy()).tobytes())
    return digest.hexdigest()


def check_identical_weights(trainer, chief_log: Callable = print) -> list[str]:
    """Every rank's digest of what the gradient allreduce keeps identical: the trainable
    weights and the optimizer state (a collective); rank 0 logs them. Batch-norm moving
    statistics are left out: each rank averages its own batches (rank 0's are
    checkpointed), as in any Horovod run. Ranks that disagree are a bug (a missed
    broadcast): RuntimeError on every rank."""
    context = trainer.context
    mine = weights_digest(list(trainer.network.trainable_variables)
                          + list(trainer.optimizer.variables))
    digests = horovod_glue.allgather_object(mine, context)
    chief_log(f"elastic: final trainable weights + optimizer state sha256 by rank: "
              f"{' '.join(d[:16] for d in digests)} "
              f"({'identical' if len(set(digests)) == 1 else 'DIFFERENT'} on "
              f"{context.size} rank(s))")
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {digests}")
    return digests


class TrainingState:
    """Variables + Python objects that a reset restores and a sync broadcasts.

    `objects` maps a name to something with `state_dict()` / `load_state_dict(d)` (plain,
    picklable values). Follows `horovod.common.elastic.State`'s protocol (save, restore,
    sync, commit, on_reset, on_hosts_updated) and reuses its host-update check."""

    def __init__(self, trainer, extra_variables: Sequence = (), objects: dict | None = None):
        from horovod.common.elastic import State

        self.trainer = trainer
        self.extra_variables = list(extra_variables)
        self.objects = dict(objects or {})
        self._host_state = State(bcast_object=self._broadcast_object,
                                 get_rank=lambda: self.trainer.context.rank)
        self._values, self._saved_objects = None, None
        self.save()

    # --------------------------------------------------- what the state holds
    def variables(self) -> list:
        optimizer = self.trainer.optimizer
        if not optimizer.built:
            optimizer.build(self.trainer.network.trainable_variables)
        return (list(self.trainer.network.variables) + list(optimizer.variables)
                + self.extra_variables)

    def _broadcast_object(self, obj):
        return horovod_glue.broadcast_object(obj, self.trainer.context)

    @property
    def step(self) -> int:
        return int(self.trainer.optimizer.iterations.numpy())

    @property
    def committed_step(self) -> int:
        return int(self._saved_objects["step"])

    # --------------------------------------------------- State protocol
    def save(self) -> None:
        """Copy the state to host memory (the commit a reset comes back to)."""
        self._values = [np.array(v.numpy()) for v in self.variables()]
        self._saved_objects = {"step": self.step, **{
            name: copy.deepcopy(obj.state_dict()) for name, obj in self.objects.items()}}

    def restore(self) -> None:
        """Back to the last commit (undoes the steps since)."""
        for var, value in zip(self.variables(), self._values):
            var.assign(value)
        for name, obj in self.objects.items():
            obj.load_state_dict(copy.deepcopy(self._saved_objects[name]))

    def sync(self) -> None:
        """Rank 0's state to every rank (the collective every rank runs after a reset)."""
        context = self.trainer.context
        horovod_glue.broadcast_variables(self.variables(), context)
        objects = horovod_glue.broadcast_object(
            {name: obj.state_dict() for name, obj in self.objects.items()}, context)
        for name, obj in self.objects.items():
            obj.load_state_dict(objects[name])
        self.save()

    def commit(self) -> None:
        """save(), then raise HostsUpdatedInterrupt on every rank if hosts changed."""
        self.save()
        self._host_state.check_host_updates()

    def on_reset(self) -> None:
        self._host_state.on_reset()

    def on_hosts_updated(self, timestamp, update_res) -> None:
        self._host_state.on_hosts_updated(timestamp, update_res)


class ElasticRun:
    """Runs `body(context)` under Horovod's elastic driver until it returns.

    `body` trains from the current step; on a failure or host change it is interrupted,
    the state goes back to the last commit (failure) or stays at the commit that raised
    (host change), Horovod is re-initialised, the state is broadcast from rank 0, and
    `body` runs again with the new context. `changes` lists the world-size changes."""

    def __init__(self, trainer, commit_steps: int, extra_variables: Sequence = (),
                 objects: dict | None = None, log: Callable = print):
        if commit_steps < 1:
            raise ValueError(f"commit_steps must be >= 1, got {commit_steps}")
        self.trainer, self.commit_steps, self._log = trainer, commit_steps, log
        self.changes: list[WorldChange] = []
        self.state = TrainingState(trainer, extra_variables,
                                   dict(objects or {}, world_changes=self))
        self._last_commit = time.monotonic()
        self._interrupted: tuple | None = None  # (error, old size, step, time)
        self._pending: WorldChange | None = None
        self.resets = 0

    # world_changes travel with the state (a joining rank 0 never exists, but a new rank 0
    # after the old one died must know the history)
    def state_dict(self) -> dict:
        return {"changes": [dataclasses.asdict(c) for c in self.changes]}

    def load_state_dict(self, state: dict) -> None:
        self.changes = [WorldChange(**c) for c in state["changes"]]

    @property
    def seconds_lost(self) -> float:
        return sum(c.seconds_lost or 0.0 for c in self.changes)

    # --------------------------------------------------- commits
    def commit(self) -> None:
        self.state.commit()
        self._last_commit = time.monotonic()

    def callback(self) -> keras.callbacks.Callback:
        return _Commit(self)

    def first_step_done(self) -> None:
        """Called after each step: completes the timing of a pending world change."""
        change, self._pending = self._pending, None
        if change is None:
            return
        now = time.monotonic()
        change.seconds_lost = now - self._since
        change.seconds_to_first_step = now - self._begun
        self.changes.append(change)
        if self.trainer.context.is_chief:
            self._log(change.describe())

    # --------------------------------------------------- the elastic loop
    def run(self, body: Callable[[horovod_glue.Context], object]):
        from horovod.common.elastic import run_fn
        from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

        def attempt(state):
            self._begin()
            try:
                return body(self.trainer.context)
            except HostsUpdatedInterrupt as err:
                self._interrupt(err)
                raise
            except tf.errors.OpError as err:
                if not _is_horovod_failure(err):
                    raise
                self._interrupt(err)
                raise HorovodInternalError(err) from err
            except HorovodInternalError as err:
                self._interrupt(err)
                raise

        return run_fn(attempt, self._reset)(self.state)

    def _interrupt(self, error: BaseException) -> None:
        # The first interruption counts (a second one during the reset keeps the first).
        if self._interrupted is None:
            self._interrupted = (error, self.trainer.context.size, self.state.step,
                                 time.monotonic())

    def _reset(self) -> None:
        """Between the interruption and the sync: re-initialise Horovod (waits for the
        driver's new assignment), and refresh the context everything else reads."""
        watchdog.beat(phase="an elastic reset (waiting for the new world)", slow=True)
        self.resets += 1
        self.trainer.context = horovod_glue.reinit()

    def _begin(self) -> None:
        """At the start of each attempt (after the sync): note a world change."""
        if self._interrupted is None:
            return
        error, old_size, failed_at, when = self._interrupted
        self._interrupted = None
        step = self.state.step
        self._since, self._begun = self._last_commit, time.monotonic()
        self._pending = WorldChange(step=step, old_size=old_size,
                                    new_size=self.trainer.context.size, reason=_reason(error),
                                    steps_redone=max(0, failed_at - step),
                                    seconds_since_commit=when - self._last_commit,
                                    seconds_to_reform=self._begun - when)


class _Commit(keras.callbacks.Callback):
    """Commits every `commit_steps` steps and at each loop end (after the checkpoint: it
    is the last callback), and closes the timing of a world change after its first step."""

    def __init__(self, elastic: ElasticRun):
        super().__init__()
        self.elastic = elastic

    def on_train_batch_end(self, batch, logs=None):
        self.elastic.first_step_done()
        if int(self.model.optimizer.iterations.numpy()) % self.elastic.commit_steps == 0:
            self.elastic.commit()

    def on_epoch_end(self, epoch, logs=None):
        if self.elastic.state.committed_step != int(self.model.optimizer.iterations.numpy()):
            self.elastic.commit()
